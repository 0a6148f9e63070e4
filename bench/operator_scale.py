"""Operator at scale: the operator's speed and footprint on a fresh local control plane.

(Named operator_scale.py, not operator.py: a script's folder comes first on sys.path, and a
bench/operator.py would shadow the standard library's ``operator`` module.)

Brings up the local control plane (real kube-apiserver, scheduler, controller-manager, KWOK
nodes), installs the CRD, starts ``imagegen-operator run`` as its own process and measures:

1. apply -> Deployment exists, one service at a time (``--singles`` of them);
2. the same for ``--batch`` services applied in one ``kubectl apply``;
3. time until ``--fleet`` services applied at once all report Ready;
4. steady state: API writes per timer reconcile, over one resync period once the singles are
   Ready and nothing else happens (and again at the end, if the whole fleet became Ready);
5. the operator's peak RSS (VmHWM from /proc) over the whole run.

Latencies come from the API server's audit log, not from polling: the time between the
ResponseComplete of the client's apply of the ImageGenService and that of the operator's first
write of its Deployment, both stamped by the API server in microseconds. The cluster is always
torn down, also on failure.

    .venv/bin/python bench/operator_scale.py [--singles 10] [--batch 100] [--fleet 200]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import datetime
from pathlib import Path

import common

P50_BAR_S = 0.5
READY_BAR_S = 60.0
RSS_BAR_MB = 200.0

# Many pods per GPU and room for all of them, so the bench measures the operator, not capacity.
GPU = {"type": "nvidia-l4", "sharing": {"strategy": "TimeSharing", "maxSharedClientsPerGpu": 48}}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--singles", type=int, default=10)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--fleet", type=int, default=200)
    parser.add_argument(
        "--resync-seconds", type=float, default=30.0, help="the operator's timer (its default)"
    )
    parser.add_argument(
        "--steady-window",
        type=float,
        default=15.0,
        help="seconds watched at scale (the singles are watched for a resync period)",
    )
    parser.add_argument(
        "--ready-timeout", type=float, default=180.0, help="longest wait for each scenario"
    )
    common.add_output_argument(parser)
    return parser.parse_args(argv)


def service(name: str, namespace: str) -> dict:
    return {
        "apiVersion": "imagegen.dev/v1alpha1",
        "kind": "ImageGenService",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"uri": "file:///models/tiny-sd15", "family": "SD15", "memoryGiB": 0.25},
            "gpu": GPU,
            "nodePool": {"provider": "Local", "maxNodes": 20},
            "replicas": 1,
        },
    }


# --- the audit log -----------------------------------------------------------------------------
def _stamp(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def audit_events(cluster, since_bytes: int = 0) -> list[dict]:
    from support.operator_process import audit_events as read

    return read(cluster, since_bytes)


def apply_latencies(cluster, namespace: str, names: list[str], since_bytes: int) -> dict:
    """Seconds from each service's apply to the operator's first write of its Deployment."""
    from localcluster import OPERATOR_USER

    applied: dict[str, float] = {}
    deployed: dict[str, float] = {}
    for event in audit_events(cluster, since_bytes):
        ref = event.get("objectRef", {})
        if ref.get("namespace") != namespace or event.get("verb") not in ("create", "patch"):
            continue
        if event.get("responseStatus", {}).get("code", 500) >= 300:
            continue
        user = event.get("user", {}).get("username")
        name = ref.get("name")
        when = _stamp(event["stageTimestamp"])
        if ref.get("resource") == "imagegenservices" and user != OPERATOR_USER:
            if not ref.get("subresource"):
                applied.setdefault(name, when)
        elif ref.get("resource") == "deployments" and user == OPERATOR_USER:
            deployed.setdefault(name, when)
    return {n: deployed[n] - applied[n] for n in names if n in applied and n in deployed}


def fleet_timeline(cluster, namespace: str, since_bytes: int) -> dict:
    """Where the time to Ready went: seconds from the first apply until the last of each step.

    Writes only (the audit log records no reads): the client's applies (one
    ``kubectl apply`` of them all, which itself takes a while), the operator's Deployments, the
    deployment controller's last status update (the rollouts done), the operator's
    last status patch (Ready reported).
    """
    from localcluster import OPERATOR_USER

    first = None
    last: dict[str, float] = {}
    for event in audit_events(cluster, since_bytes):
        ref = event.get("objectRef", {})
        if ref.get("namespace") != namespace or event.get("responseStatus", {}).get("code", 500) >= 300:
            continue
        when = _stamp(event["stageTimestamp"])
        user = event.get("user", {}).get("username", "")
        resource, sub = ref.get("resource"), ref.get("subresource")
        step = None
        if resource == "imagegenservices" and user != OPERATOR_USER and not sub:
            first = when if first is None else min(first, when)
            step = "client_applied_all_s"
        elif resource == "deployments" and user == OPERATOR_USER and not sub:
            step = "operator_wrote_all_deployments_s"
        elif resource == "deployments" and sub == "status" and user.endswith("deployment-controller"):
            step = "controllers_finished_rollouts_s"
        elif resource == "imagegenservices" and sub == "status" and user == OPERATOR_USER:
            step = "operator_reported_ready_s"
        if step:
            last[step] = max(last.get(step, when), when)
    return {k: round(v - first, 2) for k, v in last.items()} if first else {}


def wait_for(check, timeout: float, what: str, interval: float = 0.1):
    value = poll(check, timeout, interval)
    if not value:
        raise TimeoutError(f"{what} not reached in {timeout}s")
    return value


def poll(check, timeout: float, interval: float = 0.1):
    """``check()`` until it is truthy or ``timeout`` passes; returns its last value.

    A slow operator is a result to report, not an error: callers record how far it got.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def ready_count(cluster, namespace: str) -> int:
    from support.kube import get_json

    items = get_json(cluster, "igs", "-n", namespace)["items"]
    return sum(
        any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in (item.get("status") or {}).get("conditions", [])
        )
        for item in items
    )


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the kernel's own high-water mark of the process's resident set."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def operator_metrics(metrics_text: str) -> dict[str, float]:
    """The operator's own samples (reconciles and their seconds by trigger), for the report."""
    samples: dict[str, float] = {}
    for line in metrics_text.splitlines():
        if not line.startswith("imagegen_operator_"):
            continue
        key, _, value = line.rpartition(" ")
        if "_bucket" in key or "_created" in key:
            continue
        samples[key] = float(value)
    return samples


def reconciles(metrics_text: str) -> float:
    """Reconciles the operator ran, whatever the trigger (timer ticks that arrive while one
    runs are folded into it and counted under another trigger)."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("imagegen_operator_reconcile_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


# --- the scenarios -----------------------------------------------------------------------------
def make_namespace(cluster, name: str) -> str:
    from support.kube import apply

    apply(cluster, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    return name


def deployments_exist(cluster, ns: str, names: list[str], since: int) -> dict | None:
    latencies = apply_latencies(cluster, ns, names, since)
    return latencies if len(latencies) == len(names) else None


def singles(cluster, count: int) -> list[float]:
    from support.kube import apply

    ns = make_namespace(cluster, "bench-single")
    out = []
    for i in range(count):
        name = f"single-{i}"
        since = cluster.audit_log.stat().st_size
        apply(cluster, service(name, ns))
        latencies = wait_for(
            lambda name=name, since=since: deployments_exist(cluster, ns, [name], since),
            60,
            f"Deployment {name}",
        )
        out.append(latencies[name])
    return out


def batch(cluster, count: int, ns_name: str, prefix: str) -> tuple[str, list[str], float, int]:
    from support.kube import apply

    ns = make_namespace(cluster, ns_name)
    names = [f"{prefix}-{i}" for i in range(count)]
    since = cluster.audit_log.stat().st_size
    started = time.monotonic()
    apply(cluster, *[service(n, ns) for n in names])
    return ns, names, started, since


def steady_writes(cluster, operator, window_s: float) -> dict:
    from support.operator_process import audit_writes

    # Quiet first: the last status updates after Ready may still be landing. If no quiet
    # window comes, the writes measured below say so.
    quiet = poll(lambda: not audit_writes(cluster, _size_after(cluster, 2.0)), 60)
    before = reconciles(operator.metrics())
    since = cluster.audit_log.stat().st_size
    time.sleep(window_s)
    writes = audit_writes(cluster, since)
    ran = reconciles(operator.metrics()) - before
    return {
        "quiet_before": bool(quiet),
        "window_s": window_s,
        "reconciles": ran,
        "writes": len(writes),
        "writes_per_reconcile": len(writes) / ran if ran else float("nan"),
        "write_examples": [(w["verb"], w["requestURI"]) for w in writes[:10]],
    }


def _size_after(cluster, seconds: float) -> int:
    size = cluster.audit_log.stat().st_size
    time.sleep(seconds)
    return size


def run(cluster, args, workdir: Path) -> dict:
    from support.operator_process import OperatorProcess

    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(common.ROOT / "crds"))
    cluster.wait_established("imagegenservices.imagegen.dev")
    operator = OperatorProcess(
        cluster, workdir / "operator.log", resync_seconds=args.resync_seconds
    ).start()
    try:
        single = singles(cluster, args.singles)
        print(
            f"1 service:   apply -> Deployment p50 {common.percentile(single, 50):.3f}s "
            f"p95 {common.percentile(single, 95):.3f}s (n={len(single)})",
            flush=True,
        )
        # Steady state while nothing else happens: the singles Ready, then one full resync
        # period, so every one of them gets at least one timer reconcile in the window.
        poll(lambda: ready_count(cluster, "bench-single") >= args.singles, args.ready_timeout, 0.5)
        steady = steady_writes(cluster, operator, args.resync_seconds + 2)
        print(
            f"steady state ({args.singles} services): {steady['writes']} writes in "
            f"{steady['reconciles']:.0f} reconciles",
            flush=True,
        )
        ns, names, started, since = batch(cluster, args.batch, "bench-batch", "batch")
        poll(lambda: deployments_exist(cluster, ns, names, since), args.ready_timeout, 0.5)
        many = apply_latencies(cluster, ns, names, since)
        # A Deployment still missing at the timeout counts as the timeout: a lower bound.
        missing = len(names) - len(many)
        many_s = list(many.values()) + [time.monotonic() - started] * missing
        print(
            f"{args.batch} at once: apply -> Deployment p50 {common.percentile(many_s, 50):.3f}s "
            f"p95 {common.percentile(many_s, 95):.3f}s ({missing} missing at the timeout)",
            flush=True,
        )
        ns, names, started, fleet_since = batch(cluster, args.fleet, "bench-fleet", "fleet")
        fleet_ready = poll(
            lambda: ready_count(cluster, ns) >= len(names) or None, args.ready_timeout, 0.5
        )
        fleet_ready_s = time.monotonic() - started
        fleet_ready_count = ready_count(cluster, ns)
        timeline = fleet_timeline(cluster, ns, fleet_since)
        print(
            f"{args.fleet} at once: {fleet_ready_count} Ready after {fleet_ready_s:.1f}s "
            f"(last of each step, from the first apply: {timeline})",
            flush=True,
        )
        # Again at scale, but only if the fleet got there: before that, status still changes.
        steady_at_scale = None
        if fleet_ready:
            steady_at_scale = steady_writes(cluster, operator, args.steady_window)
            print(
                f"steady state (all services): {steady_at_scale['writes']} writes in "
                f"{steady_at_scale['reconciles']:.0f} reconciles",
                flush=True,
            )
        rss = peak_rss_mb(operator.proc.pid)
        samples = operator_metrics(operator.metrics())
        count = sum(
            v
            for k, v in samples.items()
            if k.startswith("imagegen_operator_reconcile_duration_seconds_count")
        )
        seconds = sum(
            v
            for k, v in samples.items()
            if k.startswith("imagegen_operator_reconcile_duration_seconds_sum")
        )
        mean_reconcile = seconds / count if count else float("nan")
        print(f"mean reconcile {mean_reconcile * 1000:.0f} ms over {count:.0f}", flush=True)
        print(f"operator peak RSS {rss:.0f} MB", flush=True)
    finally:
        operator.stop()
    return {
        "single": {"latencies_s": single, **common.latency_summary(single)},
        "batch": {"latencies_s": many_s, **common.latency_summary(many_s)},
        "fleet_ready_s": fleet_ready_s,
        "fleet_all_ready": bool(fleet_ready),
        "fleet_ready_count": fleet_ready_count,
        "fleet_timeline": timeline,
        "batch_missing_at_timeout": missing,
        "steady_state": steady,
        "steady_state_at_scale": steady_at_scale,
        "operator_peak_rss_mb": rss,
        "mean_reconcile_s": mean_reconcile,
        "operator_metrics": samples,
        "services_total": args.singles + args.batch + args.fleet,
    }


def bars(result: dict, args) -> list[dict]:
    single, many = result["single"], result["batch"]
    steady = result["steady_state"]
    return [
        common.bar(
            "operator: apply -> Deployment, 1 service",
            f"p50 < {P50_BAR_S} s",
            f"p50 {single['p50_s']:.3f} s, p95 {single['p95_s']:.3f} s",
            single["p50_s"] < P50_BAR_S,
        ),
        common.bar(
            f"operator: apply -> Deployment, {args.batch} at once",
            f"p50 < {P50_BAR_S} s",
            f"p50 {many['p50_s']:.3f} s, p95 {many['p95_s']:.3f} s"
            + (
                f" ({result['batch_missing_at_timeout']} missing: lower bound)"
                if result["batch_missing_at_timeout"]
                else ""
            ),
            many["p50_s"] < P50_BAR_S,
        ),
        common.bar(
            f"operator: {args.fleet} services Ready",
            f"within {READY_BAR_S:g} s",
            f"{result['fleet_ready_s']:.1f} s ({args.singles + args.batch} already present)"
            + _timeline_text(result.get("fleet_timeline") or {})
            if result["fleet_all_ready"]
            else f"{result['fleet_ready_count']} of {args.fleet} after {result['fleet_ready_s']:.0f} s "
            f"({args.singles + args.batch} already present)",
            result["fleet_all_ready"] and result["fleet_ready_s"] < READY_BAR_S,
        ),
        common.bar(
            "operator: peak RSS",
            f"< {RSS_BAR_MB:g} MB",
            f"{result['operator_peak_rss_mb']:.0f} MB with {result['services_total']} services",
            result["operator_peak_rss_mb"] < RSS_BAR_MB,
        ),
        common.bar(
            "operator: API writes per steady-state reconcile",
            "0",
            f"{steady['writes']} writes in {steady['reconciles']:.0f} reconciles "
            f"({args.singles} services)",
            _no_writes(steady),
        ),
    ] + _at_scale_bar(result)


def _timeline_text(timeline: dict) -> str:
    steps = (
        ("client_applied_all_s", "last apply landed"),
        ("operator_wrote_all_deployments_s", "last Deployment written"),
        ("controllers_finished_rollouts_s", "rollouts done"),
        ("operator_reported_ready_s", "Ready reported"),
    )
    parts = [f"{label} {timeline[key]:.1f} s" for key, label in steps if key in timeline]
    return f"; {', '.join(parts)}" if parts else ""


def _no_writes(window: dict) -> bool | None:
    # Without a reconcile in the window there is nothing to judge: not measured, not met.
    if window["writes"]:
        return False
    return True if window["reconciles"] else None


def _at_scale_bar(result: dict) -> list[dict]:
    scale = result.get("steady_state_at_scale")
    if not scale:
        return []
    return [
        common.bar(
            "operator: API writes per steady-state reconcile, at scale",
            "0",
            f"{scale['writes']} writes in {scale['reconciles']:.0f} reconciles "
            f"({result['services_total']} services)",
            _no_writes(scale),
            "extra",
        )
    ]


def main(argv=None) -> dict:
    args = parse_args(argv)
    import localcluster

    with tempfile.TemporaryDirectory(prefix="bench-operator-") as tmp:
        workdir = Path(tmp)
        cluster_dir = workdir / "cluster"
        started = time.monotonic()
        cluster = localcluster.up(cluster_dir)
        up_s = time.monotonic() - started
        print(f"control plane up in {up_s:.1f}s", flush=True)
        try:
            measured = run(cluster, args, workdir)
        finally:
            localcluster.down(cluster_dir)
    result = {
        "settings": {
            "singles": args.singles,
            "batch": args.batch,
            "fleet": args.fleet,
            "resync_seconds": args.resync_seconds,
            "gpu": GPU,
        },
        "control_plane_up_s": up_s,
        **measured,
    }
    result["bars"] = bars(result, args)
    path = common.write_result("operator_scale", result, args.out_dir)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
