"""The Deployment, Service, PDB, HPA and monitors, field by field."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from imagegen_operator import api
from imagegen_operator.planner import plan
from imagegen_operator.render import UnworkableSpec, render_all, render_workload
from imagegen_operator.render.autoscaling import QUEUE_DEPTH_METRIC, render_hpa
from imagegen_operator.render.deployment import mps_pinned_memory_limit, render_deployment
from imagegen_operator.render.monitoring import render_monitor, requested_monitors
from imagegen_operator.render.pdb import render_pdb
from imagegen_operator.render.server_env import server_env, settings_values
from imagegen_operator.render.service import endpoint, render_service
from imagegen_server.config import ServerSettings, env_var_name

BASE: dict[str, Any] = yaml.safe_load(
    """
apiVersion: imagegen.dev/v1alpha1
kind: ImageGenService
metadata: {name: svc, namespace: team-a}
spec:
  model: {uri: gs://bucket/models/sd15, family: SD15, memoryGiB: 4}
  gpu: {type: nvidia-l4}
  nodePool: {provider: Existing}
  replicas: 2
"""
)


def resource(**spec: Any) -> api.ImageGenService:
    body = copy.deepcopy(BASE)
    for key, value in spec.items():
        body["spec"][key] = value
    return api.parse(body)


def deployment(r: api.ImageGenService) -> dict[str, Any]:
    return render_deployment(r, plan(r.spec))


def pod_spec(r: api.ImageGenService) -> dict[str, Any]:
    return deployment(r)["spec"]["template"]["spec"]


def env_of(r: api.ImageGenService) -> dict[str, str]:
    return {e["name"]: e["value"] for e in pod_spec(r)["containers"][0]["env"]}


# --- scheduling ---------------------------------------------------------------------

H100_MIG_TS2 = {
    "type": "nvidia-h100-80gb",
    "partitionSize": "1g.10gb",
    "sharing": {"strategy": "TimeSharing", "maxSharedClientsPerGpu": 2},
}


@pytest.mark.parametrize(
    "gpu, selector",
    [
        (
            H100_MIG_TS2,
            {
                "cloud.google.com/gke-accelerator": "nvidia-h100-80gb",
                "cloud.google.com/gke-gpu-partition-size": "1g.10gb",
                "cloud.google.com/gke-gpu-sharing-strategy": "time-sharing",
                "cloud.google.com/gke-max-shared-clients-per-gpu": "2",
            },
        ),
        (
            {"type": "nvidia-l4", "sharing": {"strategy": "MPS", "maxSharedClientsPerGpu": 4}},
            {
                "cloud.google.com/gke-accelerator": "nvidia-l4",
                "cloud.google.com/gke-gpu-sharing-strategy": "mps",
                "cloud.google.com/gke-max-shared-clients-per-gpu": "4",
            },
        ),
        (
            {"type": "nvidia-tesla-a100", "partitionSize": "3g.20gb"},
            {
                "cloud.google.com/gke-accelerator": "nvidia-tesla-a100",
                "cloud.google.com/gke-gpu-partition-size": "3g.20gb",
            },
        ),
        ({"type": "nvidia-tesla-t4"}, {"cloud.google.com/gke-accelerator": "nvidia-tesla-t4"}),
    ],
    ids=["mig+time-sharing", "mps", "mig", "exclusive"],
)
def test_node_selector_is_exactly_gkes_labels(gpu: dict, selector: dict) -> None:
    """Issue 4, must show: the H100 1g.10gb ts2 selectors (and every other mode's)."""
    assert pod_spec(resource(gpu=gpu))["nodeSelector"] == selector


@pytest.mark.parametrize("gpu", [H100_MIG_TS2, {"type": "nvidia-l4"}])
def test_every_pod_asks_for_exactly_one_gpu_and_tolerates_the_taint(gpu: dict) -> None:
    spec = pod_spec(resource(gpu=gpu))
    resources = spec["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert resources["requests"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]


def test_spot_and_flex_start_pods_tolerate_their_nodes_taint_and_no_others() -> None:
    def extra(node_pool: dict) -> list[str]:
        spec = pod_spec(resource(nodePool={"provider": "Existing", **node_pool}))
        return [t["key"] for t in spec["tolerations"] if t["key"] != "nvidia.com/gpu"]

    # Pools made by node auto-provisioning may taint their Spot nodes.
    assert extra({"spot": True}) == ["cloud.google.com/gke-spot"]
    assert extra({}) == []
    # Flex-start nodes too: those of a pool the GKE provider makes.
    spec = pod_spec(resource(nodePool={"provider": "GKE", "flexStart": True, "minNodes": 2,
                                       "cluster": "projects/proj-1/locations/l/clusters/c"}))
    assert [t["key"] for t in spec["tolerations"] if t["key"] != "nvidia.com/gpu"] == [
        "cloud.google.com/gke-flex-start"]


def test_user_resources_are_kept_next_to_the_gpu() -> None:
    r = resource(server={"resources": {"requests": {"cpu": "2", "memory": "8Gi"}}})
    resources = pod_spec(r)["containers"][0]["resources"]
    assert resources["requests"] == {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": 1}


def test_mps_pod_sets_host_ipc_and_per_client_limits() -> None:
    """Issue 4, must show: L4 MPS 4 -> hostIPC, 25%, a quarter of the memory pinned."""
    r = resource(
        gpu={"type": "nvidia-l4", "sharing": {"strategy": "MPS", "maxSharedClientsPerGpu": 4}}
    )
    assert pod_spec(r)["hostIPC"] is True
    env = env_of(r)
    assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "25"
    assert env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=5758M"  # 23034 MiB / 4


@pytest.mark.parametrize("gpu", [H100_MIG_TS2, {"type": "nvidia-tesla-t4"}])
def test_pods_without_mps_keep_host_ipc_off(gpu: dict) -> None:
    spec = pod_spec(resource(gpu=gpu))
    assert "hostIPC" not in spec
    assert not any(e["name"].startswith("CUDA_MPS") for e in spec["containers"][0]["env"])


@pytest.mark.parametrize("mib, value", [(6144, "0=6G"), (17920, "0=17920M"), (512, "0=512M")])
def test_pinned_memory_limit_format(mib: int, value: str) -> None:
    assert mps_pinned_memory_limit(mib) == value


def test_topology_spread_is_soft_over_nodes_and_zones() -> None:
    constraints = pod_spec(resource())["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in constraints} == {
        "kubernetes.io/hostname",
        "topology.kubernetes.io/zone",
    }
    assert all(c["whenUnsatisfiable"] == "ScheduleAnyway" for c in constraints)


# --- security and probes ------------------------------------------------------------


SURGE, ONE_AT_A_TIME = {"maxSurge": 1, "maxUnavailable": 0}, {"maxSurge": 0, "maxUnavailable": 1}


@pytest.mark.parametrize(("replicas", "autoscaling", "moving", "update"), [
    (3, None, False, SURGE),  # a slot left for the surge pod
    (4, None, False, ONE_AT_A_TIME),  # the pool full at maxNodes
    (4, None, True, SURGE),  # moving to a new pool: the old pods hold none of its slots
    # Autoscaled: spec.replicas is the autoscaler's count now, not its most.
    (2, {"minReplicas": 1, "maxReplicas": 4}, False, SURGE),
    (4, {"minReplicas": 1, "maxReplicas": 4}, False, ONE_AT_A_TIME),
])
def test_a_rollout_surges_only_where_the_pool_has_a_slot_for_it(replicas, autoscaling, moving,
                                                                 update) -> None:
    spec = {"gpu": {"type": "nvidia-l4", "sharing": {"strategy": "MPS",
                                                     "maxSharedClientsPerGpu": 2}},
            "nodePool": {"provider": "Local", "maxNodes": 2}, "replicas": replicas}
    if autoscaling:
        spec["autoscaling"] = autoscaling
    r = resource(**spec)
    assert plan(r.spec).replicas_at_max_nodes == 4
    rendered = render_deployment(r, plan(r.spec), moving=moving)
    assert rendered["spec"]["strategy"]["rollingUpdate"] == update


MPS2_L4 = {"type": "nvidia-l4", "sharing": {"strategy": "MPS", "maxSharedClientsPerGpu": 2}}


@pytest.mark.parametrize(("spec", "update"), [
    # The autoscaler's minimum runs, not spec.replicas below it: 4 fill the pool's 4.
    ({"replicas": 1, "autoscaling": {"minReplicas": 4, "maxReplicas": 4},
      "nodePool": {"provider": "GKE", "maxNodes": 2}}, ONE_AT_A_TIME),
    # 6 on a pool holding 2: 4 Pending, which the controller takes first (no slot freed);
    # one more than them lets a running pod go for a new one.
    ({"replicas": 6, "nodePool": {"provider": "GKE", "maxNodes": 1}},
     {"maxSurge": 0, "maxUnavailable": 5}),
    # A Local pool adds no node for a Pending pod: it holds the node it made, not maxNodes.
    ({"replicas": 2, "nodePool": {"provider": "Local", "maxNodes": 4}}, ONE_AT_A_TIME),
    ({"replicas": 2, "autoscaling": {"minReplicas": 1, "maxReplicas": 4},
      "nodePool": {"provider": "Local", "maxNodes": 4}}, SURGE),  # nodes for 4 made
])
def test_a_rollout_counts_the_pods_that_run_in_the_pool_as_it_is(spec, update) -> None:
    r = resource(gpu=MPS2_L4, **spec)
    rendered = render_deployment(r, plan(r.spec))
    assert rendered["spec"]["strategy"]["rollingUpdate"] == update


def test_a_rollout_on_a_shared_pool_past_full_takes_one_running_pod_at_a_time() -> None:
    # Whose pods wait Pending is not known: a neighbour's may take every slot freed.
    r = resource(gpu=MPS2_L4, replicas=4, nodePool={"provider": "GKE", "maxNodes": 2})
    rendered = render_deployment(r, plan(r.spec), neighbours=4, holds=4)
    assert rendered["spec"]["strategy"]["rollingUpdate"] == ONE_AT_A_TIME


def test_restricted_security_context() -> None:
    spec = pod_spec(resource())
    pod, container = spec["securityContext"], spec["containers"][0]["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"] == {"drop": ["ALL"]}
    assert container["readOnlyRootFilesystem"] is True
    assert spec["automountServiceAccountToken"] is False
    writable = {m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    assert {"/tmp", "/var/cache/imagegen"} <= writable


def test_the_grace_period_holds_the_pause_the_drain_and_the_last_answers() -> None:
    from imagegen_server.config import SHUTDOWN_FLUSH_S

    spec = pod_spec(resource())
    container = spec["containers"][0]
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(env_of(resource())[env_var_name("drain_timeout_s")])  # rendered, not a default
    assert pause > 0
    # The kubelet counts the preStop pause inside the grace period; SIGKILL comes at its end.
    assert spec["terminationGracePeriodSeconds"] >= pause + drain + SHUTDOWN_FLUSH_S + 10


def test_request_limits_reach_the_server_as_it_reads_them(monkeypatch) -> None:
    limits = {"sizes": ["1024x1024", "768x1344"], "maxPixels": 1024 * 1344, "maxSteps": 60,
              "maxImagesPerRequest": 2}
    rendered = env_of(resource(pipeline={"limits": limits}))
    for name, value in rendered.items():
        monkeypatch.setenv(name, value)
    settings = ServerSettings()  # from the environment, as in the pod
    assert settings.allowed_sizes == limits["sizes"]
    assert settings.max_pixels == limits["maxPixels"]
    assert settings.max_steps == 60 and settings.max_images_per_request == 2


def test_probes_use_the_server_routes() -> None:
    container = pod_spec(resource())["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # The server answers /healthz while it loads: only /readyz bounds the start.
    assert container["startupProbe"]["httpGet"]["path"] == "/readyz"


def startup_budget_s(r: api.ImageGenService) -> int:
    probe = pod_spec(r)["containers"][0]["startupProbe"]
    return probe["periodSeconds"] * probe["failureThreshold"]


def test_startup_probe_waits_longer_for_compile_warm_up() -> None:
    no_compile = resource(pipeline={"compile": {"enabled": False}})
    default = resource(pipeline={"compile": {"enabled": True, "mode": "default"}})
    autotune = resource(pipeline={"compile": {"enabled": True, "mode": "max-autotune"}})
    assert startup_budget_s(no_compile) >= 10 * 60
    assert startup_budget_s(no_compile) < startup_budget_s(default) < startup_budget_s(autotune)
    assert startup_budget_s(autotune) >= 45 * 60


# --- server configuration -------------------------------------------------------------


def test_env_comes_from_the_pipeline_spec_under_the_servers_own_names() -> None:
    r = resource(
        pipeline={
            "compile": {"enabled": True, "mode": "max-autotune", "regional": False},
            "attention": "Efficient",
            "stages": {
                "mode": "Stacked",
                "maxBatchSize": 8,
                "batchWindowMs": 20,
                "queueCapacity": 16,
            },
            "defaults": {"steps": 12, "guidanceScale": 3.5, "width": 768, "height": 512},
        }
    )
    env = env_of(r)
    expected = {
        "model": "gs://bucket/models/sd15",
        "family": "SD15",
        "compile_enabled": "true",
        "compile_mode": "max-autotune",
        "compile_regional": "false",
        "attention": "Efficient",
        "stage_mode": "Stacked",
        "max_batch_size": "8",
        "queue_capacity": "16",
        "default_steps": "12",
        "default_width": "768",
        "default_height": "512",
        "port": "8080",
    }
    for field, value in expected.items():
        assert env[env_var_name(field)] == value, field
    assert float(env[env_var_name("batch_window_ms")]) == 20
    assert float(env[env_var_name("default_guidance_scale")]) == 3.5


def test_quantization_and_the_denoiser_cache_reach_the_server_and_read_back() -> None:
    r = resource(
        model={"uri": "gs://bucket/models/flux", "family": "Flux", "quantization": "Float8"},
        pipeline={"cache": {"method": "FirstBlockCache", "threshold": 0.12}},
    )
    env = env_of(r)
    assert env["IMAGEGEN_QUANTIZATION"] == "Float8"
    assert env["IMAGEGEN_CACHE"] == "FirstBlockCache"
    # What the server reads from that environment is what the spec said.
    settings = ServerSettings(**{k: v for k, v in settings_values(r).items()})
    assert (settings.quantization.value, settings.cache.value, settings.cache_threshold) == (
        "Float8", "FirstBlockCache", 0.12)
    # Unset, neither is rendered: the server's defaults (None) hold.
    assert not {"IMAGEGEN_QUANTIZATION", "IMAGEGEN_CACHE"} & set(env_of(resource()))


def test_an_attention_cache_reaches_the_server_with_its_interval() -> None:
    r = resource(
        model={"uri": "gs://bucket/models/flux", "family": "Flux"},
        pipeline={"compile": {"enabled": False},
                  "cache": {"method": "PyramidAttentionBroadcast", "interval": 4}},
    )
    settings = ServerSettings(**settings_values(r))
    assert (settings.cache.value, settings.cache_interval) == ("PyramidAttentionBroadcast", 4)


def test_aot_reaches_the_server_and_is_off_unless_asked() -> None:
    compiled = {"compile": {"enabled": True, "aot": True, "cache": {"pvcName": "inductor"}}}
    settings = ServerSettings(**settings_values(resource(pipeline=compiled)))
    assert settings.compile_aot and settings.compile_enabled
    assert not ServerSettings(**settings_values(resource())).compile_aot


def test_every_rendered_setting_is_a_server_setting() -> None:
    """A renamed ServerSettings field breaks this test, not a pod."""
    values = settings_values(resource(server={"authSecretRef": {"name": "tok"}}))
    assert set(values) <= set(ServerSettings.model_fields)
    names = {e["name"] for e in server_env(resource())}
    assert names <= {env_var_name(f) for f in ServerSettings.model_fields}


def test_env_ignores_the_renderers_own_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    before = server_env(resource())
    monkeypatch.setenv("IMAGEGEN_QUEUE_CAPACITY", "999")
    monkeypatch.setenv("IMAGEGEN_LOG_LEVEL", "debug")
    assert server_env(resource()) == before


def test_model_volumes_follow_the_uri_scheme() -> None:
    gcs = deployment(resource())
    assert gcs["spec"]["template"]["metadata"]["annotations"] == {"gke-gcsfuse/volumes": "true"}
    [model] = [v for v in gcs["spec"]["template"]["spec"]["volumes"] if v["name"] == "model"]
    assert model["csi"]["volumeAttributes"]["bucketName"] == "bucket"

    pvc = resource(model={"uri": "pvc://weights/sd15", "memoryGiB": 4})
    spec = pod_spec(pvc)
    [model] = [v for v in spec["volumes"] if v["name"] == "model"]
    assert model["persistentVolumeClaim"] == {"claimName": "weights", "readOnly": True}
    [mount] = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "model"]
    assert mount["mountPath"] == env_of(pvc)[env_var_name("pvc_root")] + "/weights"

    hf = pod_spec(resource(model={"uri": "hf://org/name", "memoryGiB": 4}))
    assert not any(v["name"] == "model" for v in hf["volumes"])
    # Its download takes local disk, which the scheduler counts (no limit: a larger model
    # than the estimate is not evicted for it); a mounted model takes none.
    resources = hf["containers"][0]["resources"]
    assert resources["requests"]["ephemeral-storage"] == "13Gi"
    assert "ephemeral-storage" not in resources["limits"]
    assert "ephemeral-storage" not in spec["containers"][0]["resources"]["requests"]
    # A limit of the user's alone: Kubernetes makes it the request, and ours would exceed it.
    limited = pod_spec(resource(model={"uri": "hf://org/name", "memoryGiB": 4},
                                server={"resources": {"limits": {"ephemeral-storage": "10Gi"}}}))
    resources = limited["containers"][0]["resources"]
    assert "ephemeral-storage" not in resources["requests"]
    assert resources["limits"]["ephemeral-storage"] == "10Gi"


def test_compile_cache_and_auth_token_are_mounted_where_the_settings_point() -> None:
    r = resource(
        pipeline={"compile": {"enabled": True, "cache": {"pvcName": "inductor"}}},
        server={"authSecretRef": {"name": "tok", "key": "secret"}},
    )
    spec, env = pod_spec(r), env_of(r)
    mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["compile-cache"]["persistentVolumeClaim"]["claimName"] == "inductor"
    assert mounts["compile-cache"] == env[env_var_name("compile_cache_dir")]
    assert volumes["auth-token"]["secret"]["items"] == [{"key": "secret", "path": "token"}]
    assert env[env_var_name("auth_token_file")] == mounts["auth-token"] + "/token"
    assert env_var_name("auth_token") not in env  # the secret never travels as plain env


def test_image_pull_secrets_reach_the_serving_pods_and_the_precompile_job() -> None:
    r = resource(pipeline=PRECOMPILE, gpu=H100_MIG_TS2,
                 server={"image": "registry.example.com/team/imagegen-server:0.1.0",
                         "imagePullSecrets": [{"name": "registry"}]})
    for spec in (pod_spec(r), precompile_job(r)["spec"]["template"]["spec"]):
        assert spec["imagePullSecrets"] == [{"name": "registry"}]
    assert "imagePullSecrets" not in pod_spec(resource())


def test_a_precompile_job_is_made_anew_when_its_secrets_are_named_or_renamed() -> None:
    """A Job refused a gated model, or stuck on a misnamed Secret, holds a new service at 0
    replicas: the spec that fixes it must give a Job of another name."""
    def job_name(**model_or_server) -> str:
        model = {"uri": "hf://org/gated", "memoryGiB": 4, **model_or_server.get("model", {})}
        r = resource(model=model, pipeline=PRECOMPILE, gpu=H100_MIG_TS2,
                     server=model_or_server.get("server", {}))
        return precompile_job(r)["metadata"]["name"]

    names = {job_name(), job_name(model={"tokenSecretRef": {"name": "hf"}}),
             job_name(model={"tokenSecretRef": {"name": "hf2"}}),
             job_name(server={"imagePullSecrets": [{"name": "registry"}]})}
    assert len(names) == 4


def test_json_logs_are_a_setting_of_the_server() -> None:
    assert env_of(resource(server={"logFormat": "JSON"}))[env_var_name("log_format")] == "json"
    assert env_var_name("log_format") not in env_of(resource())  # the server's own default


def test_a_hub_token_is_a_file_the_server_and_its_precompile_job_read() -> None:
    """Gated hf:// models: the token travels as a mounted file, never as plain env."""
    r = resource(model={"uri": "hf://stabilityai/stable-diffusion-3.5-medium", "memoryGiB": 4,
                        "tokenSecretRef": {"name": "hf", "key": "hf_token"}},
                 pipeline=PRECOMPILE, gpu=H100_MIG_TS2)
    for spec, env in ((pod_spec(r), env_of(r)),
                      (precompile_job(r)["spec"]["template"]["spec"], None)):
        container = spec["containers"][0]
        env = env or {e["name"]: e.get("value") for e in container["env"]}
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["hf-token"]["secret"] == {
            "secretName": "hf", "items": [{"key": "hf_token", "path": "token"}],
            "defaultMode": 0o440}
        assert mounts["hf-token"]["readOnly"] is True
        assert env[env_var_name("hf_token_file")] == mounts["hf-token"]["mountPath"] + "/token"
        assert not [n for n in env if "HF_TOKEN" in n and n != env_var_name("hf_token_file")]
    assert env_var_name("hf_token_file") not in env_of(resource())


# --- the other objects ------------------------------------------------------------------


def test_labels_selector_and_owner_reference() -> None:
    body = copy.deepcopy(BASE)
    body["metadata"]["uid"] = "1234"
    r = api.parse(body)
    dep = deployment(r)
    selector = dep["spec"]["selector"]["matchLabels"]
    assert selector == {
        "app.kubernetes.io/name": "imagegen-server",
        "app.kubernetes.io/instance": "svc",
    }
    assert dep["spec"]["template"]["metadata"]["labels"].items() >= selector.items()
    assert dep["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "imagegen-operator"
    [owner] = dep["metadata"]["ownerReferences"]
    assert owner == {
        "apiVersion": "imagegen.dev/v1alpha1",
        "kind": "ImageGenService",
        "name": "svc",
        "uid": "1234",
        "controller": True,
        "blockOwnerDeletion": True,
    }
    assert "ownerReferences" not in deployment(resource())["metadata"]  # offline: no uid


def test_service_and_endpoint_use_the_server_port() -> None:
    r = resource(server={"port": 9000})
    svc = render_service(r)
    assert (
        svc["spec"]["ports"][0]["port"] == 9000 and svc["spec"]["ports"][0]["targetPort"] == "http"
    )
    assert svc["spec"]["selector"] == deployment(r)["spec"]["selector"]["matchLabels"]
    assert endpoint(r) == "http://svc.team-a.svc.cluster.local:9000"


@pytest.mark.parametrize(("replicas", "deployed"), [(None, 2), (1, 2), (3, 3), (0, 0)])
def test_an_autoscaled_service_starts_at_its_minimum(replicas, deployed) -> None:
    spec = {"autoscaling": {"minReplicas": 2, "maxReplicas": 6}}
    if replicas is not None:
        spec["replicas"] = replicas
    assert deployment(resource(**spec))["spec"]["replicas"] == deployed
    assert deployment(resource(replicas=1))["spec"]["replicas"] == 1  # no autoscaler


@pytest.mark.parametrize(("port", "sysctls"), [
    (8080, None), (1024, None),
    (80, [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "80"}]),
])
def test_a_port_below_1024_is_opened_to_the_non_root_server(port, sysctls) -> None:
    # The server runs as uid 10001 with every capability dropped: without the sysctl, a
    # bind to port 80 fails with EACCES and the pod never turns ready.
    pod = deployment(resource(server={"port": port}))["spec"]["template"]["spec"]
    assert pod["securityContext"].get("sysctls") == sysctls
    assert pod["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}


@pytest.mark.parametrize(("gpu", "per_node"), [
    ({"type": "nvidia-l4"}, 1),
    ({"type": "nvidia-h100-80gb", "partitionSize": "1g.10gb"}, 7),
    ({"type": "nvidia-l4", "sharing": {"strategy": "MPS", "maxSharedClientsPerGpu": 4}}, 4),
])
def test_pdb_lets_one_nodes_worth_of_pods_go_at_a_time(gpu, per_node) -> None:
    """The cluster autoscaler empties a node only if the budget lets all its pods go; but
    never every replica of a fixed count at once (two nodes drained together)."""
    for replicas, allowed in ((3 * per_node, per_node), (per_node, max(1, per_node - 1)),
                              (1, 1)):
        r = resource(gpu=gpu, replicas=replicas)
        pdb = render_pdb(r, plan(r.spec))
        assert pdb["spec"]["maxUnavailable"] == allowed, replicas
        assert pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"] == "svc"
    # An autoscaled count moves under the budget: one node's worth.
    r = resource(gpu=gpu, autoscaling={"minReplicas": 1, "maxReplicas": 2 * per_node})
    assert render_pdb(r, plan(r.spec))["spec"]["maxUnavailable"] == per_node


def test_pdb_counts_the_pods_a_node_holds_not_its_slots() -> None:
    """Pods asking 3.5 CPUs: a g2-standard-8 holds two of its four MPS slots' pods."""
    r = resource(gpu={"type": "nvidia-l4",
                      "sharing": {"strategy": "MPS", "maxSharedClientsPerGpu": 4}},
                 replicas=8, server={"resources": {"requests": {"cpu": "3500m"}}},
                 nodePool={"provider": "Local"})
    assert render_pdb(r, plan(r.spec))["spec"]["maxUnavailable"] == 2


@pytest.mark.parametrize(("replicas", "rolling"), [
    (1, {"maxSurge": 1, "maxUnavailable": 0}), (8, {"maxSurge": 1, "maxUnavailable": 1})])
def test_a_rollout_on_an_existing_pool_also_replaces_one_pod_at_a_time(replicas, rolling):
    """Its room is not known: a surge pod may find no slot, so one old pod goes as well, and
    the rollout goes on (one replica keeps serving until its successor is ready)."""
    r = resource(gpu={"type": "nvidia-tesla-t4"}, replicas=replicas,
                 nodePool={"provider": "Existing", "name": "t4-shared"})
    assert deployment(r)["spec"]["strategy"]["rollingUpdate"] == rolling


def test_mps_pods_share_the_hosts_dev_shm_with_the_mps_daemon() -> None:
    mps = pod_spec(resource(gpu={"type": "nvidia-l4",
                                 "sharing": {"strategy": "MPS", "maxSharedClientsPerGpu": 4}}))
    assert mps["hostIPC"] is True
    mounts = [m["mountPath"] for m in mps["containers"][0]["volumeMounts"]]
    assert "/dev/shm" not in mounts and "/tmp" in mounts
    whole = pod_spec(resource(gpu={"type": "nvidia-l4"}))
    assert "/dev/shm" in [m["mountPath"] for m in whole["containers"][0]["volumeMounts"]]


def test_hpa_scales_the_imagegenservice_on_queue_depth() -> None:
    assert render_hpa(resource()) is None
    hpa = render_hpa(
        resource(autoscaling={"minReplicas": 2, "maxReplicas": 9, "targetQueueDepth": 3})
    )
    spec = hpa["spec"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert spec["scaleTargetRef"] == {
        "apiVersion": "imagegen.dev/v1alpha1",
        "kind": "ImageGenService",
        "name": "svc",
    }
    assert (spec["minReplicas"], spec["maxReplicas"]) == (2, 9)
    [metric] = spec["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == QUEUE_DEPTH_METRIC
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "3"}


def test_monitors_render_only_on_request() -> None:
    r = resource()
    assert requested_monitors(r) == []
    service_monitor = render_monitor(r, "ServiceMonitor")
    pod_monitor = render_monitor(r, "PodMonitor", "15s")
    assert service_monitor["spec"]["endpoints"][0]["port"] == "http"
    assert pod_monitor["spec"]["podMetricsEndpoints"][0] == {
        "port": "http",
        "path": "/metrics",
        "interval": "15s",
        "scheme": "http",
    }
    with pytest.raises(ValueError, match="monitor kind"):
        render_monitor(r, "Probe")


def test_workload_objects_in_order() -> None:
    kinds = [o["kind"] for o in render_workload(resource(autoscaling={"maxReplicas": 4}))]
    assert kinds == ["Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"]


def test_render_refuses_a_model_that_does_not_fit() -> None:
    """Issue 4, must show: render refuses a Deployment that cannot run."""
    r = resource(gpu=H100_MIG_TS2, model={"uri": "hf://org/flux", "family": "Flux"})
    with pytest.raises(UnworkableSpec) as refused:
        render_all(r)
    assert [f.reason for f in refused.value.findings] == ["ModelDoesNotFitSlice"]
    assert "spec.gpu.partitionSize" in str(refused.value)


def test_monitor_labels_let_prometheus_select_it() -> None:
    monitor = render_monitor(resource(), "ServiceMonitor", labels={"release": "prometheus"})
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["metadata"]["labels"]["app.kubernetes.io/instance"] == "svc"


def test_scale_selector_string_matches_the_pod_labels() -> None:
    from imagegen_operator.render import selector_string

    r = resource()
    labels = deployment(r)["spec"]["template"]["metadata"]["labels"]
    pairs = dict(item.split("=") for item in selector_string(r).split(","))
    assert pairs and labels.items() >= pairs.items()


def test_hpa_metric_is_one_the_server_exports() -> None:
    """A renamed server metric breaks this test instead of silently stalling the autoscaler."""
    from imagegen_server.metrics import ServerMetrics

    exported = {family.name for family in ServerMetrics().registry.collect()}
    assert QUEUE_DEPTH_METRIC in exported


@pytest.mark.parametrize(
    "monitoring, kinds",
    [
        ({"kind": "PodMonitor", "interval": "15s", "labels": {"release": "kps"}}, ["PodMonitor"]),
        ({}, ["ServiceMonitor"]),
        ({"enabled": False, "kind": "PodMonitor"}, []),
        (None, []),
    ],
    ids=["pod-monitor", "defaults", "disabled", "absent"],
)
def test_spec_monitoring_block_picks_the_monitor(monitoring: dict, kinds: list) -> None:
    monitors = requested_monitors(resource(monitoring=monitoring))
    assert [m["kind"] for m in monitors] == kinds
    if kinds == ["PodMonitor"]:
        assert monitors[0]["spec"]["podMetricsEndpoints"][0]["interval"] == "15s"
        assert monitors[0]["metadata"]["labels"]["release"] == "kps"


# --- the precompile Job --------------------------------------------------------------

PRECOMPILE = {"compile": {"enabled": True, "cache": {"pvcName": "compile-cache"},
                          "precompileJob": True}}


def precompile_job(r: api.ImageGenService) -> dict[str, Any]:
    [job] = [o for o in render_workload(r) if o["kind"] == "Job"]
    return job


def test_the_precompile_job_runs_the_serving_pod_without_serving():
    r = resource(pipeline=PRECOMPILE, gpu=H100_MIG_TS2)
    job = precompile_job(r)
    pod, serving = job["spec"]["template"]["spec"], pod_spec(r)
    [container], [server] = pod["containers"], serving["containers"]
    assert container["args"] == ["precompile"] and pod["restartPolicy"] == "Never"
    # A Spot VM reclaimed under it is not the model failing: that pod's retry is not spent.
    [rule] = job["spec"]["podFailurePolicy"]["rules"]
    assert rule["action"] == "Ignore" and job["spec"]["backoffLimit"] == 1
    assert rule["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]
    # What decides what is compiled, and where it lands, is the serving pod's; but the Job
    # writes the cache the serving pods only read.
    for key in ("image", "resources", "securityContext"):
        assert container[key] == server[key], key
    read_only = env_var_name("compile_cache_read_only")
    assert container["env"] == [e for e in server["env"] if e["name"] != read_only]
    assert container["volumeMounts"] == [
        {k: v for k, v in m.items() if k != "readOnly" or m["name"] != "compile-cache"}
        for m in server["volumeMounts"]]
    for key in ("nodeSelector", "tolerations", "volumes", "securityContext"):
        assert pod[key] == serving[key], key
    assert not {"ports", "readinessProbe", "startupProbe", "livenessProbe"} & set(container)
    # The serving pods' selector does not pick the Job's pod: no traffic, no PDB count.
    selector = deployment(r)["spec"]["selector"]["matchLabels"]
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert not selector.items() <= labels.items()


def test_with_a_precompile_job_only_the_job_writes_the_compile_cache():
    """What starts load from the cache runs as code (inductor's pickles, AOT libraries): the
    serving pods, which take uploads from the network, mount it read-only and are told to
    write nothing there; without a Job they write it themselves."""
    def cache_mount(spec: dict) -> dict:
        [container] = spec["containers"]
        return next(m for m in container["volumeMounts"] if m["name"] == "compile-cache")

    read_only = env_var_name("compile_cache_read_only")
    r = resource(pipeline=PRECOMPILE)
    assert cache_mount(pod_spec(r))["readOnly"] is True and env_of(r)[read_only] == "true"
    job_pod = precompile_job(r)["spec"]["template"]["spec"]
    assert "readOnly" not in cache_mount(job_pod)
    assert read_only not in {e["name"] for e in job_pod["containers"][0]["env"]}
    alone = resource(pipeline={"compile": {"enabled": True, "cache": {"pvcName": "c"}}})
    assert "readOnly" not in cache_mount(pod_spec(alone)) and read_only not in env_of(alone)


def test_the_precompile_job_gets_none_of_the_serving_secrets():
    server = {"authSecretRef": {"name": "tok", "key": "token"},
              "provenance": {"signingSecretRef": {"name": "c2pa"}}}
    r = resource(pipeline=PRECOMPILE, gpu=H100_MIG_TS2, server=server)
    serving = pod_spec(r)
    names = {v["name"] for v in serving["volumes"]}
    assert {"auth-token", "c2pa-signing"} <= names  # the serving pod has them
    pod = precompile_job(r)["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert not {"auth-token", "c2pa-signing"} & {v["name"] for v in pod.get("volumes", [])}
    assert not {"auth-token", "c2pa-signing"} & {
        m["name"] for m in container.get("volumeMounts", [])}
    assert not [e for e in container["env"]
                if e["name"].startswith(("IMAGEGEN_AUTH", "IMAGEGEN_C2PA"))]
    assert any(v["name"] != "auth-token" for v in pod["volumes"])  # the cache volume stays


def test_a_rollout_may_take_a_new_node_and_a_whole_compile():
    compiled = deployment(resource(pipeline=PRECOMPILE))["spec"]["progressDeadlineSeconds"]
    plain = deployment(resource(pipeline={"compile": {"enabled": False}}))["spec"][
        "progressDeadlineSeconds"]
    assert compiled > plain > 600  # Kubernetes' default would fail a compiling rollout


def test_the_precompile_job_is_named_for_what_it_compiles():
    name = precompile_job(resource(pipeline=PRECOMPILE))["metadata"]["name"]
    assert name == precompile_job(resource(pipeline=PRECOMPILE, replicas=5))["metadata"]["name"]
    other_model = {"uri": "gs://bucket/models/other", "family": "SD15", "memoryGiB": 4}
    assert name != precompile_job(resource(pipeline=PRECOMPILE, model=other_model))[
        "metadata"]["name"]
    body = copy.deepcopy(BASE)
    body["metadata"]["name"] = "a" * 63
    body["spec"]["pipeline"] = PRECOMPILE
    long_name = precompile_job(api.parse(body))["metadata"]["name"]
    assert len(long_name) <= 63 and "-precompile-" in long_name


def test_the_serving_pods_and_the_precompile_job_run_as_the_named_service_account():
    server = {"serviceAccountName": "sd15-reader"}
    r = resource(pipeline=PRECOMPILE, server=server)
    for pod in (pod_spec(r), precompile_job(r)["spec"]["template"]["spec"]):
        assert pod["serviceAccountName"] == "sd15-reader"
        assert pod["automountServiceAccountToken"] is False  # Workload Identity needs none
    assert "serviceAccountName" not in pod_spec(resource())  # the namespace's default
    # A Job stuck without it (its pod cannot read the bucket) is replaced once it is named.
    assert precompile_job(r)["metadata"]["name"] != precompile_job(
        resource(pipeline=PRECOMPILE))["metadata"]["name"]
    with pytest.raises(api.InvalidSpec, match="serviceAccountName"):
        resource(server={"serviceAccountName": "Not_A_Name"})


def test_a_loras_default_scale_needs_no_new_precompile_job():
    def job_name(**lora: Any) -> str:
        model = {**BASE["spec"]["model"],
                 "loras": [{"name": "ink", "uri": "gs://bucket/loras/ink", **lora}]}
        return precompile_job(resource(pipeline=PRECOMPILE, model=model))["metadata"]["name"]

    assert job_name(scale=0.5) == job_name(scale=1.0)  # read by each denoise, not compiled
    assert job_name(scale=0.5) != job_name(scale=0.5, uri="gs://bucket/loras/other")
    assert job_name() != precompile_job(resource(pipeline=PRECOMPILE))["metadata"]["name"]


def test_a_held_deployment_has_no_replicas_and_no_job_without_asking():
    r = resource(pipeline=PRECOMPILE)
    [held] = [o for o in render_workload(r, held=True) if o["kind"] == "Deployment"]
    assert held["spec"]["replicas"] == 0
    assert deployment(r)["spec"]["replicas"] == 2
    unasked = resource(pipeline={"compile": {"enabled": True,
                                             "cache": {"pvcName": "compile-cache"}}})
    assert not [o for o in render_workload(unasked) if o["kind"] == "Job"]


def test_an_existing_pool_the_spec_names_is_the_one_its_pods_select():
    unnamed = pod_spec(resource(nodePool={"provider": "Existing"}))["nodeSelector"]
    assert "cloud.google.com/gke-nodepool" not in unnamed  # auto-provisioning names its own
    named = pod_spec(resource(nodePool={"provider": "Existing", "name": "t4-shared"}))
    assert named["nodeSelector"]["cloud.google.com/gke-nodepool"] == "t4-shared"
