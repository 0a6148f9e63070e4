"""The ``imagegen-operator`` command line: render and plan, offline."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from imagegen_operator.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "data" / "golden"
H100 = GOLDEN / "mig-timesharing-gke" / "input.yaml"
L4_MPS = GOLDEN / "mps-configconnector" / "input.yaml"
REFUSED = GOLDEN / "refused" / "flux-on-1g10gb.yaml"


def run(*argv: str, stdin: str | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    if stdin is not None:
        old, sys.stdin = sys.stdin, io.StringIO(stdin)
    try:
        status = main(list(argv), out=out, err=err)
    finally:
        if stdin is not None:
            sys.stdin = old
    return status, out.getvalue(), err.getvalue()


def test_render_refuses_a_deployment_that_cannot_run() -> None:
    """Issue 4, must show: non-zero exit, nothing printed, a message naming the fields."""
    status, out, err = run("render", "-f", str(REFUSED))
    assert status == 1
    assert out == ""
    assert "team-a/flux cannot run" in err
    assert "ModelDoesNotFitSlice" in err
    for field in ("spec.gpu.partitionSize", "spec.gpu.sharing.maxSharedClientsPerGpu"):
        assert field in err


def test_render_prints_nothing_if_any_service_in_the_files_cannot_run() -> None:
    status, out, err = run("render", "-f", str(H100), "-f", str(REFUSED))
    assert (status, out) == (1, "") and "flux" in err and "sd15-small" not in err


def test_render_reads_stdin_and_skips_other_kinds() -> None:
    text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n---\n" + L4_MPS.read_text()
    status, out, _ = run("render", "-f", "-", stdin=text)
    assert status == 0
    assert out == (GOLDEN / "mps-configconnector" / "expected.yaml").read_text()


@pytest.mark.parametrize(
    "text, message",
    [
        ("kind: ConfigMap\n", "no ImageGenService objects"),
        (
            L4_MPS.read_text().replace(
                "sharing: {strategy: MPS", "partitionSize: 1g.10gb\n    sharing: {strategy: MPS"
            ),
            "spec.gpu.partitionSize",
        ),
        ("kind: [unclosed\n", "-:"),
        (  # the CRD's list-map refuses it on a cluster; render must too
            "apiVersion: imagegen.dev/v1alpha1\nkind: ImageGenService\nmetadata: {name: ink}\n"
            "spec:\n  model:\n    uri: gs://bucket/sdxl\n    loras: [{name: a, uri: gs://bucket/a.safetensors},"
            " {name: a, uri: gs://bucket/b.safetensors}]\n  gpu: {type: nvidia-l4}\n",
            "spec.model.loras: names must be unique; given more than once: a",
        ),
        ("kind: List\nitems: 5\n", "-: a List's items must be a list of objects"),
        (
            "apiVersion: imagegen.dev/v1alpha1\nkind: ImageGenService\nmetadata: oops\nspec: {}\n",
            "ImageGenService ?: metadata: Input should be a valid dictionary",
        ),
    ],
    ids=["no-services", "invalid-spec", "bad-yaml", "duplicate-lora-names", "list-of-no-list",
         "metadata-not-a-mapping"],
)
def test_bad_input_is_an_error_that_says_where(text: str, message: str) -> None:
    status, out, err = run("render", "-f", "-", stdin=text)
    assert status == 1 and out == ""
    assert message in err and "Traceback" not in err


def test_missing_file() -> None:
    status, _, err = run("plan", "-f", "/nonexistent/file.yaml")
    assert status == 1 and "/nonexistent/file.yaml" in err


def test_plan_table_shows_the_capacity_math() -> None:
    status, out, _ = run("plan", "-f", str(H100))
    assert status == 0
    assert "ImageGenService team-a/sd15-small" in out
    assert "mig:1g.10gb+ts:2: 7 partition(s) x 2 client(s) = 14 slot(s) per GPU" in out
    assert "machine a3-highgpu-1g" in out
    assert "igs-h100x1-mig1g10gb-ts2" in out
    assert "vs 4.87 GiB per slot" in out  # an H100 1g.10gb slice: 9.75 GiB, for two
    assert "on-demand" in out and "Spot" in out and "estimate" in out


def test_plan_table_lists_findings() -> None:
    status, out, _ = run("plan", "-f", str(REFUSED))
    assert status == 1  # the whole report, and the status render gives the same spec
    assert "error: ModelDoesNotFitSlice" in out
    assert "info: FootprintEstimated" in out


def test_plan_table_marks_warnings() -> None:
    status, out, _ = run(
        "plan", "-f", "-", stdin=H100.read_text().replace("memoryGiB: 4", "memoryGiB: 4.8")
    )
    assert status == 0 and "warning: ModelFitsTightly" in out


def test_plan_json() -> None:
    status, out, _ = run("plan", "-f", str(L4_MPS), "-o", "json")
    assert status == 0
    [entry] = json.loads(out)
    assert (entry["name"], entry["namespace"]) == ("sd15-mps", "team-b")
    p = entry["plan"]
    # The API's dialect: status says slotsPerGpu, so does the plan.
    assert p["slotsPerGpu"] == 4 and p["mpsThreadPercentage"] == 25
    assert p["mpsPinnedMemoryMiB"] == 23034 // 4 and p["workable"] is True
    assert p["cost"]["onDemand"] > p["cost"]["spot"] > 0

    def keys(value):
        if isinstance(value, dict):
            return set(value) | {k for v in value.values() for k in keys(v)}
        if isinstance(value, list):
            return {k for v in value for k in keys(v)}
        return set()

    assert [k for k in keys(p) if "_" in k] == []


def test_plan_of_a_flex_start_pool() -> None:
    example = ROOT / "examples" / "h100-flex-start.yaml"
    status, out, _ = run("plan", "-f", str(example))
    assert status == 0
    assert "igs-h100x1-mig3g40gb-flex" in out and ", Flex-start" in out
    assert ", in us-central1-a, us-central1-c" in out  # the zones that have the GPU
    # No price table for the Dynamic Workload Scheduler: the nominal on-demand rate bounds it.
    assert "at most $" in out and "Flex-start (the nominal on-demand rate)" in out
    assert "Spot for" not in out and "run at most 7 days" in out
    assert "FlexStartOnOneNode" not in out  # the example keeps two nodes
    assert "for 2 node(s)" in out  # what minNodes keeps running, not the one the pods need
    status, out, _ = run("plan", "-f", "-", stdin=example.read_text().replace(
        "minNodes: 2", "minNodes: 0"))
    assert "warning: FlexStartOnOneNode [spec.nodePool.minNodes]" in out
    status, out, _ = run("plan", "-f", str(example), "-o", "json")
    assert json.loads(out)[0]["plan"]["flexStart"] is True


def test_plan_says_what_a_dense_pool_is_made_for() -> None:
    dense = ROOT / "tests" / "data" / "golden" / "dense-configconnector" / "input.yaml"
    status, out, _ = run("plan", "-f", str(dense))
    assert status == 0 and "112 per node" in out
    assert ", made for 128 pods a node" in out and "TooManyPodsPerNode" not in out
    # Existing: the pool is not the operator's to make, and keeps GKE's default.
    status, out, _ = run("plan", "-f", "-", stdin=dense.read_text().replace(
        "provider: ConfigConnector", "provider: Existing").replace(
        "    cluster: projects/demo-project/locations/us-central1/clusters/inference\n", ""))
    assert status == 0, out
    assert "made for" not in out and "warning: TooManyPodsPerNode" in out


def test_plan_reads_what_kubectl_get_prints() -> None:
    import yaml

    listed = yaml.safe_dump({"apiVersion": "v1", "kind": "List",
                             "items": [yaml.safe_load(H100.read_text())]})
    status, out, _ = run("plan", "-f", "-", "-o", "json", stdin=listed)
    assert status == 0 and json.loads(out)[0]["name"] == "sd15-small"
    example = ROOT / "examples" / "a100-autoscaling.yaml"  # no namespace: kubectl's default
    status, out, _ = run("plan", "-f", str(example), "-o", "json")
    assert json.loads(out)[0]["namespace"] == "default"


SHARED = """
apiVersion: imagegen.dev/v1alpha1
kind: ImageGenService
metadata: {name: NAME, namespace: ml}
spec:
  model: {uri: gs://bkt/models/m, family: SD15, memoryGiB: 4}
  gpu: {type: nvidia-l4}
  nodePool: {provider: ConfigConnector, maxNodes: MAX,
             cluster: projects/imagegen-prod/locations/us-central1/clusters/serving}
  replicas: REPLICAS
  server: {authSecretRef: {name: token, key: token}}
"""


def shared(*services: tuple[str, int, int]) -> str:
    return "---".join(SHARED.replace("NAME", n).replace("MAX", str(m)).replace(
        "REPLICAS", str(r)) for n, m, r in services)


def test_render_prints_a_shared_pool_once_and_refuses_two_services_of_one_name() -> None:
    status, out, err = run("render", "-f", "-", stdin=shared(("a", 3, 2), ("b", 3, 1)))
    assert status == 0 and out.count("kind: ContainerNodePool") == 1 and not err
    status, out, err = run("render", "-f", "-", stdin=shared(("a", 3, 2), ("b", 4, 1)))
    assert status == 0 and out.count("kind: ContainerNodePool") == 1
    assert "note: ContainerNodePool ml/igs-l4x1 is shared" in err
    status, out, err = run("render", "-f", "-", stdin=shared(("a", 3, 2), ("a", 3, 1)))
    assert status == 1 and out == ""
    assert "error: Deployment ml/a is rendered twice" in err


def test_run_subcommand_is_wired_and_passes_its_arguments(monkeypatch) -> None:
    """``run`` hands its arguments to imagegen_operator.handlers.run, imported only then."""
    import types

    received = []
    handlers = types.ModuleType("imagegen_operator.handlers")
    handlers.run = lambda argv: received.append(argv) or 0
    monkeypatch.setitem(sys.modules, "imagegen_operator.handlers", handlers)
    # Another test may have imported the real module, which then is also an attribute
    # of the package: ``from imagegen_operator import handlers`` reads that first.
    import imagegen_operator

    monkeypatch.setattr(imagegen_operator, "handlers", handlers, raising=False)
    assert run("run", "--standalone", "-n", "ns")[0] == 0
    assert received == [["--standalone", "-n", "ns"]]


def test_unknown_options_are_still_errors_for_render() -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser()  # the parser itself builds
        main(["render", "-f", str(H100), "--bogus"], out=io.StringIO(), err=io.StringIO())
    assert exit_.value.code == 2


def test_console_entry_point_is_offline_and_byte_stable(tmp_path: Path) -> None:
    """The module a console script calls: no kopf or Kubernetes client loaded, same bytes."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'operator'}{os.pathsep}{ROOT / 'inference_image'}"}
    env.pop("KUBECONFIG", None)
    code = (
        "import sys; from imagegen_operator.cli import main; rc = main(sys.argv[1:]);"
        "loaded = [m for m in ('kopf', 'kubernetes', 'torch') if m in sys.modules];"
        "sys.stderr.write(repr(loaded)); sys.exit(rc)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "render", "-f", str(H100)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "[]"
    assert result.stdout == (GOLDEN / "mig-timesharing-gke" / "expected.yaml").read_text()


def test_render_warns_on_stderr_and_keeps_stdout_exact(tmp_path: Path) -> None:
    text = H100.read_text().replace("maxNodes: 2", "maxNodes: 1")
    status, out, err = run("render", "-f", "-", stdin=text)
    assert status == 0
    assert "warning: ImageGenService team-a/sd15-small: PoolTooSmall" in err
    assert "spec.nodePool.maxNodes" in err
    assert out.startswith("---\n") and "warning" not in out


@pytest.mark.parametrize("command", ["render", "plan"])
def test_a_file_that_fixes_the_replicas_of_an_autoscaled_service_is_warned(command) -> None:
    # The autoscaler writes spec.replicas; Argo CD's selfHeal would write the file's back.
    gitops = ROOT / "examples" / "gitops" / "services" / "sd15-l4-mps.yaml"
    text = gitops.read_text()
    assert "\n  replicas:" not in text  # the example leaves it out
    cluster = "projects/my-project/locations/us-central1/clusters/serving"
    args = ["--cluster", cluster] if command == "render" else []
    assert run(command, "-f", "-", *args, stdin=text)[2] == ""
    fixed = text.replace("  autoscaling:", "  replicas: 2\n  autoscaling:")
    status, _, err = run(command, "-f", "-", *args, stdin=fixed)
    assert status == 0 and "ReplicasBesideAutoscaling [spec.replicas]" in err
    live = fixed.replace("  name: sd15\n", "  name: sd15\n  uid: 5f0c\n")
    assert run(command, "-f", "-", *args, stdin=live)[2] == ""  # kubectl get's, filled in


def test_render_refuses_settings_the_server_would_refuse(monkeypatch) -> None:
    from imagegen_operator.render import server_env

    derived = server_env.settings_values
    monkeypatch.setattr(server_env, "settings_values",
                        lambda r: {**derived(r), "allowed_sizes": ["16x16"]})
    status, out, err = run("render", "-f", str(L4_MPS))
    assert (status, out) == (1, "")
    assert "would refuse its settings: allowed_sizes" in err and "Traceback" not in err


def test_render_is_quiet_about_notes() -> None:
    status, _, err = run("render", "-f", str(L4_MPS))  # footprint estimated: a note only
    assert (status, err) == (0, "")


def test_server_image_flag_applies_only_where_the_spec_sets_none() -> None:
    image = "registry.example.com/imagegen-server:9.9"
    _, unset, _ = run("render", "-f", str(L4_MPS), "--server-image", image)
    spot = GOLDEN / "timesharing-spot-gke" / "input.yaml"
    _, preset, _ = run("render", "-f", str(spot), "--server-image", image)
    assert f"image: {image}" in unset
    assert image not in preset and "image: registry.example.com/imagegen-server:1.2.3" in preset


def test_render_defaults_to_the_server_image_the_operator_would_use(monkeypatch) -> None:
    monkeypatch.delenv("IMAGEGEN_OPERATOR_SERVER_IMAGE", raising=False)
    _, plain, _ = run("render", "-f", str(L4_MPS))
    assert "image: ghcr.io/imagegen-operator/imagegen-server:" in plain
    image = "registry.example.com/imagegen-server:9.9"
    monkeypatch.setenv("IMAGEGEN_OPERATOR_SERVER_IMAGE", image)  # the operator's own
    assert run("render", "-f", str(L4_MPS))[1] == run(
        "render", "-f", str(L4_MPS), "--server-image", image)[1]
    assert f"image: {image}" in run("render", "-f", str(L4_MPS))[1]


MINIMAL = """apiVersion: imagegen.dev/v1alpha1
kind: ImageGenService
metadata: {name: minimal, namespace: team-a}
spec:
  model: {uri: gs://models/sd15}
  gpu: {type: nvidia-l4}
"""


def test_render_of_a_minimal_spec_asks_for_the_cluster_the_operator_would_use(
        monkeypatch) -> None:
    monkeypatch.delenv("IMAGEGEN_GKE_CLUSTER", raising=False)
    status, out, err = run("render", "-f", "-", stdin=MINIMAL)
    assert (status, out) == (1, "")
    assert "spec.nodePool.cluster is unset" in err and "--cluster" in err
    cluster = "projects/my-project/locations/us-central1/clusters/serving"
    status, out, _ = run("render", "-f", "-", "--cluster", cluster, stdin=MINIMAL)
    assert status == 0
    assert f"container.googleapis.com/parent: {cluster}" in out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["render", "-f", "-", "--cluster", "serving"])
    # Zones are held to the cluster given, as the operator holds them to its own.
    zoned = MINIMAL + "  nodePool: {locations: [europe-west4-a]}\n"
    status, out, err = run("render", "-f", "-", "--cluster", cluster, stdin=zoned)
    assert (status, out) == (1, "")
    assert "spec.nodePool.locations names europe-west4-a, outside the region" in err
    status, out, _ = run("render", "-f", "-", "--cluster", cluster,
                         stdin=zoned.replace("europe-west4-a", "us-central1-f"))
    assert status == 0 and "- us-central1-f" in out
    # A spec naming another cluster than --cluster is refused, as the operator running in
    # that cluster refuses it (ForeignCluster); naming the same one renders.
    other = "projects/other-project/locations/europe-west4/clusters/d"
    named = MINIMAL + f"  nodePool: {{cluster: {other}}}\n"
    status, out, err = run("render", "-f", "-", "--cluster", cluster, stdin=named)
    assert (status, out) == (1, "")
    assert f"spec.nodePool.cluster names {other}, but the operator runs in {cluster}" in err
    status, out, _ = run("render", "-f", "-", "--cluster", other, stdin=named)
    assert status == 0 and f"container.googleapis.com/parent: {other}" in out


def test_render_names_the_nodes_account_the_operator_would_give_its_pools(monkeypatch) -> None:
    monkeypatch.delenv("IMAGEGEN_GKE_NODE_SERVICE_ACCOUNT", raising=False)
    cluster = "projects/my-project/locations/us-central1/clusters/serving"
    _, plain, _ = run("render", "-f", "-", "--cluster", cluster, stdin=MINIMAL)
    assert "serviceAccount" not in plain  # GKE's default
    account = "gpu-nodes@my-project.iam.gserviceaccount.com"
    status, out, _ = run("render", "-f", "-", "--cluster", cluster,
                         "--node-service-account", account, stdin=MINIMAL)
    assert status == 0 and f"serviceAccount: {account}" in out
    monkeypatch.setenv("IMAGEGEN_GKE_NODE_SERVICE_ACCOUNT", account)  # the operator's own
    assert run("render", "-f", "-", "--cluster", cluster, stdin=MINIMAL)[1] == out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["render", "-f", "-", "--node-service-account", "gpu-nodes"])


def test_the_readmes_example_plans_and_renders() -> None:
    """The front door's spec is one a user can apply: nothing in it is refused."""
    readme = (ROOT / "README.md").read_text()
    example = readme.split("## An example\n\n```yaml\n", 1)[1].split("```", 1)[0]
    status, out, err = run("plan", "-f", "-", stdin=example)
    assert status == 0, err
    assert "error:" not in out and "warning:" not in out
    assert "4 slot(s) per GPU" in out  # what its comments say: four pods on one H100
    assert "no on-demand, $2.69 Spot" in out  # a3-highgpu-1g: Spot or Flex-start only
    cluster = "projects/my-project/locations/us-central1/clusters/serving"
    status, out, err = run("render", "-f", "-", "--cluster", cluster, stdin=example)
    assert status == 0 and "kind: Deployment" in out, err


def test_a_machine_compute_engine_sells_only_as_spot_has_no_on_demand_price_at_max_nodes():
    spec = (ROOT / "examples" / "h100-mig-sdxl-int8-compiled.yaml").read_text()
    status, out, err = run("plan", "-f", "-", stdin=spec)
    assert status == 0, err
    first = out.split("\n\n")[0]  # sdxl-int8: on-demand a3-highgpu-1g, a simulated pool
    assert "machine a3-highgpu-1g" in first
    assert "no on-demand, $2.69 Spot for 1 node(s); at maxNodes no on-demand\n" in first


def test_plan_says_nothing_of_max_nodes_for_an_existing_pool() -> None:
    status, out, _ = run("plan", "-f", str(ROOT / "examples" / "existing-t4.yaml"))
    assert status == 0 and "node pool    t4-shared" in out
    assert "maxNodes" not in out and "None" not in out
