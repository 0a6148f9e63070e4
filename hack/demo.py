"""`make demo`: the whole product on one machine, no GPU and no cloud needed.

1. Starts the local control plane (real API server, scheduler and
   controller-manager; KWOK simulates the GPU nodes and their pods).
2. Installs the CRD, runs the operator with the `Local` provider and applies
   the examples that use it; waits until every one reports Ready and shows how
   the pods were packed onto shared (simulated) GPUs.
3. Starts the real inference server on a tiny random-weight pipeline and a
   random LoRA adapter on this CPU and, through the official openai client,
   writes a generated PNG, the same with the adapter, and an inpainting edit to
   demo-output/, then streams a request with two previews.

The cluster and the operator keep running afterwards for you to explore;
`make cluster-down` stops both.
"""

from __future__ import annotations

import base64
import io
import json
import os
import secrets
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "hack"))
import localcluster  # noqa: E402

CLUSTER_DIR = ROOT / ".cluster"
OUTPUT = ROOT / "demo-output"
VENV_BIN = Path(sys.executable).parent


def step(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


def local_examples() -> list[tuple[Path, dict]]:
    """The services in examples/ that run on the simulated (Local) node pools, each with its
    file (a file may hold several)."""
    picked = []
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if (doc or {}).get("spec", {}).get("nodePool", {}).get("provider") == "Local":
                picked.append((path, doc))
    return picked


def claims_of(service: dict) -> set[str]:
    """The PersistentVolumeClaims a service's pods mount: `pvc://CLAIM/...` models and
    adapters, and the compile cache."""
    model = service["spec"]["model"]
    uris = [model["uri"], *(lora["uri"] for lora in model.get("loras") or [])]
    claims = {uri.removeprefix("pvc://").split("/")[0] for uri in uris if uri.startswith("pvc://")}
    cache = ((service["spec"].get("pipeline") or {}).get("compile") or {}).get("cache")
    if cache:
        claims.add(cache["pvcName"])
    return claims


def volumes(claims: set[str]) -> list[dict]:
    """A PersistentVolume and a bound claim for each (KWOK's pods mount nothing; the scheduler
    only needs the claims bound)."""
    objects = []
    for claim in sorted(claims):
        objects += [
            {
                "apiVersion": "v1", "kind": "PersistentVolume",
                "metadata": {"name": f"demo-{claim}"},
                "spec": {
                    "capacity": {"storage": "50Gi"}, "accessModes": ["ReadWriteMany"],
                    "storageClassName": "", "hostPath": {"path": f"/var/lib/imagegen/{claim}"},
                    "claimRef": {"namespace": "default", "name": claim},
                },
            },
            {
                "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "metadata": {"name": claim, "namespace": "default"},
                "spec": {
                    "accessModes": ["ReadWriteMany"], "storageClassName": "",
                    "volumeName": f"demo-{claim}", "resources": {"requests": {"storage": "50Gi"}},
                },
            },
        ]
    return objects


def secrets_of(services: list[dict]) -> list[dict]:
    """A Secret with a fresh random token for each authSecretRef the services name (KWOK's
    pods read none; a real cluster's would not start without it)."""
    keys: dict[str, set[str]] = {}
    for doc in services:
        if ref := (doc["spec"].get("server") or {}).get("authSecretRef"):
            keys.setdefault(ref["name"], set()).add(ref["key"])
    return [{"apiVersion": "v1", "kind": "Secret",
             "metadata": {"name": name, "namespace": "default"},
             "stringData": {key: secrets.token_hex(32) for key in sorted(keys[name])}}
            for name in sorted(keys)]


def start_operator(cluster: localcluster.LocalCluster) -> None:
    env = {**os.environ, "KUBECONFIG": str(cluster.operator_kubeconfig)}
    log = open(CLUSTER_DIR / "logs" / "operator.log", "ab")  # noqa: SIM115
    metrics_port, health_port = localcluster.free_ports(2)
    proc = subprocess.Popen(
        [str(VENV_BIN / "imagegen-operator"), "run", "--resync-seconds=5",
         f"--metrics-port={metrics_port}", f"--health-port={health_port}"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    # Registered with the cluster's processes, so `make cluster-down` stops it too.
    localcluster.register(CLUSTER_DIR, proc.pid, "imagegen-operator")


def show(cluster: localcluster.LocalCluster, *args: str) -> None:
    print(cluster.kubectl(*args).stdout, flush=True)


def generate_images(model_dir: Path, out_dir: Path) -> None:
    """The server on a tiny model with one LoRA adapter, through the official openai client:
    a generation, the same with the adapter, an inpainting edit, and a streamed request."""
    import openai

    server = VENV_BIN / "imagegen-server"
    # The libraries' import-time notes (torchvision is not needed here) and progress bars
    # would bury the demo's own output; the server log keeps everything.
    quiet = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    subprocess.run([str(server), "make-tiny-model", str(model_dir), "--family", "sd15"],
                   check=True, env=quiet, stdout=subprocess.DEVNULL)
    lora_dir = model_dir.with_name(model_dir.name + "-lora-ink")
    subprocess.run([str(server), "make-tiny-model", str(lora_dir), "--lora-for", str(model_dir)],
                   check=True, env=quiet, stdout=subprocess.DEVNULL)
    port = localcluster.free_port()
    log = open(CLUSTER_DIR / "logs" / "server.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(server), "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT,
        env={**quiet, "IMAGEGEN_COMPILE_ENABLED": "false", "IMAGEGEN_DTYPE": "float32",
             "IMAGEGEN_LORAS": json.dumps([{"name": "ink", "uri": str(lora_dir)}])},
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
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        out_dir.mkdir(exist_ok=True)
        prompt = "a lighthouse on a cliff at dusk"

        def save(name: str, b64: str, what: str, started: float) -> None:
            path = out_dir / name
            path.write_bytes(base64.b64decode(b64))
            print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size} bytes, "
                  f"{time.monotonic() - started:.2f}s): {what}")

        started = time.monotonic()
        plain = client.images.generate(prompt=prompt, size="64x64",
                                       extra_body={"seed": 7, "steps": 4})
        save("demo.png", plain.data[0].b64_json, "images.generate", started)
        started = time.monotonic()
        styled = client.images.generate(prompt=prompt, size="64x64",
                                        extra_body={"seed": 7, "steps": 4,
                                                    "lora": [{"name": "ink", "scale": 0.8}]})
        save("demo-lora.png", styled.data[0].b64_json, "the same seed with the ink LoRA", started)
        started = time.monotonic()
        mask = io.BytesIO()
        white_left = Image.new("L", (64, 64), 0)
        white_left.paste(255, (0, 0, 32, 64))  # white: repainted
        white_left.save(mask, format="PNG")
        edited = client.images.edit(
            image=("demo.png", (out_dir / "demo.png").read_bytes(), "image/png"),
            mask=("mask.png", mask.getvalue(), "image/png"), prompt="a red boat",
            extra_body={"seed": 8, "steps": 4},
        )
        save("demo-edit.png", edited.data[0].b64_json, "images.edit, left half repainted", started)
        started = time.monotonic()
        events = list(client.images.generate(prompt=prompt, size="64x64", stream=True,
                                             partial_images=2,
                                             extra_body={"seed": 7, "steps": 6}))
        print(f"streamed in {time.monotonic() - started:.2f}s: "
              + ", ".join(e.type for e in events))
        with urllib.request.urlopen(f"{base}/metrics") as r:
            wanted = ("imagegen_images_generated_total", "imagegen_requests_total")
            for line in r.read().decode().splitlines():
                if line.startswith(wanted):
                    print("  " + line)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # the error that brought us here stays the one shown
            proc.kill()
            proc.wait(timeout=30)


def main() -> int:
    step("Starting the local control plane (first run builds it: several minutes)")
    cluster = localcluster.up(CLUSTER_DIR)
    print(f"API server {cluster.server}; kubeconfig {cluster.kubeconfig.relative_to(ROOT)}")

    step("Installing the ImageGenService CRD and starting the operator (Local provider)")
    cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
    cluster.wait_established("imagegenservices.imagegen.dev")
    services = [doc for _, doc in local_examples()]
    claims = set().union(*(claims_of(doc) for doc in services))
    cluster.kubectl("apply", "-f", "-",
                    input=yaml.safe_dump_all(volumes(claims) + secrets_of(services)))
    start_operator(cluster)

    examples = sorted({path for path, _ in local_examples()})
    step("Applying the Local services of " + ", ".join(str(p.relative_to(ROOT)) for p in examples))
    print(cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(services)).stdout.strip())
    names = [doc["metadata"]["name"] for doc in services]
    cluster.kubectl("wait", "--for=condition=Ready", "--timeout=180s",
                    *[f"igs/{n}" for n in names], timeout=200)

    step("Every service is Ready; pods packed onto shared (simulated) GPUs")
    show(cluster, "get", "igs", "-o", "wide")
    show(cluster, "get", "nodes", "-L", "cloud.google.com/gke-accelerator",
         "-L", "cloud.google.com/gke-gpu-sharing-strategy",
         "-L", "cloud.google.com/gke-max-shared-clients-per-gpu",
         "-o", "custom-columns=NODE:.metadata.name,"
         "GPU:.metadata.labels.cloud\\.google\\.com/gke-accelerator,"
         "MIG:.metadata.labels.cloud\\.google\\.com/gke-gpu-partition-size,"
         "SHARING:.metadata.labels.cloud\\.google\\.com/gke-gpu-sharing-strategy,"
         "CLIENTS:.metadata.labels.cloud\\.google\\.com/gke-max-shared-clients-per-gpu,"
         "GPU-SLOTS:.status.allocatable.nvidia\\.com/gpu")
    show(cluster, "get", "pods", "-o", "wide")

    step("The capacity math behind it (imagegen-operator plan)")
    plan = subprocess.run([str(VENV_BIN / "imagegen-operator"), "plan",
                           *[a for p in examples for a in ("-f", str(p))]],
                          check=True, capture_output=True, text=True)
    print(plan.stdout)

    step("The inference server on a tiny random-weight pipeline (CPU), with a LoRA")
    generate_images(CLUSTER_DIR / "demo-model", OUTPUT)

    step("Done")
    print(f"export KUBECONFIG={cluster.kubeconfig}; export PATH={cluster.bin}:$PATH")
    print("kubectl get igs,deploy,pods   # explore; `make cluster-down` stops everything")
    return 0


if __name__ == "__main__":
    sys.exit(main())
