"""`make demo`: the whole product on one machine, no GPU and no cloud needed.

1. Starts the local control plane (real API server, scheduler and
   controller-manager; KWOK simulates the GPU nodes and their pods).
2. Installs the CRD, runs the operator with the `Local` provider and applies
   the examples that use it; waits until every one reports Ready and shows how
   the pods were packed onto shared (simulated) GPUs.
3. Starts the real inference server on a tiny random-weight pipeline on this
   CPU and writes a generated PNG to demo-output/.

The cluster and the operator keep running afterwards for you to explore;
`make cluster-down` stops both.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "hack"))
import localcluster  # noqa: E402

CLUSTER_DIR = ROOT / ".cluster"
OUTPUT = ROOT / "demo-output"
VENV_BIN = Path(sys.executable).parent


def step(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


def local_examples() -> list[Path]:
    """The examples that run on the simulated (Local) node pools."""
    picked = []
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        if (doc or {}).get("spec", {}).get("nodePool", {}).get("provider") == "Local":
            picked.append(path)
    return picked


def model_volume() -> list[dict]:
    """A PersistentVolume and claim for examples that load `pvc://models/...`."""
    return [
        {
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": "demo-models"},
            "spec": {
                "capacity": {"storage": "50Gi"}, "accessModes": ["ReadOnlyMany"],
                "storageClassName": "", "hostPath": {"path": "/var/lib/imagegen/models"},
                "claimRef": {"namespace": "default", "name": "models"},
            },
        },
        {
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": "models", "namespace": "default"},
            "spec": {
                "accessModes": ["ReadOnlyMany"], "storageClassName": "",
                "volumeName": "demo-models", "resources": {"requests": {"storage": "50Gi"}},
            },
        },
    ]


def start_operator(cluster: localcluster.LocalCluster) -> None:
    env = {**os.environ, "KUBECONFIG": str(cluster.operator_kubeconfig)}
    log = open(CLUSTER_DIR / "logs" / "operator.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(VENV_BIN / "imagegen-operator"), "run", "--resync-seconds=5",
         f"--metrics-port={localcluster.free_port()}",
         f"--health-port={localcluster.free_port()}"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    # Registered with the cluster's processes, so `make cluster-down` stops it too.
    with open(CLUSTER_DIR / "pids", "a") as f:
        f.write(f"{proc.pid} imagegen-operator\n")


def show(cluster: localcluster.LocalCluster, *args: str) -> None:
    print(cluster.kubectl(*args).stdout, flush=True)


def generate_image(model_dir: Path, out: Path) -> None:
    server = VENV_BIN / "imagegen-server"
    # The libraries' import-time notes (torchvision is not needed here) and progress bars
    # would bury the demo's own output; the server log keeps everything.
    quiet = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    subprocess.run([str(server), "make-tiny-model", str(model_dir), "--family", "sd15"],
                   check=True, env=quiet)
    port = localcluster.free_port()
    log = open(CLUSTER_DIR / "logs" / "server.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(server), "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "IMAGEGEN_COMPILE_ENABLED": "false", "IMAGEGEN_DTYPE": "float32"},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited; see {CLUSTER_DIR / 'logs' / 'server.log'}")
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the server never became ready")
            time.sleep(0.5)
        body = json.dumps({
            "prompt": "a lighthouse on a cliff at dusk", "size": "64x64", "n": 1,
            "response_format": "b64_json", "seed": 7, "steps": 4,
        }).encode()
        request = urllib.request.Request(f"{base}/v1/images/generations", data=body,
                                         headers={"Content-Type": "application/json"})
        started = time.monotonic()
        with urllib.request.urlopen(request, timeout=120) as r:
            answer = json.load(r)
        out.parent.mkdir(exist_ok=True)
        out.write_bytes(base64.b64decode(answer["data"][0]["b64_json"]))
        print(f"wrote {out.relative_to(ROOT)} ({out.stat().st_size} bytes) in "
              f"{time.monotonic() - started:.2f}s")
        with urllib.request.urlopen(f"{base}/metrics") as r:
            wanted = ("imagegen_images_generated_total", "imagegen_stage_duration_seconds_count")
            for line in r.read().decode().splitlines():
                if line.startswith(wanted):
                    print("  " + line)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> int:
    step("Starting the local control plane (first run builds it: several minutes)")
    cluster = localcluster.up(CLUSTER_DIR)
    print(f"API server {cluster.server}; kubeconfig {cluster.kubeconfig.relative_to(ROOT)}")

    step("Installing the ImageGenService CRD and starting the operator (Local provider)")
    cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "crd/imagegenservices.imagegen.dev")
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(model_volume()))
    start_operator(cluster)

    examples = local_examples()
    step("Applying " + ", ".join(str(p.relative_to(ROOT)) for p in examples))
    for path in examples:
        print(cluster.kubectl("apply", "-f", str(path)).stdout.strip())
    names = [yaml.safe_load(p.read_text())["metadata"]["name"] for p in examples]
    cluster.kubectl("wait", "--for=condition=Ready", "--timeout=180s",
                    *[f"igs/{n}" for n in names], timeout=200)

    step("Every service is Ready; pods packed onto shared (simulated) GPUs")
    show(cluster, "get", "igs", "-o", "wide")
    show(cluster, "get", "nodes", "-L", "cloud.google.com/gke-accelerator",
         "-L", "cloud.google.com/gke-gpu-sharing-strategy",
         "-L", "cloud.google.com/gke-max-shared-clients-per-gpu",
         "-o", "custom-columns=NODE:.metadata.name,"
         "GPU:.metadata.labels.cloud\\.google\\.com/gke-accelerator,"
         "SHARING:.metadata.labels.cloud\\.google\\.com/gke-gpu-sharing-strategy,"
         "CLIENTS:.metadata.labels.cloud\\.google\\.com/gke-max-shared-clients-per-gpu,"
         "GPU-SLOTS:.status.allocatable.nvidia\\.com/gpu")
    show(cluster, "get", "pods", "-o", "wide")

    step("The capacity math behind it (imagegen-operator plan)")
    plan = subprocess.run([str(VENV_BIN / "imagegen-operator"), "plan",
                           *[a for p in examples for a in ("-f", str(p))]],
                          check=True, capture_output=True, text=True)
    print(plan.stdout)

    step("The inference server on a tiny random-weight pipeline (CPU)")
    generate_image(CLUSTER_DIR / "demo-model", OUTPUT / "demo.png")

    step("Done")
    print(f"export KUBECONFIG={cluster.kubeconfig}; export PATH={cluster.bin}:$PATH")
    print("kubectl get igs,deploy,pods   # explore; `make cluster-down` stops everything")
    return 0


if __name__ == "__main__":
    sys.exit(main())
