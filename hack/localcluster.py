"""A local Kubernetes control plane for tests and the demo.

Runs the real etcd, kube-apiserver, kube-controller-manager and kube-scheduler
built by ``hack/build-tools.sh``, plus KWOK standing in for kubelets: nodes and
pods are fake (nothing runs in them, their IPs are made up), everything else is
the real thing. All listeners are on 127.0.0.1 with free ports.

    python hack/localcluster.py up [--dir .cluster]
    python hack/localcluster.py down [--dir .cluster]

``up`` writes a token kubeconfig to ``DIR/kubeconfig``, links kubectl, helm and
kubeconform into ``DIR/bin`` and leaves logs in ``DIR/logs``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HACK = Path(__file__).resolve().parent
SERVICE_CIDR = "10.96.0.0/16"
POD_CIDR = "10.244.0.0/16"
ADMIN_USER = "imagegen-admin"
# A second identity, so tests can tell the operator's API calls from their own
# in the audit log (both are cluster admins; RBAC is tested with real accounts).
OPERATOR_USER = "imagegen-operator-dev"

# Every write, by anyone, at Metadata level: enough to count an actor's writes.
AUDIT_POLICY = """apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  verbs: [create, update, patch, delete, deletecollection]
- level: None
"""

# The client-side rate limits Kubernetes' own scalability tests give the controller-manager
# and the scheduler (CONTROLLER_MANAGER_TEST_ARGS / SCHEDULER_TEST_ARGS in kubernetes/test-infra
# and perf-tests). At the controller-manager's defaults (20 QPS, burst 30; the scheduler's are
# 50/100) the deployment controller alone needs
# ~50 s for the ~1000 writes that 200 new Deployments take; the operator is not what that measures.
SCALE_TEST_CLIENT_LIMITS = ("--kube-api-qps=100", "--kube-api-burst=100")


def build_tools(*tools: str) -> Path:
    """Build (first time only) the pinned binaries, or only ``tools``; return their cache."""
    out = subprocess.run(
        [str(HACK / "build-tools.sh"), *tools], check=True, stdout=subprocess.PIPE, text=True
    )
    return Path(out.stdout.strip().splitlines()[-1])


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free on 127.0.0.1 now. Each socket stays bound until all are
    chosen: ports picked one at a time, each released before the next, could repeat."""
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def free_port() -> int:
    return free_ports(1)[0]


# --- certificates -------------------------------------------------------------


def _write_pki(pki: Path) -> None:
    """A CA, the API server's serving cert and the service-account signing key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    pki.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    valid_until = now + datetime.timedelta(days=365)

    def pem_key(key) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "imagegen-local-ca")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(valid_until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    # 10.96.0.1 is the first address of the service range: the in-cluster
    # `kubernetes` Service, which some clients check the certificate against.
    sans = [
        x509.DNSName("localhost"),
        x509.DNSName("kubernetes.default.svc"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("10.96.0.1")),
    ]
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(valid_until)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (pki / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (pki / "ca.key").write_bytes(pem_key(ca_key))
    (pki / "apiserver.crt").write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    (pki / "apiserver.key").write_bytes(pem_key(server_key))
    (pki / "sa.key").write_bytes(pem_key(sa_key))
    (pki / "sa.pub").write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    for key in ("ca.key", "apiserver.key", "sa.key"):
        (pki / key).chmod(0o600)


def write_kubeconfig(path: Path, server: str, ca_pem: bytes, user: str, token: str) -> None:
    """A kubeconfig that authenticates with a bearer token (JSON is valid YAML)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": "local",
            "cluster": {
                "server": server,
                "certificate-authority-data": base64.b64encode(ca_pem).decode(),
            },
        }],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": user}}],
        "current-context": "local",
    }
    path.write_text(json.dumps(config, indent=2) + "\n")
    path.chmod(0o600)


# --- processes ----------------------------------------------------------------


@dataclass
class LocalCluster:
    """A running control plane, described by the files in its directory."""

    dir: Path
    bin: Path
    server: str

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    @property
    def operator_kubeconfig(self) -> Path:
        """Credentials for an operator run by hand or by tests (user OPERATOR_USER)."""
        return self.dir / "operator.kubeconfig"

    @property
    def audit_log(self) -> Path:
        return self.dir / "logs" / "audit.log"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run the built kubectl against this cluster; text output."""
        result = subprocess.run(
            [str(self.bin / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args],
            input=input, capture_output=True, text=True, timeout=timeout,
        )
        if check and result.returncode:
            raise KubectlError(result.returncode, result.args, result.stdout, result.stderr)
        return result

    def wait_established(self, crd: str, timeout: float = 60) -> None:
        """Wait for a CustomResourceDefinition's Established condition. Not `kubectl wait`:
        it fails at once, instead of waiting, while the new object has no status.conditions
        yet ("<nil> is of the type <nil>")."""
        deadline = time.monotonic() + timeout
        jsonpath = '{.status.conditions[?(@.type=="Established")].status}'
        while True:
            got = self.kubectl("get", f"crd/{crd}", "-o", f"jsonpath={jsonpath}", check=False)
            if got.returncode == 0 and got.stdout.strip() == "True":
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"crd/{crd} not Established after {timeout:g}s: "
                                   f"{(got.stderr or got.stdout).strip()}")
            time.sleep(0.2)


class KubectlError(subprocess.CalledProcessError):
    """A failed kubectl call that shows what kubectl said."""

    def __str__(self) -> str:
        return f"{super().__str__()}\n{self.stderr.strip()}"


def _spawn(cluster_dir: Path, name: str, argv: list[str]) -> subprocess.Popen:
    logs = cluster_dir / "logs"
    logs.mkdir(exist_ok=True)
    log = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
    # Own session, so `down` can stop the process and anything it started.
    proc = subprocess.Popen(
        argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    register(cluster_dir, proc.pid, name)
    return proc


def register(cluster_dir: Path, pid: int, name: str) -> None:
    """Name a process (the leader of its own session) for ``down`` to stop, with its start
    time, so that a pid reused after a reboot is never taken for it."""
    stat = _proc_stat(pid)
    with open(cluster_dir / "pids", "a") as f:
        f.write(f"{pid} {name} {stat[2] if stat else ''}\n")


def _wait_ready(url: str, ca: Path, token: str, timeout: float, proc: subprocess.Popen,
                log: Path) -> None:
    ctx = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{log.stem} exited with {proc.returncode}; see {log}")
        try:
            req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(req, context=ctx, timeout=5) as resp:
                if resp.status == 200:
                    return
        except Exception as exc:  # noqa: BLE001 - keep polling until the deadline
            last = str(exc)
        time.sleep(0.25)
    raise TimeoutError(f"{url} not ready after {timeout}s ({last}); see {log}")


def _wait_etcd(port: int, proc: subprocess.Popen, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"etcd exited with {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if json.load(r).get("health") == "true":
                    return
        except Exception:  # noqa: BLE001
            pass
        time.sleep(0.2)
    raise TimeoutError(f"etcd not healthy after {timeout}s; see {log}")


def up(cluster_dir: Path, tools: Path | None = None) -> LocalCluster:
    """Start the control plane in ``cluster_dir``; return when /readyz answers."""
    cluster_dir = cluster_dir.resolve()
    if (cluster_dir / "pids").exists():
        down(cluster_dir)
    tools = tools or build_tools()
    tool_bin = tools / "bin"
    cluster_dir.mkdir(parents=True, exist_ok=True)
    # Every `up` is a new cluster: no objects left from the last one.
    shutil.rmtree(cluster_dir / "etcd", ignore_errors=True)
    shutil.rmtree(cluster_dir / "logs", ignore_errors=True)
    pki = cluster_dir / "pki"
    _write_pki(pki)

    token, operator_token = secrets.token_hex(24), secrets.token_hex(24)
    (cluster_dir / "tokens.csv").write_text(
        f"{token},{ADMIN_USER},{ADMIN_USER},system:masters\n"
        f"{operator_token},{OPERATOR_USER},{OPERATOR_USER},system:masters\n"
    )
    (cluster_dir / "audit-policy.yaml").write_text(AUDIT_POLICY)
    (cluster_dir / "logs").mkdir(exist_ok=True)
    (cluster_dir / "tokens.csv").chmod(0o600)

    etcd_port, etcd_peer, api_port, manager_port, scheduler_port, kwok_port = free_ports(6)
    server = f"https://127.0.0.1:{api_port}"
    try:
        etcd = _spawn(cluster_dir, "etcd", [
            str(tool_bin / "etcd"),
            "--data-dir", str(cluster_dir / "etcd"),
            "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{etcd_peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{etcd_peer}",
            "--initial-cluster", f"default=http://127.0.0.1:{etcd_peer}",
            # A throwaway test store: durability is not worth the fsync latency.
            "--unsafe-no-fsync",
            "--log-level", "warn",
        ])
        _wait_etcd(etcd_port, etcd, cluster_dir / "logs" / "etcd.log")

        apiserver = _spawn(cluster_dir, "kube-apiserver", [
            str(tool_bin / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={api_port}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--token-auth-file={cluster_dir / 'tokens.csv'}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=RBAC",
            "--allow-privileged=true",
            "--profiling=false",
            f"--audit-policy-file={cluster_dir / 'audit-policy.yaml'}",
            f"--audit-log-path={cluster_dir / 'logs' / 'audit.log'}",
            "--audit-log-format=json",
            "--v=1",
        ])
        ca_pem = (pki / "ca.crt").read_bytes()
        write_kubeconfig(cluster_dir / "kubeconfig", server, ca_pem, ADMIN_USER, token)
        write_kubeconfig(cluster_dir / "operator.kubeconfig", server, ca_pem,
                         OPERATOR_USER, operator_token)
        _wait_ready(f"{server}/readyz", pki / "ca.crt", token, 90, apiserver,
                    cluster_dir / "logs" / "kube-apiserver.log")

        kubeconfig = str(cluster_dir / "kubeconfig")
        _spawn(cluster_dir, "kube-controller-manager", [
            str(tool_bin / "kube-controller-manager"),
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={manager_port}",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--cluster-cidr={POD_CIDR}",
            "--leader-elect=false",
            "--use-service-account-credentials=true",
            *SCALE_TEST_CLIENT_LIMITS,
            "--v=1",
        ])
        _spawn(cluster_dir, "kube-scheduler", [
            str(tool_bin / "kube-scheduler"),
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={scheduler_port}",
            "--leader-elect=false",
            # A pod found unschedulable waits for a cluster event that may make room; one that
            # raced its scheduling cycle is retried only after this (5 min by default), which a
            # small cluster without churn can hit (kubernetes/kubernetes#72558): pools here come
            # up in seconds, and a missed node event must not stall a test for minutes.
            "--pod-max-in-unschedulable-pods-duration=10s",
            *SCALE_TEST_CLIENT_LIMITS,
            "--v=1",
        ])
        stages = sorted((tools / "kwok-stages").glob("*.yaml"))
        _spawn(cluster_dir, "kwok", [
            str(tool_bin / "kwok"),
            f"--kubeconfig={kubeconfig}",
            *[f"--config={s}" for s in stages],
            # Only nodes created as fake are KWOK's; anything else is left alone.
            "--manage-all-nodes=false",
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            f"--cidr={POD_CIDR.replace('0.0/16', '0.1/16')}",
            "--node-ip=10.240.0.1",
            "--node-lease-duration-seconds=40",
            f"--server-address=127.0.0.1:{kwok_port}",
        ])
        link_dir = cluster_dir / "bin"
        link_dir.mkdir(exist_ok=True)
        for tool in ("kubectl", "helm", "kubeconform", "kwok", "promtool"):
            link = link_dir / tool
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(tool_bin / tool)
        cluster = LocalCluster(dir=cluster_dir, bin=link_dir, server=server)
        _wait_for_default_service_account(cluster)
    except BaseException:
        # Whatever stopped the start (a slow controller-manager included), nothing of it
        # is left running.
        down(cluster_dir)
        raise
    return cluster


def _wait_for_default_service_account(cluster: LocalCluster, timeout: float = 60) -> None:
    """Pods are refused until the controller-manager has made `default`'s account."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = cluster.kubectl("get", "serviceaccount", "default", "-n", "default", check=False)
        if r.returncode == 0:
            return
        time.sleep(0.5)
    raise TimeoutError("the default service account never appeared; is the controller-manager up?")


def attach(cluster_dir: Path) -> LocalCluster:
    """Describe an already running cluster from its directory."""
    cluster_dir = cluster_dir.resolve()
    config = json.loads((cluster_dir / "kubeconfig").read_text())
    return LocalCluster(
        dir=cluster_dir, bin=cluster_dir / "bin",
        server=config["clusters"][0]["cluster"]["server"],
    )


def down(cluster_dir: Path, grace: float = 15, kill_wait: float = 15) -> None:
    """Stop every process started by ``up`` and return only once all of them are gone.

    Newest first, one at a time: the API server stops in about a second while etcd is still
    there, and in over 20 s when etcd went first. Each process was started in its own process
    group: SIGTERM to the group, up to ``grace`` seconds for it to exit, then SIGKILL and up to
    ``kill_wait`` more. One still there after that is an error, not a silent return.
    """
    cluster_dir = cluster_dir.resolve()
    pid_file = cluster_dir / "pids"
    if not pid_file.exists():
        return
    started = [_Started.parse(line) for line in pid_file.read_text().splitlines() if line.strip()]
    stuck: list[_Started] = []
    for proc in reversed(started):
        proc.signal(signal.SIGTERM)
        if _wait_gone([proc], grace):
            proc.signal(signal.SIGKILL)
            stuck += _wait_gone([proc], kill_wait)
    if stuck:
        names = ", ".join(f"{p.name} ({p.pid})" for p in stuck)
        raise RuntimeError(f"still running {kill_wait:.0f}s after SIGKILL: {names}")
    pid_file.unlink()


@dataclass(frozen=True)
class _Started:
    """A process ``up`` started: the leader of its own process group."""

    pid: int
    name: str
    start_ticks: int | None  # from /proc/PID/stat, so a reused pid is not taken for ours

    @classmethod
    def parse(cls, line: str) -> _Started:
        fields = line.split()
        ticks = int(fields[2]) if len(fields) > 2 else None
        return cls(int(fields[0]), fields[1], ticks)

    def signal(self, sig: int) -> None:
        if self.running():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)

    def running(self) -> bool:
        """The leader or anything else in its group is still running (zombies are not)."""
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, os.WNOHANG)  # reap it if it is our own child
        leader = _proc_stat(self.pid)
        if leader is not None and self.start_ticks is not None and leader[2] != self.start_ticks:
            return False  # reused: Linux gives out no pid that still names a process group
        if leader is not None and leader[0] != "Z":
            return True
        return any(state != "Z" and pgid == self.pid for state, pgid, _ in _all_proc_stats())


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, process group, start time in clock ticks) of a process, None if there is none."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The command name is in parentheses and may hold spaces: split after it.
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return fields[0], int(fields[2]), int(fields[19])


def _all_proc_stats():
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _proc_stat(int(entry))) is not None:
            yield stat


def _wait_gone(procs: list[_Started], timeout: float) -> list[_Started]:
    """Wait up to ``timeout`` for all of ``procs`` to exit; return those still running."""
    deadline = time.monotonic() + timeout
    left = [p for p in procs if p.running()]
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [p for p in left if p.running()]
    return left


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "build"])
    parser.add_argument("--dir", type=Path, default=Path(".cluster"))
    args = parser.parse_args(argv)
    if args.command == "build":
        print(build_tools())
    elif args.command == "up":
        t0 = time.monotonic()
        cluster = up(args.dir)
        print(f"control plane ready at {cluster.server} in {time.monotonic() - t0:.1f}s")
        print(f"  export KUBECONFIG={cluster.kubeconfig}")
        print(f"  export PATH={cluster.bin}:$PATH")
    else:
        down(args.dir)
        print(f"stopped the control plane in {args.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
