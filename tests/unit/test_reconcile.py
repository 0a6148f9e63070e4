"""The reconcile's main paths in milliseconds, on an in-memory Kube (a FAKE).

The same paths run end to end against the real API server, scheduler and KWOK
in tests/cluster; these pin the rules: which pool a service uses and when it
goes, what a refusal or a never-fitting spec puts in status, when a provider
is asked again. The GKE provider here is the real one, on its real client
library, against the local test double of GKE's REST API.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import pytest

from imagegen_operator import api, gke
from imagegen_operator.kube import PermanentKubeError, TransientKubeError
from imagegen_operator.planner import plan
from imagegen_operator.providers import build_providers
from imagegen_operator.providers.gke import GkeProvider
from imagegen_operator.providers.local import _pool_id
from imagegen_operator.reconcile import ORPHAN_GRACE_S, Reconciler, _unwanted, indexed
from imagegen_operator.render.deployment import nodeselector
from imagegen_operator.render.nodepool import POOL_LABEL, render_gke_nodepool
from imagegen_operator.status import PoolKey
from support.clock import FakeClock
from support.fake_gke import GkeApiTestDouble
from support.memory_kube import InMemoryKube

CLUSTER_A = "projects/imagegen-test/locations/us-central1/clusters/a"
CLUSTER_B = "projects/imagegen-test/locations/europe-west4/clusters/b"
TS2_L4 = {"type": "nvidia-l4", "sharing": {"strategy": "TimeSharing", "maxSharedClientsPerGpu": 2}}


@pytest.fixture
def world():
    with GkeApiTestDouble(polls_to_done=1) as double:
        yield World(double)


def split(name: str) -> tuple[str, str]:
    """(namespace, name) of ``namespace/name``, or of a bare name in namespace ns."""
    namespace, _, bare = name.rpartition("/")
    return namespace or "ns", bare


class World:
    """The fake Kube, the real providers, a reconciler, and what it recorded."""

    def __init__(self, double: GkeApiTestDouble, default_cluster: str | None = CLUSTER_A):
        self.kube = InMemoryKube()
        self.clock = FakeClock()
        self.double = double
        self.gke = GkeProvider(double.client(), timeout=5, backoff_base=15, backoff_max=300,
                               clock=self.clock, jitter=lambda delay: delay)
        self.events: list[tuple[str, str, str, str]] = []
        self.default_cluster = default_cluster
        self.reconciler = Reconciler(
            self.kube,
            build_providers(self.kube, gke=lambda: self.gke),  # type: ignore[arg-type]
            recorder=lambda body, *event: self.events.append((body["metadata"]["name"], *event)),
            default_cluster=lambda: self.default_cluster,
            clock=self.clock,
        )

    def create(self, name: str, gpu: dict | None = None, replicas: int = 1,
               node_pool: dict | None = None, **spec: Any) -> dict:
        """A service; ``name`` may be ``namespace/name`` (by default in namespace ns)."""
        namespace, name = split(name)
        body = {
            "apiVersion": api.API_VERSION, "kind": api.KIND,
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"model": {"uri": "gs://models/sd15", "family": "SD15", "memoryGiB": 4},
                     "gpu": gpu or TS2_L4, "replicas": replicas, **spec},
        }
        if node_pool is not None:
            body["spec"]["nodePool"] = node_pool
        return self.kube.put(body)

    def body(self, name: str) -> dict:
        found = self.kube.get(api.API_VERSION, api.KIND, *reversed(split(name)))
        assert found is not None
        return found

    def edit(self, name: str, **spec: Any) -> dict:
        body = self.body(name)
        body["spec"].update(spec)
        body["metadata"]["generation"] += 1
        return self.kube.put(body)

    def reconcile(self, *names: str):
        return [self.reconciler.reconcile(self.body(n)) for n in names][-1]

    def delete(self, name: str) -> bool:
        done = self.reconciler.finalize(self.body(name))
        if done:
            self.kube.objects.pop((api.API_VERSION, api.KIND, *split(name)))
        return done

    def condition(self, name: str, type_: str) -> dict:
        return next(c for c in self.body(name)["status"]["conditions"] if c["type"] == type_)

    def nodes_ready(self) -> None:
        """What KWOK does: every Node turns Ready."""
        for obj in self.kube.objects.values():
            if obj["kind"] == "Node":
                obj.setdefault("status", {})["conditions"] = [{"type": "Ready", "status": "True"}]

    def rolled_out(self, name: str, ready: int | None = None) -> None:
        """What the Deployment controller does once its pods are Ready."""
        deployment = self.kube.objects[("apps/v1", "Deployment", "ns", name)]
        want = deployment["spec"]["replicas"]
        ready = want if ready is None else ready
        deployment["status"] = {
            "observedGeneration": deployment["metadata"]["generation"],
            "replicas": want, "updatedReplicas": ready, "readyReplicas": ready,
        }

    def gke_pools(self) -> set[str]:
        return set(self.double.pools)


UNAUTHENTICATED = "ServingUnauthenticated"


def unauthenticated(world: World, name: str) -> list[tuple[str, str, str, str]]:
    return [e for e in world.events if e[0] == name and e[2] == UNAUTHENTICATED]


def test_a_plan_warning_such_as_an_unguarded_port_is_an_event_when_it_is_new(world) -> None:
    world.create("open", node_pool={"provider": "Local"})
    world.reconcile("open")
    [(_, type_, _, message)] = unauthenticated(world, "open")
    assert type_ == "Warning"
    assert "authSecretRef" in message and "allowFrom" in message
    world.nodes_ready()
    world.rolled_out("open")
    world.reconcile("open")  # status changed, the plan did not: no news
    world.edit("open", replicas=2)  # nor does a new count (the HPA scales through the spec)
    world.reconcile("open")
    assert len(unauthenticated(world, "open")) == 1

    world.edit("open", server={"authSecretRef": {"name": "token", "key": "token"}})
    world.reconcile("open")
    world.edit("open", server={})
    world.reconcile("open")  # unguarded again: news again
    assert len(unauthenticated(world, "open")) == 2
    world.create("fenced", node_pool={"provider": "Local"},
                 server={"allowFrom": [{"podSelector": {"matchLabels": {"app": "gw"}}}]})
    world.reconcile("fenced")
    assert not unauthenticated(world, "fenced")


@pytest.mark.parametrize("source", [
    {"namespaceSelector": {"matchLabels": {}}}, {"ipBlock": {"cidr": "0.0.0.0/0"}},
    {"namespaceSelector": {"matchLabels": {}}, "podSelector": {"matchLabels": {}}},
    {"ipBlock": {"cidr": "::/0"}}])
def test_an_allow_from_that_admits_every_pod_guards_nothing(world, source) -> None:
    world.create("wide", node_pool={"provider": "Local"}, server={"allowFrom": [source]})
    world.reconcile("wide")
    assert unauthenticated(world, "wide")


def test_plan_warnings_are_said_once_the_plan_is_made_after_a_refusal(world) -> None:
    """A service refused before its plan was acted on (no cluster known yet) is told its
    plan's warnings once the refusal clears, though its generation stayed the same."""
    world.default_cluster = None
    world.create("later", gpu=MIG_3G, node_pool={"provider": "GKE", "spot": True})
    world.reconcile("later")
    assert world.condition("later", "Ready")["reason"] == "ClusterUnknown"
    world.default_cluster = CLUSTER_A
    world.reconcile("later")
    assert len(unauthenticated(world, "later")) == 1


def test_settings_the_server_would_refuse_are_a_condition_not_a_failing_reconcile(
        world, monkeypatch) -> None:
    # Were the API's rules ever to let through what the server's settings refuse (a size
    # off the latent grid, say), the service says so, and nothing is made for it.
    from imagegen_operator.render import server_env

    derived = server_env.settings_values
    monkeypatch.setattr(server_env, "settings_values",
                        lambda r: {**derived(r), "allowed_sizes": ["16x16"]})
    world.create("sd15", node_pool={"provider": "Local"})
    world.reconcile("sd15")
    ready = world.condition("sd15", "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert "allowed_sizes" in ready["message"] and "16x16" in ready["message"]
    assert not [key for key in world.kube.objects if key[1] in ("Deployment", "Node")]


def test_an_autoscaled_service_left_below_its_minimum_is_ready_at_the_minimum(world) -> None:
    # spec.replicas left at its default (1), as a GitOps repository leaves it: the Deployment
    # runs minReplicas, and that is what "rolled out" and Ready wait for.
    world.create("sd15", node_pool={"provider": "Local"},
                 autoscaling={"minReplicas": 2, "maxReplicas": 4})
    world.reconcile("sd15")
    world.nodes_ready()
    world.rolled_out("sd15")
    world.reconcile("sd15")
    assert world.kube.objects[("apps/v1", "Deployment", "ns", "sd15")]["spec"]["replicas"] == 2
    assert world.condition("sd15", "Ready")["status"] == "True"


def test_a_local_service_converges_then_a_reconcile_writes_nothing(world) -> None:
    world.create("alpha", node_pool={"provider": "Local", "maxNodes": 3}, replicas=3)
    outcome = world.reconcile("alpha")
    assert not outcome.ready
    assert world.condition("alpha", "NodePoolReady")["reason"] == "Provisioning"
    assert world.condition("alpha", "Reconciling")["status"] == "True"
    kinds = {k for (_, k, _, _) in world.kube.objects}
    assert {"Deployment", "Service", "PodDisruptionBudget", "Node"} <= kinds

    world.nodes_ready()
    world.rolled_out("alpha")
    assert world.reconcile("alpha").ready
    assert world.condition("alpha", "Ready")["reason"] == "Ready"
    assert ("alpha", "Normal", "Ready", "Ready=True: 3/3 replicas ready") in world.events

    writes = world.kube.writes
    world.reconcile("alpha")
    assert world.kube.writes == writes


def test_services_sharing_a_local_pool_write_each_node_once(world) -> None:
    names = [f"svc-{i}" for i in range(5)]
    for name in names:
        world.create(name, node_pool={"provider": "Local", "maxNodes": 4}, replicas=1)
    for _ in range(3):
        world.reconcile(*names)
    # 5 replicas at 2 slots per node: 3 nodes, each written once.
    nodes = world.kube.writes_of("Node")
    assert len(nodes) == 3, nodes


def test_a_gke_pool_goes_with_its_last_gke_user_not_with_local_namesakes(world) -> None:
    world.create("on-gke", node_pool={"provider": "GKE", "cluster": CLUSTER_A})
    world.create("on-local", node_pool={"provider": "Local"})
    world.reconcile("on-gke", "on-local")
    name = plan(api.parse(world.body("on-gke")).spec).nodepool_name
    assert world.body("on-local")["status"]["nodePool"]["name"] == name  # the same derived name
    assert world.gke_pools() == {f"{CLUSTER_A}/nodePools/{name}"}

    assert world.delete("on-gke") is False  # DELETE sent; GKE is on it
    assert world.double.requests_to("DELETE", f"/nodePools/{name}")
    world.delete("on-gke")
    assert world.gke_pools() == set()
    # The Local pool of the same name is untouched.
    assert world.kube.list("v1", "Node", label_selector=f"{POOL_LABEL}={name}")


def test_a_local_pool_neither_counts_nor_deletes_real_nodes_of_its_name(world) -> None:
    # The Local provider on a real cluster (providers.local.enabled), beside a GKE pool of
    # the same derived name: GKE's nodes carry the same pool label.
    world.create("on-local", node_pool={"provider": "Local", "minNodes": 0})
    name = plan(api.parse(world.body("on-local")).spec).nodepool_name
    world.kube.put({"apiVersion": "v1", "kind": "Node", "metadata": {
        "name": "gke-a-real-node", "labels": {POOL_LABEL: name, "type": "kwok"}},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]}})
    world.reconcile("on-local")
    # Its own simulated node is made and counted; the real one is not counted.
    assert world.condition("on-local", "NodePoolReady")["reason"] == "Provisioning"
    assert world.delete("on-local") is False  # its simulated node goes first
    assert world.delete("on-local") is True
    assert [n["metadata"]["name"] for n in world.kube.list("v1", "Node")] == ["gke-a-real-node"]


def local_nodes(world: World) -> list[str]:
    return sorted(n["metadata"]["name"] for n in world.kube.list("v1", "Node"))


def test_a_local_pool_made_again_has_nodes_of_new_names(world) -> None:
    # Pods of the deleted pool's nodes wait for the pod garbage collector: a new node of
    # an old name would find them counted against its GPUs.
    world.create("first", node_pool={"provider": "Local", "maxNodes": 3}, replicas=3)
    world.reconcile("first")
    first = local_nodes(world)
    pool = world.body("first")["status"]["nodePool"]["name"]
    assert len(first) == 2 and all(name.startswith(f"{pool}-") for name in first)
    world.reconcile("first")  # the same nodes, written once
    assert local_nodes(world) == first and len(world.kube.writes_of("Node")) == 2
    while not world.delete("first"):
        pass
    world.create("second", node_pool={"provider": "Local", "maxNodes": 3}, replicas=3)
    world.reconcile("second")
    second = local_nodes(world)
    assert len(second) == 2 and not set(second) & set(first)
    assert world.body("second")["status"]["nodePool"]["name"] == pool


def test_a_local_pool_made_before_pool_ids_keeps_its_names(world) -> None:
    world.create("grown", node_pool={"provider": "Local", "maxNodes": 3}, replicas=1)
    world.reconcile("grown")
    (made,) = world.kube.list("v1", "Node")
    pool = world.body("grown")["status"]["nodePool"]["name"]
    # As an earlier version named it.
    del world.kube.objects[("v1", "Node", None, made["metadata"]["name"])]
    made["metadata"]["name"] = f"{pool}-0"
    made["metadata"]["annotations"].pop("imagegen.dev/simulated-pool-id")
    world.kube.put(made)
    # Its second node follows the old names; a real node of the third's name is refused.
    world.kube.put({"apiVersion": "v1", "kind": "Node", "metadata": {"name": f"{pool}-2"}})
    world.edit("grown", replicas=6)
    world.reconcile("grown")
    assert local_nodes(world) == [f"{pool}-0", f"{pool}-1", f"{pool}-2"]
    assert world.condition("grown", "NodePoolReady")["reason"] == "PoolNotOwned"
    assert "labels" not in world.kube.get("v1", "Node", f"{pool}-2")["metadata"]


def test_a_local_pool_of_mixed_names_keeps_the_old_ones_whatever_their_order() -> None:
    def node(name: str, pool_id: str | None) -> dict:
        annotations = {} if pool_id is None else {"imagegen.dev/simulated-pool-id": pool_id}
        return {"metadata": {"name": name, "annotations": annotations}}

    made = [node("p-0a1b2c-0", "0a1b2c"), node("p-1", None)]
    assert _pool_id(made) == _pool_id(made[::-1]) == ""
    assert _pool_id([node("p-0a1b2c-0", "0a1b2c"), node("p-0a1b2c-1", "0a1b2c")]) == "0a1b2c"
    assert len({_pool_id([]) for _ in range(5)}) == 5  # a new one each time


def test_an_existing_pool_counts_only_the_nodes_its_pods_may_use(world) -> None:
    from imagegen_operator import gke
    from imagegen_operator.render.nodepool import SIMULATED_TAINT

    world.create("whole", gpu={"type": "nvidia-l4"}, node_pool={"provider": "Existing"})

    def node(name: str, labels: dict | None = None, **spec: Any) -> None:
        world.kube.put({"apiVersion": "v1", "kind": "Node", "metadata": {
            "name": name, "labels": {gke.LABEL_ACCELERATOR: "nvidia-l4", **(labels or {})}},
            "spec": spec, "status": {"conditions": [{"type": "Ready", "status": "True"}]}})

    node("usable")
    node("time-shared", {gke.LABEL_SHARING_STRATEGY: "time-sharing",
                         gke.LABEL_MAX_SHARED_CLIENTS: "2"})
    node("cordoned", unschedulable=True)
    node("simulated", taints=[dict(SIMULATED_TAINT)])
    node("operators-pool", {POOL_LABEL: "igs-l4x1"})  # goes with its own services
    world.reconcile("whole")
    assert world.body("whole")["status"]["nodePool"]["readyNodes"] == 1
    affinity = world.kube.objects[("apps/v1", "Deployment", "ns", "whole")]["spec"][
        "template"]["spec"]["affinity"]["nodeAffinity"]
    [term] = affinity["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert {"key": POOL_LABEL, "operator": "DoesNotExist"} in term["matchExpressions"]


def test_a_move_to_existing_keeps_the_pool_it_leaves_until_other_nodes_serve(world) -> None:
    """The pool left behind has the same GPUs: its nodes are not the Existing ones (it is
    deleted once the move is done), so it is kept until other nodes take the pods."""
    world.create("mover", node_pool={"provider": "GKE", "cluster": CLUSTER_A})
    run_until_ready(world, "mover")
    old = world.body("mover")["status"]["nodePool"]["name"]
    resource = api.parse(world.body("mover"))
    node_labels = {**nodeselector(plan(resource.spec), "GKE"), POOL_LABEL: old}
    world.kube.put({"apiVersion": "v1", "kind": "Node", "metadata": {
        "name": f"gke-{old}-0", "labels": node_labels},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]}})
    world.edit("mover", nodePool={"provider": "Existing"})
    for _ in range(3):  # the new pods wait (Pending): the old ones serve on
        world.reconcile("mover")
    assert world.condition("mover", "NodePoolReady")["status"] != "True"
    recorded = world.body("mover")["status"]["nodePool"]
    assert recorded["name"] == old and recorded["movingTo"]["provider"] == "Existing"
    assert world.gke_pools()
    world.kube.put({"apiVersion": "v1", "kind": "Node", "metadata": {
        "name": "someone-elses", "labels": nodeselector(plan(resource.spec))},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]}})
    run_until_ready(world, "mover")
    world.reconcile("mover")
    assert not world.gke_pools()


def test_a_move_to_existing_that_names_the_pool_it_ran_on_keeps_it(world) -> None:
    """The same nodes, kept by hand from now on: deleting the pool would evict every pod."""
    world.create("keeper", node_pool={"provider": "GKE", "cluster": CLUSTER_A})
    run_until_ready(world, "keeper")
    old = world.body("keeper")["status"]["nodePool"]["name"]
    resource = api.parse(world.body("keeper"))
    world.kube.put({"apiVersion": "v1", "kind": "Node", "metadata": {
        "name": f"gke-{old}-0",
        "labels": {**nodeselector(plan(resource.spec), "GKE"), POOL_LABEL: old}},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]}})
    pools = world.gke_pools()
    world.edit("keeper", nodePool={"provider": "Existing", "name": old})
    run_until_ready(world, "keeper")
    for _ in range(3):
        world.reconcile("keeper")
    assert world.body("keeper")["status"]["nodePool"]["provider"] == "Existing"
    assert world.gke_pools() == pools
    assert not [e for e in world.events if e[2] == "NodePoolRetired"]


def test_the_same_config_in_two_clusters_is_two_pools(world) -> None:
    world.default_cluster = None  # an operator off GKE takes each spec's cluster at its word
    world.create("in-a", node_pool={"provider": "GKE", "cluster": CLUSTER_A})
    world.create("in-b", node_pool={"provider": "GKE", "cluster": CLUSTER_B})
    world.reconcile("in-a", "in-b")
    assert len(world.gke_pools()) == 2
    while not world.delete("in-a"):
        pass
    assert [p for p in world.gke_pools() if p.startswith(CLUSTER_B)] == list(world.gke_pools())
    assert world.body("in-b")["status"]["nodePool"]["cluster"] == CLUSTER_B


@pytest.mark.parametrize("provider", ["GKE", "ConfigConnector"])
def test_a_cluster_other_than_the_operators_own_is_refused(world, provider) -> None:
    """Its pods could only land on the operator's cluster's nodes: a pool elsewhere would
    serve nothing, and a namespace's editors must not make pools in any cluster."""
    world.create("elsewhere", node_pool={"provider": provider, "cluster": CLUSTER_B})
    outcome = world.reconcile("elsewhere")
    assert outcome.stalled
    pool = world.condition("elsewhere", "NodePoolReady")
    assert (pool["status"], pool["reason"]) == ("False", "ForeignCluster")
    assert CLUSTER_A in pool["message"] and CLUSTER_B in pool["message"]
    assert "spec.nodePool.cluster" in pool["message"]
    assert world.condition("elsewhere", "Stalled")["status"] == "True"
    assert not world.double.requests and not world.gke_pools()
    assert not [k for k in world.kube.objects if k[1] in ("ContainerNodePool", "Deployment")]
    # Named as the operator's own, the same service goes ahead.
    world.edit("elsewhere", nodePool={"provider": provider, "cluster": CLUSTER_A})
    world.reconcile("elsewhere")
    assert world.condition("elsewhere", "NodePoolReady")["reason"] != "ForeignCluster"
    assert [k for k in world.kube.objects if k[1] == "Deployment"]


@pytest.mark.parametrize("provider", ["GKE", "ConfigConnector"])
def test_zones_outside_the_operators_cluster_are_refused_naming_the_field(world, provider):
    """The schema holds zones to a cluster the spec names; one the operator fills in is
    checked here, before any pool is asked for."""
    world.create("zoned", node_pool={"provider": provider, "locations": ["europe-west4-a"]})
    assert world.reconcile("zoned").stalled
    pool = world.condition("zoned", "NodePoolReady")
    assert (pool["status"], pool["reason"]) == ("False", "LocationsOutsideCluster")
    assert "spec.nodePool.locations" in pool["message"] and CLUSTER_A in pool["message"]
    assert not world.double.requests and not world.gke_pools()
    assert not [k for k in world.kube.objects if k[1] in ("ContainerNodePool", "Deployment")]
    delete_until_done(world, "zoned")
    # Zones of its region go ahead.
    world.create("zoned", node_pool={"provider": provider, "locations": ["us-central1-b"]})
    world.reconcile("zoned")
    assert world.condition("zoned", "NodePoolReady")["reason"] != "LocationsOutsideCluster"
    assert [k for k in world.kube.objects if k[1] == "Deployment"]


def test_deleting_a_service_refused_for_another_cluster_leaves_that_clusters_pools(world):
    """A pool of that name in the other cluster is its own operator's, serving its own
    services, which this operator cannot see: deleting the refused service never touches it."""
    theirs = world.create("theirs", node_pool={"provider": "GKE", "cluster": CLUSTER_B})
    resource = api.parse(theirs)
    world.kube.objects.pop((api.API_VERSION, api.KIND, "ns", "theirs"))
    made = render_gke_nodepool(resource, plan(resource.spec))["spec"]
    full = f"{CLUSTER_B}/nodePools/{made['name']}"
    world.double.seed_pool(full, **{k: v for k, v in made.items() if k != "name"})
    world.create("nosy", node_pool={"provider": "GKE", "cluster": CLUSTER_B})
    assert world.reconcile("nosy").stalled
    delete_until_done(world, "nosy")
    assert world.gke_pools() == {full}
    assert not [r for r in world.double.requests if r.method == "DELETE"]


def test_a_service_refused_for_its_cluster_keeps_no_pool_there_alive(world) -> None:
    """A service that ran in another cluster before the operator knew its own keeps its
    pool; a later service refused for naming that cluster does not count as its user."""
    world.default_cluster = None
    world.create("earlier", node_pool={"provider": "GKE", "cluster": CLUSTER_B})
    world.reconcile("earlier")
    assert world.gke_pools()
    world.default_cluster = CLUSTER_A
    world.create("refused", node_pool={"provider": "GKE", "cluster": CLUSTER_B})
    assert world.reconcile("refused").stalled
    delete_until_done(world, "earlier")
    assert not world.gke_pools()
    delete_until_done(world, "refused")


def test_a_named_cluster_waits_while_the_operators_own_is_not_known_yet(world) -> None:
    class Pending:
        """GKE's metadata server answering with errors: on GKE, the cluster not known yet."""

        pending = True

        def __call__(self) -> None:
            return None

    world.reconciler.default_cluster = Pending()
    world.create("named", node_pool={"provider": "GKE", "cluster": CLUSTER_B})
    assert world.reconcile("named").stalled
    pool = world.condition("named", "NodePoolReady")
    assert (pool["status"], pool["reason"]) == ("False", "ClusterUnknown")
    assert "spec.nodePool.cluster" in pool["message"] and "gke.cluster" in pool["message"]
    assert not world.double.requests
    world.reconciler.default_cluster = lambda: CLUSTER_B  # it turns out to be this one
    world.reconcile("named")
    assert world.gke_pools()


def test_a_namesake_refused_as_pool_claimed_does_not_keep_the_pool_alive(world) -> None:
    world.create("first", node_pool={"provider": "GKE", "cluster": CLUSTER_A})
    world.create("second", node_pool={"provider": "ConfigConnector", "cluster": CLUSTER_A})
    run_until_ready(world, "first")
    world.reconcile("second")
    assert world.condition("second", "NodePoolReady")["reason"] == "PoolClaimed"
    delete_until_done(world, "first")
    assert not world.gke_pools()  # not kept for a service that never had it
    delete_until_done(world, "second")
    assert not config_connector_pools(world)


def stop_before_the_status_write(world, monkeypatch, name: str) -> None:
    """A reconcile of ``name`` by an operator that stops before it writes the status."""

    def stopped(*_: Any, **__: Any) -> None:
        raise RuntimeError("the operator stopped")

    monkeypatch.setattr(world.reconciler, "_write_status", stopped)
    with pytest.raises(RuntimeError):
        world.reconcile(name)
    monkeypatch.undo()


def test_a_pool_asked_for_by_an_operator_that_stopped_before_its_status_write_is_deleted(
        world, monkeypatch) -> None:
    """Status names the pool before GKE is asked, as not known to be made: an operator that
    stops after GKE took the create leaves a pool its delete waits for, even when the
    delete is refused (before: the pool counted as never made and was left behind)."""
    world.create("stops", node_pool={"provider": "GKE", "cluster": CLUSTER_A})
    stop_before_the_status_write(world, monkeypatch, "stops")
    [pool] = world.gke_pools()
    assert "created" not in world.body("stops")["status"]["nodePool"]
    world.double.outage("PERMISSION_DENIED", FORBIDDEN)
    assert world.delete("stops") is False  # the delete waits, and says why
    assert [e for e in world.events if e[2] == "NodePoolNotDeleted"]
    world.double.outage(None)
    world.clock.now += 61  # past the provider's backoff
    delete_until_done(world, "stops")
    assert not world.gke_pools()


def test_a_minimal_spec_uses_the_operators_cluster(world) -> None:
    world.create("minimal")  # no nodePool at all: provider GKE, the default cluster
    world.reconcile("minimal")
    status = world.body("minimal")["status"]
    assert status["nodePool"]["provider"] == "GKE"
    assert status["nodePool"]["cluster"] == CLUSTER_A
    assert [p for p in world.gke_pools() if p.startswith(CLUSTER_A + "/")]


def test_no_default_cluster_says_how_to_set_one(world) -> None:
    world.default_cluster = None
    world.create("minimal")
    outcome = world.reconcile("minimal")
    assert outcome.stalled
    pool = world.condition("minimal", "NodePoolReady")
    assert (pool["status"], pool["reason"]) == ("False", "ClusterUnknown")
    assert "spec.nodePool.cluster" in pool["message"] and "gke.cluster" in pool["message"]
    assert world.condition("minimal", "Stalled")["status"] == "True"
    assert not world.double.requests
    # Set once the operator learns one: the same service goes ahead.
    world.default_cluster = CLUSTER_B
    world.reconcile("minimal")
    assert world.body("minimal")["status"]["nodePool"]["cluster"] == CLUSTER_B


MIG_3G = {"type": "nvidia-h100-80gb", "partitionSize": "3g.40gb"}


def test_a_deployment_that_cannot_create_its_pods_says_why_and_stalls_past_its_deadline(
        world) -> None:
    """A ResourceQuota on GPUs (or Pod Security refusing MPS's hostIPC) leaves no pods whose
    conditions could tell: the Deployment's own do, and the service repeats them."""
    world.create("quota", node_pool={"provider": "Local", "maxNodes": 3}, replicas=2)
    world.reconcile("quota")
    world.nodes_ready()
    deployment = world.kube.objects[("apps/v1", "Deployment", "ns", "quota")]
    refused = ('pods "quota-1" is forbidden: exceeded quota: gpus, requested: '
               "requests.nvidia.com/gpu=1, used: requests.nvidia.com/gpu=4, limited: 4")
    conditions = [
        {"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated"},
        {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate",
         "message": refused},
    ]
    deployment["status"] = {"observedGeneration": deployment["metadata"]["generation"],
                            "replicas": 0, "conditions": conditions}
    world.reconcile("quota")
    ready = world.condition("quota", "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ReplicaFailure")
    assert "0/2 replicas ready" in ready["message"] and "exceeded quota: gpus" in ready["message"]
    assert world.condition("quota", "Stalled")["status"] == "False"  # the quota may free up

    conditions[0] = {"type": "Progressing", "status": "False",
                     "reason": "ProgressDeadlineExceeded",
                     "message": 'ReplicaSet "quota-5d4" has timed out progressing.'}
    world.reconcile("quota")
    ready = world.condition("quota", "Ready")
    assert ready["reason"] == "ProgressDeadlineExceeded" and "exceeded quota" in ready["message"]
    assert world.condition("quota", "Stalled")["status"] == "True"

    del conditions[1]  # pods made, and never ready in time (a crash loop, say)
    world.reconcile("quota")
    ready = world.condition("quota", "Ready")
    assert ready["reason"] == "ProgressDeadlineExceeded" and "timed out" in ready["message"]
    assert world.condition("quota", "Stalled")["status"] == "True"
    # A new spec: the conditions left are the last rollout's, not this one's.
    world.edit("quota", replicas=1)
    world.reconcile("quota")
    assert world.condition("quota", "Ready")["reason"] == "ReplicasNotReady"
    assert world.condition("quota", "Stalled")["status"] == "False"
    world.rolled_out("quota")
    assert world.reconcile("quota").ready


def test_a_monitor_the_cluster_cannot_take_is_said_in_status_while_the_service_serves(
        world) -> None:
    world.kube.missing_kinds = {"ServiceMonitor"}
    world.create("watched", node_pool={"provider": "Local"}, monitoring={"enabled": True})
    world.reconcile("watched")
    world.nodes_ready()
    world.rolled_out("watched")
    assert world.reconcile("watched").ready  # serving does not wait on monitoring
    monitored = world.condition("watched", "Monitored")
    assert (monitored["status"], monitored["reason"]) == ("False", "MonitoringUnavailable")
    assert "ServiceMonitor" in monitored["message"] and "spec.monitoring" in monitored["message"]
    world.kube.missing_kinds = set()  # the Prometheus operator installed
    world.reconcile("watched")
    assert world.condition("watched", "Monitored")["status"] == "True"
    world.kube.refuse("ServiceMonitor", "servicemonitors is forbidden")  # an RBAC gap, say
    world.edit("watched", monitoring={"enabled": True, "interval": "15s"})
    assert world.reconcile("watched").ready  # nor on a monitor the API server refuses
    monitored = world.condition("watched", "Monitored")
    assert monitored["status"] == "False" and "forbidden" in monitored["message"]
    assert world.condition("watched", "Stalled")["status"] == "False"
    world.kube.accept("ServiceMonitor")
    world.edit("watched", monitoring={"enabled": False})
    world.reconcile("watched")
    assert "Monitored" not in {c["type"] for c in world.body("watched")["status"]["conditions"]}


def test_allow_from_makes_the_services_network_policy_and_its_removal_deletes_it(world):
    gateway = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gw"}}}
    world.create("fenced", node_pool={"provider": "Local"}, server={"allowFrom": [gateway]})
    world.reconcile("fenced")

    def policies() -> list[dict]:
        return [o for (_, kind, _, _), o in world.kube.objects.items() if kind == "NetworkPolicy"]

    [policy] = policies()
    assert policy["metadata"]["ownerReferences"][0]["kind"] == api.KIND
    assert policy["spec"]["ingress"] == [{"from": [gateway],
                                          "ports": [{"protocol": "TCP", "port": 8080}]}]
    assert policy["spec"]["podSelector"]["matchLabels"][
        "app.kubernetes.io/instance"] == "fenced"
    world.edit("fenced", server={})
    world.reconcile("fenced")
    assert policies() == []


def test_a_service_whose_network_policy_is_refused_starts_no_pod_unfenced(world):
    gateway = {"podSelector": {"matchLabels": {"app": "gw"}}}

    def deployments() -> list[str]:
        return [k[3] for k in world.kube.objects if k[1] == "Deployment"]

    # A policy of that name a person wrote: neither rewritten nor taken over.
    theirs = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
              "metadata": {"name": "fenced", "namespace": "ns"},
              "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}}
    world.kube.put(theirs)
    world.create("fenced", node_pool={"provider": "Local"}, server={"allowFrom": [gateway]})
    world.reconcile("fenced")
    ready = world.condition("fenced", "Ready")
    assert ready["reason"] == "ApplyRejected" and "which no ImageGenService made" in ready[
        "message"]
    assert deployments() == []
    assert world.kube.get("networking.k8s.io/v1", "NetworkPolicy", "fenced", "ns")[
        "spec"] == theirs["spec"]
    # One the API server refuses (a webhook, a quota): no Deployment either.
    world.kube.objects.pop(("networking.k8s.io/v1", "NetworkPolicy", "ns", "fenced"))
    world.kube.refuse("NetworkPolicy", "denied by a policy webhook")
    world.reconcile("fenced")
    assert deployments() == []
    world.kube.accept("NetworkPolicy")
    world.reconcile("fenced")
    assert deployments() == ["fenced"]


@pytest.mark.parametrize("kind, api_version, unclaim", [
    ("Service", "v1", "give the ImageGenService another name"),
    ("Deployment", "apps/v1", "give the ImageGenService another name"),
])
def test_an_object_of_the_name_no_image_gen_service_made_is_left_alone(world, kind, api_version,
                                                                       unclaim):
    """Another app's Service (or Deployment) of the service's name is neither rewritten, nor
    given the service as owner (its delete would take it along), nor read as its own."""
    theirs = {"apiVersion": api_version, "kind": kind,
              "metadata": {"name": "frontend", "namespace": "ns", "labels": {"app": "web"}},
              "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}}
    world.kube.put(theirs)
    before = world.kube.get(api_version, kind, "frontend", "ns")
    world.create("frontend", node_pool={"provider": "Local"})
    world.reconcile("frontend")
    ready = world.condition("frontend", "Ready")
    assert ready["reason"] == "ApplyRejected"
    assert f"{kind} frontend, which no ImageGenService made" in ready["message"]
    assert unclaim in ready["message"]
    assert world.kube.get(api_version, kind, "frontend", "ns") == before
    world.nodes_ready()
    world.reconcile("frontend")  # and again, once this process has applied the rest
    assert world.kube.get(api_version, kind, "frontend", "ns") == before
    assert world.condition("frontend", "Ready")["reason"] == "ApplyRejected"


def test_the_network_policy_of_an_earlier_service_of_the_name_is_taken_over(world):
    """Deleted and made again: until the garbage collector has removed the old service's
    policy, the new one takes it over rather than stall."""
    gateway = {"podSelector": {"matchLabels": {"app": "gw"}}}
    world.kube.put({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                    "metadata": {"name": "again", "namespace": "ns", "ownerReferences": [
                        {"apiVersion": api.API_VERSION, "kind": api.KIND, "name": "again",
                         "uid": "the-earlier-one", "controller": True}]},
                    "spec": {"podSelector": {}}})
    world.create("again", node_pool={"provider": "Local"}, server={"allowFrom": [gateway]})
    world.reconcile("again")
    assert world.condition("again", "Ready")["reason"] != "ApplyRejected"
    policy = world.kube.get("networking.k8s.io/v1", "NetworkPolicy", "again", "ns")
    assert policy["spec"]["ingress"][0]["from"] == [gateway]
    assert [k[3] for k in world.kube.objects if k[1] == "Deployment"] == ["again"]


def run_until_ready(world, name: str, limit: int = 6) -> None:
    world.reconcile(name)
    for _ in range(limit):
        world.nodes_ready()
        world.rolled_out(name)
        if world.reconcile(name).ready:
            return
    raise AssertionError(world.body(name)["status"])


def delete_until_done(world, name: str, limit: int = 6) -> None:
    for _ in range(limit):
        if world.delete(name):
            return
    raise AssertionError(f"{name} not finalized after {limit} tries")


@pytest.mark.parametrize("breaking", ["model", "cluster"])
def test_a_spec_that_stops_fitting_keeps_its_pool_on_record_and_its_delete_removes_it(
        world, breaking) -> None:
    world.create("sdxl", gpu=MIG_3G, node_pool={"provider": "GKE", "spot": True})
    run_until_ready(world, "sdxl")
    ran = world.body("sdxl")["status"]
    pool = ran["nodePool"]
    assert world.gke_pools() == {f"{CLUSTER_A}/nodePools/{pool['name']}"}

    if breaking == "model":  # 20 GiB on a 10 GB slice: the plan refuses it
        world.edit("sdxl", gpu={**MIG_3G, "partitionSize": "1g.10gb"},
                   model={"uri": "gs://models/sdxl", "family": "SDXL", "memoryGiB": 20})
    else:  # the operator forgets its default cluster (a metadata server that fails)
        world.default_cluster = None
        world.edit("sdxl", replicas=2)
    assert world.reconcile("sdxl").stalled
    status = world.body("sdxl")["status"]
    assert status["nodePool"] == pool
    assert pool["name"] in world.condition("sdxl", "NodePoolReady")["message"]
    # The last spec's Deployment goes on serving: status says so, and keeps the selector
    # an HPA scaling the service finds its pods by.
    available = world.condition("sdxl", "Available")
    assert available["status"] == "True" and "left as it was" in available["message"]
    for kept in ("selector", "endpoint", "replicas", "readyReplicas"):
        assert status[kept] == ran[kept]
    assert world.condition("sdxl", "Ready")["status"] == "False"

    delete_until_done(world, "sdxl")
    assert not world.gke_pools()


def test_a_service_being_deleted_is_not_reconciled(world) -> None:
    body = world.create("going", node_pool={"provider": "GKE"})
    body["metadata"]["deletionTimestamp"] = "2026-12-06T12:00:00Z"
    world.kube.put(body)
    outcome = world.reconcile("going")
    assert not outcome.status_written
    assert not world.double.requests and not world.gke_pools()


def test_services_that_name_no_image_get_the_operators_server_image(world) -> None:
    world.reconciler.server_image = "registry.example/ml/imagegen-server:1.2"
    world.create("plain", node_pool={"provider": "Local"})
    world.create("pinned", node_pool={"provider": "Local"}, server={"image": "mine/server:9"})
    world.reconcile("plain", "pinned")

    def image(name: str) -> str:
        deployment = world.kube.objects[("apps/v1", "Deployment", "ns", name)]
        return deployment["spec"]["template"]["spec"]["containers"][0]["image"]

    assert image("plain") == "registry.example/ml/imagegen-server:1.2"
    assert image("pinned") == "mine/server:9"


def test_a_refused_child_is_stalled_with_the_api_servers_words_and_recovers(world) -> None:
    world.create("refused", node_pool={"provider": "Local"})
    message = ('Deployment.apps "refused" is invalid: spec.template.spec.containers[0].image: '
               "Invalid value: \" bad\": must not have leading or trailing whitespace")
    world.kube.refuse("Deployment", message)
    outcome = world.reconcile("refused")
    assert outcome.stalled and not outcome.ready
    ready = world.condition("refused", "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ApplyRejected")
    assert "spec.template.spec.containers[0].image" in ready["message"]
    assert world.condition("refused", "Stalled")["reason"] == "ApplyRejected"
    assert world.body("refused")["status"]["observedGeneration"] == 1
    assert [e for e in world.events if e[1] == "Warning" and e[2] == "ApplyRejected"]
    # The other children were still applied.
    assert ("v1", "Service", "ns", "refused") in world.kube.objects

    world.kube.accept("Deployment")  # the user fixed the spec
    world.edit("refused", replicas=1)
    world.reconcile("refused")
    world.nodes_ready()
    world.rolled_out("refused")
    assert world.reconcile("refused").ready
    assert world.condition("refused", "Stalled")["status"] == "False"


def test_a_refused_pool_object_is_the_pools_condition_and_does_not_stop_a_delete(
        world, monkeypatch) -> None:
    """A Local pool's Nodes refused by the API server (here 403: the chart grants Node
    writes only with providers.local.enabled): NodePoolReady says so, status is written, and
    a delete waits on the pool instead of failing the finalizer."""
    world.create("nodeless", node_pool={"provider": "Local"})
    world.kube.refuse("Node", 'nodes is forbidden: User "imagegen-operator" cannot create')
    outcome = world.reconcile("nodeless")
    assert outcome.stalled and not outcome.ready
    pool = world.condition("nodeless", "NodePoolReady")
    assert (pool["status"], pool["reason"]) == ("False", "RequestRejected")
    assert "nodes is forbidden" in pool["message"]
    assert world.condition("nodeless", "Stalled")["status"] == "True"
    assert ("apps/v1", "Deployment", "ns", "nodeless") in world.kube.objects

    world.kube.accept("Node")
    world.edit("nodeless", replicas=1)
    run_until_ready(world, "nodeless")

    delete = world.kube.delete

    def forbidden(api_version, kind, *args, **kwargs):
        if kind == "Node":
            raise PermanentKubeError(f"delete {kind}: 403 Forbidden: nodes is forbidden")
        return delete(api_version, kind, *args, **kwargs)

    monkeypatch.setattr(world.kube, "delete", forbidden)
    body = world.body("nodeless")
    body["metadata"]["deletionTimestamp"] = "2026-12-06T12:00:00Z"
    world.kube.put(body)
    assert world.delete("nodeless") is False  # kept, to try again: no pool is orphaned
    assert any(kind == "Node" for (_, kind, _, _) in world.kube.objects)
    monkeypatch.setattr(world.kube, "delete", delete)
    world.clock.now += 61  # past the provider's backoff
    assert world.delete("nodeless") is False  # the Nodes go now
    assert world.delete("nodeless") is True
    assert not any(kind == "Node" for (_, kind, _, _) in world.kube.objects)


@pytest.mark.parametrize("spec, field", [
    ({"replicas": 5}, "spec.replicas"),
    ({"replicas": 1, "autoscaling": {"minReplicas": 5, "maxReplicas": 6}},
     "spec.autoscaling.minReplicas"),
])
def test_a_spec_that_can_never_fit_is_stalled_naming_the_fields(world, spec, field) -> None:
    world.create("too-big", node_pool={"provider": "Local", "maxNodes": 1}, **spec)
    world.reconcile("too-big")
    world.nodes_ready()
    world.rolled_out("too-big", ready=2)  # the pool holds two
    outcome = world.reconcile("too-big")
    assert outcome.stalled
    ready = world.condition("too-big", "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "PoolTooSmall")
    assert field in ready["message"] and "spec.nodePool.maxNodes" in ready["message"]
    assert world.condition("too-big", "Stalled")["status"] == "True"


def test_services_that_fit_their_pool_alone_but_not_together_are_told_so(world) -> None:
    mig = {"type": "nvidia-h100-80gb", "partitionSize": "1g.10gb"}  # 7 slots a node
    for name in ("alpha", "beta"):
        world.create(name, gpu=mig, node_pool={"provider": "Local", "maxNodes": 1}, replicas=7)
    world.reconcile("alpha", "beta")
    world.nodes_ready()
    world.rolled_out("alpha")
    world.rolled_out("beta", ready=0)  # the scheduler placed alpha's seven, none of beta's
    assert world.reconcile("alpha").ready
    outcome = world.reconcile("beta")
    assert outcome.stalled
    ready = world.condition("beta", "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "PoolTooSmall")
    assert "ns/alpha, ns/beta" in ready["message"] and "14 replicas" in ready["message"]
    assert "spec.nodePool.maxNodes to 2" in ready["message"]

    world.edit("beta", nodePool={"provider": "Local", "maxNodes": 2})
    world.reconcile("beta")
    world.nodes_ready()
    world.rolled_out("beta")
    assert world.reconcile("beta").ready


def test_a_shared_pool_is_sized_for_each_service_s_pods_a_node_whichever_reconciles(world):
    """Four MPS clients an L4: a service whose pods ask 3.5 CPUs fits two on a g2-standard-8,
    one asking none four. Four replicas of each: two nodes and one, three in all."""
    mps4 = {"type": "nvidia-l4", "sharing": {"strategy": "MPS", "maxSharedClientsPerGpu": 4}}
    pool = {"provider": "Local", "maxNodes": 4}
    world.create("heavy", gpu=mps4, node_pool=pool, replicas=4,
                 server={"resources": {"requests": {"cpu": "3500m"}}})
    world.create("light", gpu=mps4, node_pool=pool, replicas=4)

    def nodes() -> int:
        return len(world.kube.list("v1", "Node", label_selector=f"{POOL_LABEL}=igs-l4x1-mps4"))

    world.reconcile("heavy")
    assert nodes() == 3
    world.reconcile("light")
    assert nodes() == 3


def test_services_on_an_existing_pool_are_not_bounded_by_max_nodes(world) -> None:
    """The operator makes no Existing pool: maxNodes (4 by default) says nothing of its size."""
    for name in ("alpha", "beta"):
        world.create(name, gpu={"type": "nvidia-tesla-t4"},
                     node_pool={"provider": "Existing", "name": "t4-shared"}, replicas=3)
    world.reconcile("alpha", "beta")
    for name in ("alpha", "beta"):
        assert world.condition(name, "Ready")["reason"] != "PoolTooSmall"
        assert world.condition(name, "Stalled")["status"] == "False"


def test_autoscaling_beyond_the_pool_is_a_warning_not_stalled(world) -> None:
    world.create("elastic", node_pool={"provider": "Local", "maxNodes": 1},
                 autoscaling={"minReplicas": 1, "maxReplicas": 6})
    world.reconcile("elastic")
    world.nodes_ready()
    world.rolled_out("elastic")
    assert world.reconcile("elastic").ready
    assert world.condition("elastic", "Stalled")["status"] == "False"
    # The plan says it (imagegen-operator plan), without holding the service back.
    resource = api.parse(world.body("elastic"))
    (short,) = [f for f in plan(resource.spec).findings if f.reason == "PoolTooSmall"]
    assert not short.blocking and "spec.nodePool.maxNodes" in short.fields


def test_a_pool_move_reads_progressing_then_retires_the_old_pool(world) -> None:
    world.create("mover", node_pool={"provider": "Local", "maxNodes": 2}, replicas=2)
    world.reconcile("mover")
    world.nodes_ready()
    world.rolled_out("mover")
    world.reconcile("mover")
    old = world.body("mover")["status"]["nodePool"]["name"]
    world.events.clear()

    world.edit("mover", gpu={"type": "nvidia-l4", "sharing": {
        "strategy": "MPS", "maxSharedClientsPerGpu": 2}})
    world.reconcile("mover")  # the Deployment changed; the old replicas still serve
    world.rolled_out("mover", ready=2)
    deployment = world.kube.objects[("apps/v1", "Deployment", "ns", "mover")]
    deployment["status"]["updatedReplicas"] = 1  # half way
    world.nodes_ready()
    world.reconcile("mover")
    ready = world.condition("mover", "Ready")
    assert (ready["status"], ready["reason"]) == ("Unknown", "Progressing")
    assert world.condition("mover", "Progressing")["reason"] == "MovingPool"
    moving = world.body("mover")["status"]["nodePool"]
    assert moving["name"] == old and moving["movingTo"]["name"] != old
    assert not [e for e in world.events
                if e[1] == "Warning" and e[2] != UNAUTHENTICATED], world.events

    world.rolled_out("mover")
    world.reconcile("mover")  # moved: the old pool's nodes are asked to go
    assert world.reconcile("mover").ready  # and once gone, it is retired
    new = world.body("mover")["status"]["nodePool"]["name"]
    assert new == moving["movingTo"]["name"]
    assert "movingTo" not in world.body("mover")["status"]["nodePool"]
    assert not world.kube.list("v1", "Node", label_selector=f"{POOL_LABEL}={old}")
    assert [e for e in world.events if e[2] == "NodePoolRetired"]


MPS2 = {"type": "nvidia-l4", "sharing": {"strategy": "MPS", "maxSharedClientsPerGpu": 2}}
WHOLE = {"type": "nvidia-l4"}


def pool_nodes(world, name: str) -> list:
    return world.kube.list("v1", "Node", label_selector=f"{POOL_LABEL}={name}")


def start_move(world, name: str, gpu: dict) -> dict:
    """Edit the GPU config and reconcile once: the Deployment moves, nothing rolled out yet."""
    world.edit(name, gpu=gpu)
    world.reconcile(name)
    world.nodes_ready()
    return world.body(name)["status"]["nodePool"]


def test_a_full_pool_rolls_one_pod_at_a_time_but_a_move_to_a_new_one_surges(world) -> None:
    world.create("full", gpu=MPS2, node_pool={"provider": "Local", "maxNodes": 1}, replicas=2)
    run_until_ready(world, "full")

    def rolling_update() -> dict:
        deployment = world.kube.objects[("apps/v1", "Deployment", "ns", "full")]
        return deployment["spec"]["strategy"]["rollingUpdate"]

    assert rolling_update() == {"maxSurge": 0, "maxUnavailable": 1}
    start_move(world, "full", TS2_L4)  # the same two slots a node, on a new pool
    assert rolling_update() == {"maxSurge": 1, "maxUnavailable": 0}
    run_until_ready(world, "full")
    world.reconcile("full")
    assert rolling_update() == {"maxSurge": 0, "maxUnavailable": 1}


def test_a_move_whose_deployment_change_is_refused_keeps_the_pool_the_pods_run_on(world):
    world.create("mover", node_pool={"provider": "Local", "maxNodes": 2})
    run_until_ready(world, "mover")
    a = world.body("mover")["status"]["nodePool"]["name"]
    world.kube.refuse("Deployment", "admission webhook denied the request")
    b = start_move(world, "mover", MPS2)["movingTo"]["name"]
    for _ in range(3):  # the new pool is ready; the old Deployment is, and stays, rolled out
        world.nodes_ready()
        world.reconcile("mover")
    recorded = world.body("mover")["status"]["nodePool"]
    assert recorded["name"] == a and recorded["movingTo"]["name"] == b
    assert pool_nodes(world, a)  # its pods still run there
    assert not [e for e in world.events if e[2] == "NodePoolRetired"]
    world.kube.accept("Deployment")  # the webhook lets it through: the move finishes
    run_until_ready(world, "mover")
    world.reconcile("mover")
    assert world.body("mover")["status"]["nodePool"]["name"] == b and not pool_nodes(world, a)


def test_a_shared_pool_left_by_one_user_as_the_other_is_deleted_is_deleted(
        world, monkeypatch) -> None:
    """y moves off the pool it shares with x while x is deleted. y keeps the pool for x,
    and holds it until its status no longer names it: x's delete, which would otherwise
    keep it for y (still named there), then finds no user and deletes it."""
    for name in ("x", "y"):
        world.create(name, node_pool={"provider": "GKE", "cluster": CLUSTER_A})
        run_until_ready(world, name)
    world.edit("y", gpu=MPS2)
    for _ in range(4):
        world.reconcile("y")
        world.clock.now += 30
    world.nodes_ready()
    world.rolled_out("y")
    write = world.reconciler._write_status
    deleting: list[threading.Thread] = []

    def x_deleted_meanwhile(body, status, outcome, *resource):
        if body["metadata"]["name"] == "y" and not deleting:
            x = world.body("x")
            x["metadata"]["deletionTimestamp"] = "2026-12-07T00:00:00Z"
            world.kube.put(x)
            deleting.append(threading.Thread(target=delete_until_done, args=(world, "x")))
            deleting[0].start()
            deleting[0].join(1.0)  # as far as it gets before y's status is written
        return write(body, status, outcome, *resource)

    monkeypatch.setattr(world.reconciler, "_write_status", x_deleted_meanwhile)
    world.reconcile("y")
    deleting[0].join(30)
    assert not deleting[0].is_alive()
    assert world.gke_pools() == {f"{CLUSTER_A}/nodePools/igs-l4x1-mps2"}  # y's new pool only


def test_a_pool_lock_dropped_while_a_caller_waited_is_not_the_one_it_holds(world) -> None:
    """Locks of pools long gone are dropped (and made anew when asked for): a caller that
    waited on one dropped meanwhile takes the one in use, so two never hold different
    locks of one pool."""
    reconciler = world.reconciler
    key = PoolKey("GKE", CLUSTER_A, "p", "")
    in_use = threading.Lock()

    class DroppedWhileWaiting:
        """The lock a caller fetched; while it waits, another caller drops and remakes it."""

        def __init__(self) -> None:
            self.lock = threading.Lock()

        def acquire(self) -> bool:
            reconciler._pool_locks[reconciler._lock_id(key)] = in_use
            return self.lock.acquire()

        def release(self) -> None:
            self.lock.release()

        def locked(self) -> bool:
            return self.lock.locked()

    dropped = DroppedWhileWaiting()
    reconciler._pool_locks[reconciler._lock_id(key)] = dropped
    with reconciler._pool_lock(key):
        assert in_use.locked() and not dropped.locked()
    assert not in_use.locked()


def test_a_move_turned_back_mid_way_releases_the_pool_it_was_moving_to(world) -> None:
    world.create("mover", node_pool={"provider": "Local", "maxNodes": 2})
    run_until_ready(world, "mover")
    a = world.body("mover")["status"]["nodePool"]["name"]
    b = start_move(world, "mover", MPS2)["movingTo"]["name"]
    assert pool_nodes(world, b)

    world.edit("mover", gpu=TS2_L4)  # back to where it was, before the move is done
    world.reconcile("mover")
    recorded = world.body("mover")["status"]["nodePool"]
    assert recorded["name"] == a and "movingTo" not in recorded
    assert [p["name"] for p in recorded["releasing"]] == [b]
    assert pool_nodes(world, b)  # its pods may still be there until the rollout is done

    run_until_ready(world, "mover")
    assert not pool_nodes(world, b) and pool_nodes(world, a)
    world.reconcile("mover")  # the next one finds it gone
    assert "releasing" not in world.body("mover")["status"]["nodePool"]


def test_a_move_turned_elsewhere_mid_way_retires_both_pools_it_left(world) -> None:
    world.create("mover", node_pool={"provider": "Local", "maxNodes": 2})
    run_until_ready(world, "mover")
    a = world.body("mover")["status"]["nodePool"]["name"]
    b = start_move(world, "mover", MPS2)["movingTo"]["name"]
    c = start_move(world, "mover", WHOLE)["movingTo"]["name"]
    assert len({a, b, c}) == 3
    run_until_ready(world, "mover")
    assert world.body("mover")["status"]["nodePool"]["name"] == c
    assert not pool_nodes(world, a) and not pool_nodes(world, b) and pool_nodes(world, c)


def test_a_spec_that_stops_fitting_mid_move_deletes_both_pools_with_the_service(world) -> None:
    world.create("mover", node_pool={"provider": "Local", "maxNodes": 2})
    run_until_ready(world, "mover")
    a = world.body("mover")["status"]["nodePool"]["name"]
    b = start_move(world, "mover", MPS2)["movingTo"]["name"]
    world.edit("mover", model={"uri": "gs://models/big", "family": "SDXL", "memoryGiB": 40})
    assert world.reconcile("mover").stalled
    delete_until_done(world, "mover")
    assert not pool_nodes(world, a) and not pool_nodes(world, b)


def test_a_spec_that_no_longer_parses_still_has_its_pool_deleted(world) -> None:
    world.create("old", node_pool={"provider": "Local", "maxNodes": 2})
    run_until_ready(world, "old")
    name = world.body("old")["status"]["nodePool"]["name"]
    body = world.body("old")
    body["spec"]["replicas"] = "lots"  # what a newer schema would refuse, stored earlier
    world.kube.put(body)
    delete_until_done(world, "old")
    assert not pool_nodes(world, name)


def test_a_failing_gke_api_is_asked_with_exponential_backoff_by_all_its_users(world) -> None:
    """Five services on one pool, the API answering 503, a reconcile of each every 5 s
    (the pool poll) for 30 minutes: GKE sees one call per backoff step, not 5 per poll."""
    names = [f"user-{i}" for i in range(5)]
    for name in names:
        world.create(name, node_pool={"provider": "GKE", "cluster": CLUSTER_A, "maxNodes": 5})
    world.double.outage("UNAVAILABLE")
    asked_at, status_writes = [], 0
    for _ in range(360):
        before = len(world.double.requests)
        status_writes += sum(world.reconcile(n).status_written for n in names)
        if len(world.double.requests) > before:
            assert len(world.double.requests) == before + 1  # one service asked, once
            asked_at.append(world.clock.now)
        world.clock.now += 5
    gaps = [b - a for a, b in zip(asked_at, asked_at[1:], strict=False)]
    assert gaps[:6] == [15, 30, 60, 120, 240, 300], gaps
    assert set(gaps[5:]) == {300}, gaps
    # Status changes when a try fails (the time of the next one), not on every poll.
    assert status_writes <= len(names) * len(asked_at), status_writes
    pool = world.condition("user-0", "NodePoolReady")
    assert pool["reason"] == "GkeUnavailable" and "next try at" in pool["message"]
    assert world.condition("user-0", "Stalled")["status"] == "False"  # it passes by itself


def test_services_that_fill_a_shared_pool_roll_out_without_a_surge(world) -> None:
    """Two services, one replica each, on a Local pool of one node holding two (an L4
    time-shared by two): a surge pod of either would wait for a slot that never frees."""
    for name in ("left", "right"):
        world.create(name, node_pool={"provider": "Local", "maxNodes": 1})
    for name in ("left", "right"):
        world.reconcile(name)
    for name in ("left", "right"):
        strategy = world.kube.objects[("apps/v1", "Deployment", "ns", name)]["spec"]["strategy"]
        assert strategy["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}, name
    world.create("alone", node_pool={"provider": "Local", "maxNodes": 2, "name": "own-pool"})
    world.reconcile("alone")
    strategy = world.kube.objects[("apps/v1", "Deployment", "ns", "alone")]["spec"]["strategy"]
    assert strategy["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


def test_a_shared_pool_is_full_by_how_each_service_fills_a_node(world) -> None:
    """Pods per node differ between a pool's services (their requests; an hf:// model's
    download against a node's disk): the neighbours count in this service's pods. And the
    pool's room is at the largest maxNodes of its services."""
    mig = {"type": "nvidia-h100-80gb", "partitionSize": "1g.10gb"}
    # 3 downloading SDXL pods fill a node's disk; 7 mounted SD 1.5 pods fill the other node.
    world.create("hub", gpu=mig, replicas=3, node_pool={"provider": "Local", "maxNodes": 2},
                 model={"uri": "hf://org/sdxl", "family": "SDXL", "memoryGiB": 4})
    world.create("mounted", gpu=mig, replicas=7, node_pool={"provider": "Local", "maxNodes": 2})
    world.reconcile("hub", "mounted")
    strategy = world.kube.objects[("apps/v1", "Deployment", "ns", "mounted")]["spec"]["strategy"]
    assert strategy["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    # One service allows 6 nodes: the other's single replica may surge, two nodes being made.
    world.create("big", replicas=2, node_pool={"provider": "Local", "maxNodes": 6})
    world.create("small", replicas=1, node_pool={"provider": "Local", "maxNodes": 1})
    world.reconcile("big", "small", "big", "small")
    strategy = world.kube.objects[("apps/v1", "Deployment", "ns", "small")]["spec"]["strategy"]
    assert strategy["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


def test_a_pool_is_on_its_way_while_made_not_once_ready_nor_when_stuck(world) -> None:
    """What imagegen_operator_nodepool_operations_in_flight counts."""
    world.create("pooled", gpu=MIG_3G, node_pool={"provider": "GKE", "spot": True})
    assert world.reconcile("pooled").pool_on_its_way
    run_until_ready(world, "pooled")
    assert not world.reconcile("pooled").pool_on_its_way
    world.double.outage("PERMISSION_DENIED", FORBIDDEN)
    world.create("stuck", gpu=MIG_3G, node_pool={"provider": "GKE", "spot": True,
                                                 "name": "stuck-pool"})
    assert not world.reconcile("stuck").pool_on_its_way


def test_a_gke_outage_leaves_a_serving_service_ready(world) -> None:
    """GKE unreachable says nothing of the nodes: a service that served goes on being Ready,
    and its NodePoolReady says why the pool could not be read."""
    world.create("steady", gpu=MIG_3G, node_pool={"provider": "GKE", "spot": True})
    run_until_ready(world, "steady")
    world.double.outage("UNAVAILABLE")
    world.clock.now += 60
    assert world.reconcile("steady").ready
    pool = world.condition("steady", "NodePoolReady")
    assert (pool["status"], pool["reason"]) == ("True", "GkeUnavailable")
    assert "serving when last seen" in pool["message"]
    assert world.condition("steady", "Ready")["status"] == "True"


FORBIDDEN = "Required 'container.clusters.update' permission for the cluster."


def test_a_service_whose_pool_was_refused_every_time_is_deleted_at_once(world) -> None:
    """No rights to make a pool (Workload Identity not set up, say): the delete does not wait
    for a pool that cannot exist."""
    world.double.outage("PERMISSION_DENIED", FORBIDDEN)
    world.create("refused", gpu=MIG_3G, node_pool={"provider": "GKE", "spot": True})
    for _ in range(2):
        world.reconcile("refused")
    assert world.body("refused")["status"]["nodePool"]["created"] is False
    assert world.condition("refused", "NodePoolReady")["reason"] == "PermissionDenied"
    assert world.delete("refused")
    assert not [e for e in world.events if e[2] == "NodePoolNotDeleted"]


def test_a_pool_named_but_never_asked_for_does_not_hold_the_delete(world, monkeypatch):
    """A reconcile that names the pool and fails before asking for it (the Deployment's
    apply, say) leaves it never made, not unknown: refused at every later ask, the service
    is still deleted at once."""
    world.double.outage("PERMISSION_DENIED", FORBIDDEN)
    world.create("hiccup", gpu=MIG_3G, node_pool={"provider": "GKE", "spot": True})
    apply = world.reconciler._apply_workload

    def unavailable_once(*args: Any, **kwargs: Any):
        monkeypatch.setattr(world.reconciler, "_apply_workload", apply)
        raise TransientKubeError("apply Deployment hiccup: 503 etcdserver: leader changed")

    monkeypatch.setattr(world.reconciler, "_apply_workload", unavailable_once)
    with pytest.raises(TransientKubeError):
        world.reconcile("hiccup")
    assert not world.double.requests_to("POST")
    for _ in range(2):
        world.reconcile("hiccup")
    assert world.body("hiccup")["status"]["nodePool"]["created"] is False
    assert world.delete("hiccup")


def test_a_move_to_a_pool_asked_for_by_an_operator_that_stopped_is_waited_for(
        world, monkeypatch) -> None:
    """The pool a move is asked for replaces one refused before: what that one's record
    said (never made) does not stay on the new one."""
    world.double.outage("PERMISSION_DENIED", FORBIDDEN)
    world.create("mover", gpu=MIG_3G, node_pool={"provider": "GKE", "spot": True})
    world.reconcile("mover")
    world.edit("mover", gpu={"type": "nvidia-h100-80gb", "partitionSize": "1g.10gb"})
    world.reconcile("mover")
    assert world.body("mover")["status"]["nodePool"]["movingTo"]["created"] is False
    world.double.outage(None)
    world.clock.now += 400
    world.edit("mover", gpu={"type": "nvidia-l4"})
    stop_before_the_status_write(world, monkeypatch, "mover")
    [made] = world.gke_pools()
    assert "created" not in world.body("mover")["status"]["nodePool"]["movingTo"]
    world.double.outage("PERMISSION_DENIED", FORBIDDEN)
    assert not world.delete("mover")  # waits for the pool that may exist
    assert world.gke_pools() == {made}


def test_a_pool_that_was_made_is_waited_for_when_its_delete_is_refused(world) -> None:
    world.create("made", gpu=MIG_3G, node_pool={"provider": "GKE", "spot": True})
    run_until_ready(world, "made")
    assert world.body("made")["status"]["nodePool"]["created"] is True
    [pool] = world.gke_pools()
    world.double.outage("PERMISSION_DENIED", FORBIDDEN)
    assert not world.delete("made")
    assert world.gke_pools() == {pool}
    [(_, _, reason, message)] = [e for e in world.events
                                  if e[1] == "Warning" and e[2] != UNAUTHENTICATED]
    assert reason == "NodePoolNotDeleted" and FORBIDDEN in message
    # Until the delay ends, a retry neither asks GKE nor lists every service to find users.
    listed, list_ = [], world.kube.list
    world.kube.list = lambda *args, **kw: listed.append(args[:2]) or list_(*args, **kw)
    asked = len(world.double.requests)
    assert not world.delete("made")
    assert len(world.double.requests) == asked and (api.API_VERSION, api.KIND) not in listed
    world.kube.list = list_
    # Asked again and again, it is said once, not at each ask; and again after half an hour.
    for _ in range(3):
        world.clock.now += 61
        assert not world.delete("made")
    assert len(world.double.requests) > asked

    def said() -> int:
        return sum(e[2] == "NodePoolNotDeleted" for e in world.events)

    assert said() == 1
    world.clock.now += 1800
    assert not world.delete("made") and said() == 2
    world.double.outage(None)
    world.clock.now += 61
    delete_until_done(world, "made")
    assert world.gke_pools() == set()


def test_a_delete_gke_takes_and_then_fails_is_said_and_asked_again(world) -> None:
    world.create("failing", gpu=MIG_3G, node_pool={"provider": "GKE", "spot": True})
    run_until_ready(world, "failing")
    [pool] = world.gke_pools()
    world.double.fail_next_delete("Internal error while deleting the node pool.")
    for _ in range(4):
        assert not world.delete("failing")
    assert world.gke_pools() == {pool}
    [message] = [e[3] for e in world.events if e[2] == "NodePoolNotDeleted"]
    assert "DeleteFailed" in message and "Internal error while deleting" in message
    assert "asked again" in message
    world.clock.now += 61
    delete_until_done(world, "failing")
    assert world.gke_pools() == set()


def test_after_an_error_that_passes_created_is_unknown_and_a_delete_waits(world) -> None:
    """A create whose answer was lost may have been taken: only refusals for good from the
    first ask on make a pool `created: false`."""
    world.double.outage("UNAVAILABLE")
    world.create("unsure", gpu=MIG_3G, node_pool={"provider": "GKE", "spot": True})
    world.reconcile("unsure")
    assert world.body("unsure")["status"]["nodePool"].get("created") is None
    world.double.outage("PERMISSION_DENIED", FORBIDDEN)
    world.clock.now += 400
    world.reconcile("unsure")
    assert world.body("unsure")["status"]["nodePool"].get("created") is None
    assert not world.delete("unsure")


def test_a_move_away_from_a_pool_that_was_never_made_finishes(world) -> None:
    world.double.outage("PERMISSION_DENIED", FORBIDDEN)
    world.create("away", gpu=MIG_3G, node_pool={"provider": "GKE", "spot": True})
    world.reconcile("away")
    world.edit("away", nodePool={"provider": "Local", "maxNodes": 2})
    run_until_ready(world, "away")
    status = world.body("away")["status"]["nodePool"]
    assert status["provider"] == "Local" and not status.get("movingTo")
    assert not status.get("releasing")


def test_edits_while_a_move_is_refused_do_not_fill_the_pools_to_release(world) -> None:
    """status.nodePool.releasing holds 16 at most (the API server refuses more): a target
    refused at every ask cannot exist, and one asked for is listed once however often the
    spec goes back and forth."""
    world.create("edited", gpu=MIG_3G, node_pool={"provider": "GKE", "spot": True})
    run_until_ready(world, "edited")

    def edit_to(size: str) -> dict:
        world.edit("edited", gpu={"type": "nvidia-h100-80gb", "partitionSize": size})
        world.clock.now += 400
        world.reconcile("edited")
        return world.body("edited")["status"]["nodePool"]

    world.double.outage("PERMISSION_DENIED", FORBIDDEN)
    for size in ["2g.20gb", "1g.20gb"] * 10:
        recorded = edit_to(size)
    assert recorded["movingTo"]["name"].endswith("mig1g20gb-spot")
    assert not recorded.get("releasing")
    world.double.outage(None)
    world.double.polls_to_done = 1000  # asked for and on its way: it exists, not ready
    for size in ["2g.20gb", "1g.20gb"] * 10:
        recorded = edit_to(size)
    releasing = [r["name"] for r in recorded.get("releasing") or []]
    assert sorted(releasing) == ["igs-h100x1-mig2g20gb-spot"]


def test_a_pool_in_error_is_not_kept_ready_by_its_last_state(world) -> None:
    world.create("broken", gpu=MIG_3G, node_pool={"provider": "GKE", "spot": True})
    run_until_ready(world, "broken")
    [pool] = world.gke_pools()
    world.double.pools[pool]["status"] = "ERROR"
    world.clock.now += 60
    assert not world.reconcile("broken").ready
    assert world.condition("broken", "NodePoolReady")["reason"] == "PoolError"


def test_a_pool_made_just_before_a_crash_is_still_named_and_retired(world, monkeypatch) -> None:
    """The operator stops after GKE accepted the create and before status is written; the
    spec changes meanwhile. Status named the pool before it was asked for, so the next
    spec's reconcile retires it instead of leaving it to run, unnamed."""
    world.create("crashy", gpu=MIG_3G, node_pool={"provider": "GKE", "spot": True})

    def crash(*args, **kwargs):
        raise RuntimeError("the operator stopped here")

    monkeypatch.setattr(world.reconciler, "_write_status", crash)
    with pytest.raises(RuntimeError):
        world.reconcile("crashy")
    monkeypatch.undo()
    [first] = world.gke_pools()
    world.edit("crashy", gpu={"type": "nvidia-h100-80gb", "partitionSize": "1g.10gb"})
    for _ in range(8):
        world.nodes_ready()
        world.rolled_out("crashy")
        world.reconcile("crashy")
        world.clock.now += 30
        if first not in world.gke_pools():
            break
    assert first not in world.gke_pools()


def test_a_status_written_before_created_was_recorded_waits_for_its_pool(world) -> None:
    world.create("older", gpu=MIG_3G, node_pool={"provider": "GKE", "spot": True})
    run_until_ready(world, "older")
    body = world.body("older")
    del body["status"]["nodePool"]["created"]  # as an older operator wrote it
    world.kube.put(body)
    world.double.outage("PERMISSION_DENIED", FORBIDDEN)
    assert not world.delete("older")


def test_providers_are_not_asked_again_before_their_delay(world) -> None:
    world.create("waits", node_pool={"provider": "GKE", "cluster": CLUSTER_A})
    world.double.outage("RESOURCE_EXHAUSTED", "Too many requests: rate limit")
    outcome = world.reconcile("waits")
    assert outcome.requeue_after == 15
    asked = len(world.double.requests)
    world.clock.now += 14
    assert world.reconcile("waits").requeue_after == pytest.approx(1)
    assert len(world.double.requests) == asked
    world.double.outage(None)
    world.clock.now += 1
    world.reconcile("waits")
    assert len(world.double.requests) > asked
    assert world.condition("waits", "NodePoolReady")["reason"] in ("Provisioning", "Ready")


PRECOMPILE = {"compile": {"enabled": True, "cache": {"pvcName": "compile-cache"},
                          "precompileJob": True}}


def jobs_of(world) -> list[dict]:
    return [obj for (_, kind, _, _), obj in world.kube.objects.items() if kind == "Job"]


def replicas_of(world, name: str) -> int:
    return world.kube.objects[("apps/v1", "Deployment", "ns", name)]["spec"]["replicas"]


def finish(job: dict, how: str = "Complete") -> None:
    """What the Job controller does once the pod has exited."""
    job["status"] = {"conditions": [{"type": how, "status": "True"}]}


def test_a_precompile_job_holds_the_deployment_at_zero_until_it_succeeds(world) -> None:
    world.create("alpha", node_pool={"provider": "Local", "maxNodes": 2}, replicas=2,
                 pipeline=PRECOMPILE)
    world.reconcile("alpha")
    world.nodes_ready()  # the Job's pod runs on the pool's nodes
    world.reconcile("alpha")
    [job] = jobs_of(world)
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["precompile"]
    assert replicas_of(world, "alpha") == 0
    assert world.condition("alpha", "Ready")["reason"] == "Precompiling"
    assert world.condition("alpha", "Precompiled")["reason"] == "JobRunning"

    finish(job)
    world.reconcile("alpha")
    assert replicas_of(world, "alpha") == 2
    world.rolled_out("alpha")
    assert world.reconcile("alpha").ready
    assert world.condition("alpha", "Precompiled")["status"] == "True"

    assert world.body("alpha")["status"]["precompiledJob"] == job["metadata"]["name"]
    # Done is done: a Job deleted afterwards (a TTL, by hand) is not run again.
    world.kube.objects.pop(("batch/v1", "Job", "ns", job["metadata"]["name"]))
    world.reconcile("alpha")
    assert jobs_of(world) == [] and replicas_of(world, "alpha") == 2

    # A serving knob is not a new compile.
    world.edit("alpha", pipeline={**PRECOMPILE, "stages": {"batchWindowMs": 20}})
    world.reconcile("alpha")
    assert jobs_of(world) == []
    # Another model is: a new Job; the service serves on meanwhile (an edit never takes it
    # down), its new replicas compiling for themselves.
    world.edit("alpha", model={"uri": "gs://models/other", "family": "SD15", "memoryGiB": 4})
    world.reconcile("alpha")
    [again] = jobs_of(world)
    assert again["metadata"]["name"] != job["metadata"]["name"]
    assert replicas_of(world, "alpha") == 2
    assert world.condition("alpha", "Ready")["reason"] != "Precompiling"
    assert world.condition("alpha", "Precompiled")["reason"] == "JobRunning"
    # Nor when no replica is ready for a while (a Spot node taken): it is not held again.
    world.kube.objects[("apps/v1", "Deployment", "ns", "alpha")]["status"]["readyReplicas"] = 0
    world.reconcile("alpha")
    assert replicas_of(world, "alpha") == 2
    # The cache volume is part of what a Job is for: another claim holds no artifacts.
    world.edit("alpha", model={"uri": "gs://models/other", "family": "SD15", "memoryGiB": 4},
               pipeline={**PRECOMPILE, "compile": {**PRECOMPILE["compile"],
                                                   "cache": {"pvcName": "other-cache"}}})
    world.reconcile("alpha")
    assert again["metadata"]["name"] not in {j["metadata"]["name"] for j in jobs_of(world)}


@pytest.mark.parametrize(("how", "reason"), [("Failed", "JobFailed"),
                                             ("Suspended", "JobSuspended")])
def test_a_failed_or_suspended_precompile_job_lets_the_replicas_compile_for_themselves(
    world, how, reason
) -> None:
    world.create("beta", node_pool={"provider": "Local", "maxNodes": 2}, replicas=1,
                 pipeline=PRECOMPILE)
    world.reconcile("beta")
    finish(jobs_of(world)[0], how)
    world.nodes_ready()
    world.reconcile("beta")
    assert replicas_of(world, "beta") == 1
    world.rolled_out("beta")
    assert world.reconcile("beta").ready
    precompiled = world.condition("beta", "Precompiled")
    assert precompiled["status"] == "False" and precompiled["reason"] == reason


def test_a_failed_precompile_job_says_what_the_job_controller_said(world) -> None:
    world.create("zeta", node_pool={"provider": "Local", "maxNodes": 2}, replicas=1,
                 pipeline=PRECOMPILE)
    world.reconcile("zeta")
    [job] = jobs_of(world)
    job["status"] = {"conditions": [{"type": "Failed", "status": "True",
                                     "reason": "DeadlineExceeded", "message":
                                     "Job was active longer than specified deadline"}]}
    world.reconcile("zeta")
    message = world.condition("zeta", "Precompiled")["message"]
    assert "(DeadlineExceeded: Job was active longer than specified deadline)" in message
    # Scaled to zero and up again: a Job that failed stays failed, and holds nothing.
    world.edit("zeta", replicas=0)
    world.reconcile("zeta")
    assert len(jobs_of(world)) == 1
    world.edit("zeta", replicas=1)
    world.reconcile("zeta")
    assert replicas_of(world, "zeta") == 1


def test_a_suspended_job_admitted_later_does_not_take_the_started_replicas_away(world) -> None:
    # A queue (Kueue) suspends the Job: the replicas start and compile for themselves; when
    # it admits the Job after all, they are not scaled back to 0 mid-compile.
    world.create("delta", node_pool={"provider": "Local", "maxNodes": 2}, replicas=1,
                 pipeline=PRECOMPILE)
    world.reconcile("delta")
    [job] = jobs_of(world)
    finish(job, "Suspended")
    world.nodes_ready()
    world.reconcile("delta")
    assert replicas_of(world, "delta") == 1
    job["status"] = {}  # admitted: running again, and no replica ready yet
    world.reconcile("delta")
    assert replicas_of(world, "delta") == 1
    assert world.condition("delta", "Ready")["reason"] != "Precompiling"


def test_a_precompile_job_whose_pod_cannot_be_placed_says_why(world) -> None:
    world.create("eps", node_pool={"provider": "Local", "maxNodes": 2}, replicas=1,
                 pipeline=PRECOMPILE)
    world.reconcile("eps")
    world.nodes_ready()
    [job] = jobs_of(world)
    name = job["metadata"]["name"]
    world.kube.put({"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": f"{name}-x7k2q", "namespace": "ns",
        "labels": {"batch.kubernetes.io/job-name": name}},
        "status": {"conditions": [{"type": "PodScheduled", "status": "False",
                                   "reason": "Unschedulable", "message":
                                   'persistentvolumeclaim "compile-cache" not found'}]}})
    world.reconcile("eps")
    for kind in ("Ready", "Precompiled"):
        message = world.condition("eps", kind)["message"]
        assert 'waiting for a place: eps-precompile-' in message, kind
        assert 'persistentvolumeclaim "compile-cache" not found' in message, kind


def test_a_service_scaled_to_zero_runs_no_precompile_job(world) -> None:
    world.create("idle", node_pool={"provider": "Local", "maxNodes": 2}, replicas=1,
                 pipeline=PRECOMPILE)
    world.reconcile("idle")
    assert len(jobs_of(world)) == 1
    world.edit("idle", replicas=0)  # the running Job goes: no GPU spent for nothing
    world.reconcile("idle")
    assert jobs_of(world) == [] and replicas_of(world, "idle") == 0
    world.edit("idle", replicas=1)  # scaled up: the Job runs, and the replica waits for it
    world.reconcile("idle")
    world.nodes_ready()
    world.reconcile("idle")
    assert len(jobs_of(world)) == 1 and replicas_of(world, "idle") == 0
    assert world.condition("idle", "Ready")["reason"] == "Precompiling"


def test_no_precompile_job_unless_asked_for(world) -> None:
    world.create("gamma", node_pool={"provider": "Local", "maxNodes": 2}, replicas=1,
                 pipeline={"compile": {"enabled": True, "cache": {"pvcName": "compile-cache"}}})
    world.reconcile("gamma")
    assert jobs_of(world) == [] and replicas_of(world, "gamma") == 1
    assert not any(c["type"] == "Precompiled" for c in world.body("gamma")["status"]["conditions"])


def test_a_shared_local_pool_takes_the_largest_max_nodes_of_its_users(world) -> None:
    whole_l4 = {"type": "nvidia-l4"}
    world.create("small", gpu=whole_l4, node_pool={"provider": "Local", "maxNodes": 1},
                 replicas=2)
    world.create("large", gpu=whole_l4, node_pool={"provider": "Local", "maxNodes": 3},
                 replicas=2)
    for order in (("small", "large"), ("large", "small"), ("small",)):
        world.reconcile(*order)
        nodes = [k for k in world.kube.objects if k[1] == "Node"]
        # 4 replicas of one GPU each want 4 nodes; the pool holds at most 3, whoever asks.
        assert len(nodes) == 3, (order, nodes)


def test_a_shared_gke_pool_is_brought_to_the_largest_bounds_of_its_users(world) -> None:
    whole_l4 = {"type": "nvidia-l4"}
    pool = {"provider": "GKE", "cluster": CLUSTER_A}
    world.create("small", gpu=whole_l4, node_pool={**pool, "maxNodes": 1})
    world.reconcile("small")
    world.reconcile("small")  # the create is done: the pool runs
    [name] = world.gke_pools()
    assert world.double.pools[name]["autoscaling"]["totalMaxNodeCount"] == 1

    # A second service joins with room for more nodes: the running pool is updated,
    # once, whichever of the two reconciles, and neither stops being served.
    world.create("large", gpu=whole_l4, node_pool={**pool, "minNodes": 1, "maxNodes": 3})
    for _ in range(3):
        world.reconcile("small", "large")
    assert len(world.double.requests_to("POST", ":setAutoscaling")) == 1
    autoscaling = world.double.pools[name]["autoscaling"]
    assert (autoscaling["totalMinNodeCount"], autoscaling["totalMaxNodeCount"]) == (1, 3)
    assert world.condition("small", "NodePoolReady")["status"] == "True"

    # Its user goes: the pool shrinks back to the bounds of the one left.
    while not world.delete("large"):
        pass
    world.reconcile("small")
    world.reconcile("small")
    autoscaling = world.double.pools[name]["autoscaling"]
    # (proto3 JSON leaves zeros out)
    assert (autoscaling.get("totalMinNodeCount", 0), autoscaling["totalMaxNodeCount"]) == (0, 1)


def test_a_shared_config_connector_pool_has_one_spec_whoever_applies_it(world) -> None:
    whole_l4 = {"type": "nvidia-l4"}
    pool = {"provider": "ConfigConnector", "cluster": CLUSTER_A}
    world.create("small", gpu=whole_l4, node_pool={**pool, "maxNodes": 1})
    world.create("large", gpu=whole_l4, node_pool={**pool, "maxNodes": 3})
    world.reconcile("small", "large")
    [pool_key] = [k for k in world.kube.objects if k[1] == "ContainerNodePool"]
    spec = world.kube.objects[pool_key]["spec"]
    assert (spec["autoscaling"]["totalMinNodeCount"], spec["autoscaling"]["totalMaxNodeCount"]) \
        == (0, 3)
    writes = len(world.kube.writes_of("ContainerNodePool"))
    for order in (("small", "large"), ("large", "small")):
        world.reconcile(*order)
    assert len(world.kube.writes_of("ContainerNodePool")) == writes  # no flip-flop


def test_services_naming_the_same_zones_in_another_order_share_one_spec(world) -> None:
    pool = {"provider": "ConfigConnector", "cluster": CLUSTER_A}
    world.create("ac", node_pool={**pool, "locations": ["us-central1-a", "us-central1-c"]})
    world.create("ca", node_pool={**pool, "locations": ["us-central1-c", "us-central1-a"]})
    world.reconcile("ac", "ca")
    [obj] = config_connector_pools(world).values()
    assert obj["spec"]["nodeLocations"] == ["us-central1-a", "us-central1-c"]
    writes = len(world.kube.writes_of("ContainerNodePool"))
    for order in (("ac", "ca"), ("ca", "ac")):
        world.reconcile(*order)
    assert len(world.kube.writes_of("ContainerNodePool")) == writes  # no flip-flop


def test_a_service_refused_for_its_zones_neither_sizes_nor_keeps_a_pool(world) -> None:
    pool = {"provider": "GKE", "name": "team-pool"}
    world.create("user", node_pool=pool)
    world.create("refused", node_pool={**pool, "maxNodes": 9, "locations": ["europe-west4-a"]})
    world.reconcile("user", "refused")
    assert world.condition("refused", "NodePoolReady")["reason"] == "LocationsOutsideCluster"
    [made] = world.double.pools.values()
    assert made["autoscaling"]["totalMaxNodeCount"] == 4  # the user's, not the refused 9
    delete_until_done(world, "user")
    assert not world.gke_pools()  # not kept for the refused service
    delete_until_done(world, "refused")


def test_a_config_connector_pool_keeps_the_initial_node_count_it_was_made_with(world) -> None:
    """initialNodeCount is immutable in Config Connector: a later minNodes moves the
    autoscaler's floor, never that field."""
    pool = {"provider": "ConfigConnector", "cluster": CLUSTER_A}
    world.create("floor", gpu={"type": "nvidia-l4"}, node_pool={**pool, "maxNodes": 3})
    world.reconcile("floor")
    world.edit("floor", nodePool={**pool, "minNodes": 2, "maxNodes": 3})
    world.reconcile("floor")
    [obj] = [o for (_, kind, _, _), o in world.kube.objects.items()
             if kind == "ContainerNodePool"]
    assert obj["spec"]["initialNodeCount"] == 0
    assert obj["spec"]["autoscaling"]["totalMinNodeCount"] == 2


def test_a_config_connector_pool_keeps_the_nodes_account_it_was_made_with(
        world, monkeypatch) -> None:
    """Immutable too: the operator's node service account names that of pools made after."""
    pool = {"provider": "ConfigConnector", "cluster": CLUSTER_A}
    world.create("made", gpu={"type": "nvidia-l4"}, node_pool=pool)
    world.reconcile("made")
    monkeypatch.setenv("IMAGEGEN_GKE_NODE_SERVICE_ACCOUNT",
                       "gpu-nodes@imagegen-test.iam.gserviceaccount.com")
    world.reconcile("made")
    [made] = config_connector_pools(world).values()
    assert "serviceAccountRef" not in made["spec"]["nodeConfig"]
    world.create("later", gpu={"type": "nvidia-l4", "countPerNode": 2}, node_pool=pool)
    world.reconcile("later")
    [later] = [o for o in config_connector_pools(world).values() if o is not made]
    assert later["spec"]["nodeConfig"]["serviceAccountRef"] == {
        "external": "gpu-nodes@imagegen-test.iam.gserviceaccount.com"}


def test_a_config_connector_pool_keeps_the_pods_a_node_it_was_made_for(world) -> None:
    """maxPodsPerNode is immutable: one made without (the cluster's maximum) stays without,
    and one with less room than a node's serving pods need is refused, named."""
    dense = {"type": "nvidia-h100-80gb", "countPerNode": 8, "partitionSize": "1g.10gb",
             "sharing": {"strategy": "TimeSharing", "maxSharedClientsPerGpu": 2}}
    world.create("dense", gpu=dense, node_pool={"provider": "ConfigConnector",
                                                "cluster": CLUSTER_A})
    world.reconcile("dense")
    [made] = config_connector_pools(world).values()
    assert made["spec"]["maxPodsPerNode"] == 128  # 112 serving pods and GKE's own
    del made["spec"]["maxPodsPerNode"]  # as made before pools were made for their pods
    world.reconcile("dense")
    [kept] = config_connector_pools(world).values()
    assert "maxPodsPerNode" not in kept["spec"]
    kept["spec"]["maxPodsPerNode"] = 110
    world.reconcile("dense")
    condition = world.condition("dense", "NodePoolReady")
    assert condition["reason"] == "PoolConfigMismatch"
    assert "at most 110 pods on a node" in condition["message"]
    assert "spec.nodePool.name" in condition["message"]


def test_a_config_connector_pool_keeps_its_machines_and_gpu_settings(world) -> None:
    """Immutable as well: a derived machine type another release names differently, and the
    GPUs' driver setting, stay as the pool was made."""
    world.create("made", gpu={"type": "nvidia-l4"},
                 node_pool={"provider": "ConfigConnector", "cluster": CLUSTER_A})
    world.reconcile("made")
    [made] = config_connector_pools(world).values()
    node_config = made["spec"]["nodeConfig"]
    node_config["machineType"] = "g2-standard-4"  # what an earlier release derived
    node_config["guestAccelerator"][0]["gpuDriverInstallationConfig"] = {
        "gpuDriverVersion": "DEFAULT"}
    before = json.loads(json.dumps(made["spec"]))
    world.reconcile("made")
    [kept] = config_connector_pools(world).values()
    assert kept["spec"]["nodeConfig"] == before["nodeConfig"]


def test_a_config_connector_pool_whose_update_fails_serves_on(world) -> None:
    """New bounds refused: Config Connector's Ready turns False, but the pool's nodes serve;
    its condition says what failed and the service stays Ready."""
    pool = {"provider": "ConfigConnector", "cluster": CLUSTER_A}
    world.create("svc", node_pool=pool)
    world.reconcile("svc")
    [obj] = config_connector_pools(world).values()
    obj["status"] = {"conditions": [{"type": "Ready", "status": "True", "reason": "UpToDate"}]}
    world.kube.put({"apiVersion": "v1", "kind": "Node",
                    "metadata": {"name": "n1", "labels": {gke.LABEL_NODEPOOL: obj["metadata"][
                        "name"]}},
                    "status": {"conditions": [{"type": "Ready", "status": "True"}]}})
    world.rolled_out("svc")
    assert world.reconcile("svc").ready
    obj["status"] = {"conditions": [{"type": "Ready", "status": "False", "reason": "UpdateFailed",
                                     "message": "Update call failed: the cluster is busy"}]}
    assert world.reconcile("svc").ready
    pool_ready = world.condition("svc", "NodePoolReady")
    assert (pool_ready["status"], pool_ready["reason"]) == ("True", "UpdateFailed")
    assert "the cluster is busy" in pool_ready["message"]


def config_connector_pools(world) -> dict[tuple[str, str], dict]:
    return {(ns, name): obj for (_, kind, ns, name), obj in world.kube.objects.items()
            if kind == "ContainerNodePool"}


def test_config_connector_pools_of_two_namespaces_never_make_one_gke_pool(world) -> None:
    """Config Connector makes one GKE pool of every object with its name and cluster:
    a second namespace's service is told to take another name, and the first one's
    delete removes its object even though the other service asked for the same."""
    pool = {"provider": "ConfigConnector", "cluster": CLUSTER_A}
    world.create("team-a/alpha", node_pool=pool)
    world.create("team-b/beta", node_pool=pool)
    world.reconcile("team-a/alpha", "team-b/beta")
    [(namespace, name)] = config_connector_pools(world)
    assert namespace == "team-a"
    claimed = world.condition("team-b/beta", "NodePoolReady")
    assert (claimed["status"], claimed["reason"]) == ("False", "PoolClaimed")
    assert "spec.nodePool.name" in claimed["message"]
    assert "team-a" not in claimed["message"]  # another team's names are not told

    delete_until_done(world, "team-a/alpha")
    assert not config_connector_pools(world)
    world.reconcile("team-b/beta")
    assert list(config_connector_pools(world)) == [("team-b", name)]


def test_one_gke_pool_is_managed_through_one_provider_only(world) -> None:
    """GKE's API and a Config Connector object derive the same pool name for the same GPU
    settings: the service made first keeps the pool, a later one through the other
    provider is refused before anything is made, and deleting the later one takes
    nothing."""
    world.create("first", node_pool={"provider": "GKE", "cluster": CLUSTER_A})
    world.create("second", node_pool={"provider": "ConfigConnector", "cluster": CLUSTER_A})
    world.reconcile("first", "second", "first")
    name = world.body("first")["status"]["nodePool"]["name"]
    assert world.gke_pools() == {f"{CLUSTER_A}/nodePools/{name}"}
    refused = world.condition("second", "NodePoolReady")
    assert (refused["status"], refused["reason"]) == ("False", "PoolClaimed")
    assert "ns/first" in refused["message"] and "spec.nodePool.name" in refused["message"]
    assert not config_connector_pools(world)
    assert world.condition("first", "NodePoolReady")["reason"] != "PoolClaimed"

    assert world.delete("second") is True
    assert world.gke_pools() == {f"{CLUSTER_A}/nodePools/{name}"}


def test_a_service_that_has_no_pool_yet_is_refused_whichever_came_first(world) -> None:
    # An older service fixed late, and one that switches provider while a second service
    # stays on the pool: neither has the pool, so neither takes it over.
    world.create("older", node_pool={"provider": "ConfigConnector", "cluster": "bad"})
    world.create("newer", node_pool={"provider": "GKE", "cluster": CLUSTER_A})
    world.reconcile("older", "newer")
    name = world.body("newer")["status"]["nodePool"]["name"]
    world.edit("older", nodePool={"provider": "ConfigConnector", "cluster": CLUSTER_A})
    world.reconcile("older", "newer")
    assert world.condition("older", "NodePoolReady")["reason"] == "PoolClaimed"
    assert world.condition("newer", "NodePoolReady")["reason"] != "PoolClaimed"
    assert not config_connector_pools(world)

    world.create("sharer", node_pool={"provider": "GKE", "cluster": CLUSTER_A})
    world.reconcile("sharer")
    assert world.body("sharer")["status"]["nodePool"]["name"] == name
    world.edit("newer", nodePool={"provider": "ConfigConnector", "cluster": CLUSTER_A})
    world.reconcile("newer", "sharer")
    assert world.condition("newer", "NodePoolReady")["reason"] == "PoolClaimed"
    assert world.condition("sharer", "NodePoolReady")["reason"] != "PoolClaimed"
    assert not config_connector_pools(world)


def on_one_pool_through_both_providers(world, through_cc: str, through_gke: str):
    """Two services on one GKE pool, one through Config Connector and one through GKE's API
    (as an earlier version let them be): the pool's name, and the GKE service's record."""
    world.create(through_cc, node_pool={"provider": "ConfigConnector", "cluster": CLUSTER_A})
    world.reconcile(through_cc)
    [(_, name)] = config_connector_pools(world)
    world.create(through_gke, node_pool={"provider": "GKE", "cluster": CLUSTER_A})
    resource = api.parse(world.body(through_gke))
    made = render_gke_nodepool(resource, plan(resource.spec))["spec"]
    world.double.seed_pool(f"{CLUSTER_A}/nodePools/{name}",
                           **{k: v for k, v in made.items() if k != "name"})
    record = {"name": name, "provider": "GKE", "cluster": CLUSTER_A, "created": True}
    world.kube.patch_status(api.API_VERSION, api.KIND, through_gke, "ns", {"nodePool": record})
    return name, record


def test_a_service_on_a_namesake_pool_keeps_it_while_the_other_provider_leaves(world) -> None:
    """Two services already on one GKE pool through both providers (made before they were
    told apart): deleting either keeps the pool for the other."""
    name, record = on_one_pool_through_both_providers(world, "first", "second")
    assert world.delete("second") is True
    assert not world.double.requests_to("DELETE", f"/nodePools/{name}")
    assert world.gke_pools() == {f"{CLUSTER_A}/nodePools/{name}"}
    # The other way round: the Config Connector service goes, and its object with it,
    # marked so that Config Connector keeps the pool the GKE service runs on.
    world.create("third", node_pool={"provider": "GKE", "cluster": CLUSTER_A})
    world.kube.patch_status(api.API_VERSION, api.KIND, "third", "ns", {"nodePool": record})
    applied = []
    apply = world.kube.apply
    world.kube.apply = lambda obj, **kw: applied.append(obj) or apply(obj, **kw)
    delete_until_done(world, "first")
    [marked] = [o for o in applied if o["kind"] == "ContainerNodePool"]
    assert marked["metadata"]["annotations"]["cnrm.cloud.google.com/deletion-policy"] == "abandon"
    assert not config_connector_pools(world)
    assert world.gke_pools() == {f"{CLUSTER_A}/nodePools/{name}"}


def test_of_two_services_on_a_namesake_pool_the_older_keeps_it_read_from_the_index(world):
    """Two services already on one GKE pool through both providers: the one made first
    keeps it, judged on what the operator's watch-fed index holds of the other."""
    world.reconciler.services = lambda: [
        indexed(b) for b in world.kube.list(api.API_VERSION, api.KIND)]
    on_one_pool_through_both_providers(world, "b-old", "a-new")
    for service, made_at in (("b-old", "2026-01-01T00:00:00Z"), ("a-new", "2026-06-01T00:00:00Z")):
        body = world.body(service)
        body["metadata"]["creationTimestamp"] = made_at
        world.kube.put(body)
    world.reconcile("a-new", "b-old")
    assert world.condition("a-new", "NodePoolReady")["reason"] == "PoolClaimed"
    assert "ns/b-old" in world.condition("a-new", "NodePoolReady")["message"]
    assert world.condition("b-old", "NodePoolReady")["reason"] != "PoolClaimed"


def test_a_service_that_switches_provider_on_one_pool_lets_go_without_deleting(world) -> None:
    pool = {"provider": "ConfigConnector", "cluster": CLUSTER_A}
    world.create("svc", node_pool=pool)
    world.reconcile("svc")
    [(_, name)] = config_connector_pools(world)
    # The pool Config Connector made of the object: what GKE's API would have made.
    on_gke = {"provider": "GKE", "cluster": CLUSTER_A}
    world.edit("svc", nodePool=on_gke)
    resource = api.parse(world.body("svc"))
    made = render_gke_nodepool(resource, plan(resource.spec))["spec"]
    world.double.seed_pool(f"{CLUSTER_A}/nodePools/{name}",
                           **{k: v for k, v in made.items() if k != "name"})
    applied = []
    apply = world.kube.apply
    world.kube.apply = lambda obj, **kw: applied.append(obj) or apply(obj, **kw)
    for _ in range(3):
        world.nodes_ready()
        world.rolled_out("svc")
        world.reconcile("svc")
    # The object is gone, marked so that Config Connector keeps the pool; GKE's API runs it.
    [marked] = [o for o in applied if o["kind"] == "ContainerNodePool"]
    assert marked["metadata"]["annotations"]["cnrm.cloud.google.com/deletion-policy"] == "abandon"
    assert not config_connector_pools(world)
    assert world.gke_pools() == {f"{CLUSTER_A}/nodePools/{name}"}
    status = world.body("svc")["status"]["nodePool"]
    assert (status["provider"], status["name"]) == ("GKE", name) and not status.get("releasing")
    assert any(e[2] == "NodePoolHandedOver" for e in world.events)


def test_a_config_connector_pool_is_not_changed_where_config_connector_cannot(world) -> None:
    """Its cluster and its machines and GPUs are immutable in the ContainerNodePool CRD: a
    spec that would change them is refused naming the way out, and the object stays."""
    world.default_cluster = None  # else another cluster is refused sooner (ForeignCluster)
    pool = {"provider": "ConfigConnector", "cluster": CLUSTER_A, "name": "team-pool"}
    world.create("svc", node_pool=pool)
    world.reconcile("svc")
    [(namespace, name)] = config_connector_pools(world)
    before = dict(config_connector_pools(world)[(namespace, name)]["spec"])
    for change in ({"nodePool": {**pool, "cluster": CLUSTER_B}},
                   {"gpu": {"type": "nvidia-l4"}},
                   # Zones Config Connector could change, under every service on the pool.
                   {"nodePool": {**pool, "locations": ["us-central1-b"]}}):
        world.edit("svc", **change)
        world.reconcile("svc")
        refused = world.condition("svc", "NodePoolReady")
        assert refused["reason"] == "PoolConfigMismatch", change
        assert "spec.nodePool.name" in refused["message"]
        assert config_connector_pools(world)[(namespace, name)]["spec"] == before
        world.edit("svc", nodePool=pool, gpu=TS2_L4)
    # Deleting the service deletes the object of the pool it made, in its own cluster.
    world.edit("svc", nodePool={**pool, "cluster": CLUSTER_B})
    delete_until_done(world, "svc")
    assert not config_connector_pools(world)


def test_a_config_connector_pool_on_its_way_out_is_not_ready(world) -> None:
    pool = {"provider": "ConfigConnector", "cluster": CLUSTER_A}
    world.create("svc", node_pool=pool)
    world.reconcile("svc")
    [(namespace, name)] = config_connector_pools(world)
    obj = config_connector_pools(world)[(namespace, name)]
    obj["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    obj["status"] = {"conditions": [{"type": "Ready", "status": "True", "reason": "UpToDate"}]}
    world.reconcile("svc")
    assert world.condition("svc", "NodePoolReady")["reason"] == "Deleting"


def test_a_container_node_pool_the_operator_did_not_make_is_left_alone(world) -> None:
    pool = {"provider": "ConfigConnector", "cluster": CLUSTER_A, "name": "platform-pool"}
    world.create("alpha", node_pool=pool)
    theirs = world.kube.put({
        "apiVersion": "container.cnrm.cloud.google.com/v1beta1", "kind": "ContainerNodePool",
        "metadata": {"name": "platform-pool", "namespace": "ns"},
        "spec": {"clusterRef": {"external": CLUSTER_A}, "nodeConfig": {"machineType": "e2"}},
    })
    world.reconcile("alpha")
    refused = world.condition("alpha", "NodePoolReady")
    assert refused["reason"] == "PoolNotOwned" and "spec.nodePool.name" in refused["message"]
    delete_until_done(world, "alpha")
    assert config_connector_pools(world) == {("ns", "platform-pool"): theirs}


def test_a_gke_pool_made_outside_is_not_taken_over_through_config_connector(world) -> None:
    """Config Connector acquires a GKE pool of the object's name, and deletes it with the
    object: one whose nodes the operator did not make (the cluster's default-pool) is
    refused before any object exists; one of the operator's own may be handed over."""
    from imagegen_operator import gke

    def node(name: str, pool: str, ours: bool) -> dict:
        labels = {gke.LABEL_NODEPOOL: pool, **({POOL_LABEL: pool} if ours else {})}
        return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}

    world.kube.put(node("gke-default-pool-1", "default-pool", ours=False))
    world.create("grab", node_pool={"provider": "ConfigConnector", "cluster": CLUSTER_A,
                                    "name": "default-pool"})
    world.reconcile("grab")
    refused = world.condition("grab", "NodePoolReady")
    assert refused["reason"] == "PoolNotOwned" and "spec.nodePool.name" in refused["message"]
    assert not config_connector_pools(world)
    delete_until_done(world, "grab")
    world.kube.put(node("gke-ours-1", "ours", ours=True))
    world.create("handed", node_pool={"provider": "ConfigConnector", "cluster": CLUSTER_A,
                                      "name": "ours"})
    world.reconcile("handed")
    assert world.condition("handed", "NodePoolReady")["reason"] != "PoolNotOwned"
    assert ("ns", "ours") in config_connector_pools(world)


def test_two_namespaces_objects_for_one_gke_pool_delete_without_taking_it(world) -> None:
    """Objects made before ConfigConnector pools were kept per namespace: the first
    service to go marks its object so Config Connector keeps the GKE pool for the other."""
    pool = {"provider": "ConfigConnector", "cluster": CLUSTER_A}
    world.create("team-a/alpha", node_pool=pool)
    world.reconcile("team-a/alpha")
    [(_, name)] = config_connector_pools(world)
    theirs = dict(config_connector_pools(world)[("team-a", name)])
    theirs["metadata"] = {**theirs["metadata"], "namespace": "team-b"}
    world.kube.put(theirs)
    world.create("team-b/beta", node_pool=pool)
    world.reconcile("team-b/beta")
    assert world.condition("team-b/beta", "NodePoolReady")["reason"] != "PoolClaimed"

    applied = []
    apply = world.kube.apply
    world.kube.apply = lambda obj, **kw: applied.append(obj) or apply(obj, **kw)
    delete_until_done(world, "team-a/alpha")
    [marked] = [o for o in applied if o["kind"] == "ContainerNodePool"]
    assert marked["metadata"]["namespace"] == "team-a"
    assert marked["metadata"]["annotations"]["cnrm.cloud.google.com/deletion-policy"] == "abandon"
    assert list(config_connector_pools(world)) == [("team-b", name)]


def test_a_status_names_its_own_namespaces_services_and_counts_the_others() -> None:
    from imagegen_operator.reconcile import named_for

    users = ["team-b/y", "team-a/b", "team-a/a", "team-c/z"]
    assert named_for("team-a", users) == "team-a/a, team-a/b, 2 service(s) of other namespaces"
    assert named_for("team-a", ["team-b/y"], "service ") == "a service of another namespace"
    assert named_for("team-a", ["team-a/a"], "service ") == "service team-a/a"


def test_an_operator_of_some_namespaces_keeps_a_pool_only_for_services_served(world) -> None:
    """A service of a namespace this operator does not serve uses the pool only if another
    operator serves it (its finalizer says so): one that none serves would keep the pool
    from its last real user's delete for good."""
    world.reconciler.namespaces = ("served",)
    world.create("served/a")
    world.create("elsewhere/b")  # the same GPU configuration, so the same pool
    world.reconcile("served/a")
    assert len(world.gke_pools()) == 1
    delete_until_done(world, "served/a")
    assert not world.gke_pools()
    # The same again, the other served by another operator: the pool is kept for it.
    world.create("served/a")
    world.reconcile("served/a")
    other = world.body("elsewhere/b")
    other["metadata"]["finalizers"] = ["imagegen.dev/node-pool"]
    world.kube.put(other)
    delete_until_done(world, "served/a")
    assert len(world.gke_pools()) == 1


def test_services_of_a_served_namespace_being_deleted_are_finalized_by_the_operator(
        world) -> None:
    """kopf may stop following a namespace once the namespace controller has begun on it
    (its Role goes at once), before the services in it are deleted: their deletes may
    reach no handler."""
    from imagegen_operator.reconcile import FINALIZER

    world.reconciler.namespaces = ("doomed", "kept")
    world.create("doomed/a")
    world.create("kept/b", gpu={"type": "nvidia-tesla-t4"})
    # Its object goes with the namespace (the namespace controller deletes it, and Config
    # Connector the pool): not the operator's to delete, which its Role there no longer
    # lets it.
    world.create("doomed/c", gpu={"type": "nvidia-l4"},
                 node_pool={"provider": "ConfigConnector", "cluster": CLUSTER_A})
    world.reconcile("doomed/a", "kept/b", "doomed/c")
    [doomed_pool] = [p for p in world.gke_pools() if "t4" not in p]
    [cc_object] = config_connector_pools(world)
    for name in ("doomed/a", "kept/b", "doomed/c"):
        body = world.body(name)
        body["metadata"].update(finalizers=["other.example/keep", FINALIZER],
                                deletionTimestamp="2026-12-07T19:17:47Z")
        world.kube.put(body)
    for name, ending in (("doomed", True), ("kept", False), ("unserved", True)):
        world.kube.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {
            "name": name, **({"deletionTimestamp": "2026-12-07T19:17:37Z"} if ending else {})}})
    done = []
    for _ in range(5):  # GKE deletes the pool over a few polls; it is waited for
        done += world.reconciler.finish_deletes_in_ended_namespaces()
        world.clock.now += 60
    assert sorted(b["metadata"]["name"] for b in done) == ["a", "c"]
    assert doomed_pool not in world.gke_pools() and len(world.gke_pools()) == 1
    assert list(config_connector_pools(world)) == [cc_object]
    assert world.body("doomed/a")["metadata"]["finalizers"] == ["other.example/keep"]
    # A namespace that goes on: kopf's handler finalizes its services, not this.
    assert FINALIZER in world.body("kept/b")["metadata"]["finalizers"]
    world.reconciler.namespaces = ()  # an operator of every namespace: kopf follows them all
    assert world.reconciler.finish_deletes_in_ended_namespaces() == []


def gone_by_hand(world, name: str) -> None:
    """What `kubectl patch` taking the finalizer off does: the service goes, and no
    finalize ever runs for it."""
    world.kube.objects.pop((api.API_VERSION, api.KIND, *split(name)))


def left_for_the_sweep(world, name: str, **service: Any) -> None:
    """A service made, reconciled and gone by hand; its pool found unused by a sweep, and
    the grace passed since."""
    world.create(name, **service)
    world.reconcile(name)
    gone_by_hand(world, name)
    world.reconciler.sweep()
    world.clock.now += ORPHAN_GRACE_S


def local_pool_nodes(world) -> list[str]:
    return sorted(n for (_, kind, _, n) in world.kube.objects if kind == "Node")


def test_a_pool_left_by_a_service_gone_without_its_finalizer_is_swept(world) -> None:
    world.create("kept", node_pool={"provider": "Local", "maxNodes": 1})
    world.create("left", gpu={"type": "nvidia-tesla-t4"},
                 node_pool={"provider": "Local", "maxNodes": 1})
    world.reconcile("kept", "left")
    kept_nodes = [n for n in local_pool_nodes(world) if "t4" not in n]
    assert kept_nodes and len(local_pool_nodes(world)) == 2
    assert world.reconciler.sweep() == []  # every pool used
    gone_by_hand(world, "left")
    assert world.reconciler.sweep() == []  # found unused: held for the grace
    world.clock.now += ORPHAN_GRACE_S - 1
    assert world.reconciler.sweep() == []
    world.clock.now += 1
    [swept] = world.reconciler.sweep()
    assert swept.provider == "Local" and "t4" in swept.name
    assert local_pool_nodes(world) == kept_nodes  # the pool still used stays


def test_a_pool_unused_for_a_while_then_asked_for_again_is_kept(world) -> None:
    left_for_the_sweep(world, "first", node_pool={"provider": "Local", "maxNodes": 1})
    world.create("second", node_pool={"provider": "Local", "maxNodes": 1})  # the same pool
    assert world.reconciler.sweep() == []
    assert local_pool_nodes(world)
    # Its time unused starts again if the new user goes too.
    gone_by_hand(world, "second")
    assert world.reconciler.sweep() == []


def test_a_gke_pool_left_behind_is_swept_and_one_not_made_by_the_operator_never(world) -> None:
    world.create("gone")
    world.reconcile("gone")
    [made] = world.gke_pools()
    someone_elses = f"{CLUSTER_A}/nodePools/default-pool"
    world.double.seed_pool(someone_elses, "RUNNING", config={"machineType": "e2-standard-4"})
    gone_by_hand(world, "gone")
    world.reconciler.sweep()
    world.clock.now += ORPHAN_GRACE_S
    [swept] = world.reconciler.sweep()
    assert (swept.provider, swept.scope, f"{CLUSTER_A}/nodePools/{swept.name}") == (
        "GKE", CLUSTER_A, made)
    assert world.double.pools[made]["status"] == "STOPPING"
    assert world.double.pools[someone_elses]["status"] == "RUNNING"


def test_a_pool_is_used_under_any_of_its_keys() -> None:
    gke = PoolKey("GKE", CLUSTER_A, "igs-l4x1")
    handed = PoolKey("ConfigConnector", CLUSTER_A, "igs-l4x1", "team-a")
    other_ns = PoolKey("ConfigConnector", CLUSTER_A, "igs-l4x1", "team-b")
    local = PoolKey("Local", "", "igs-l4x1")
    # Handed over from GKE's API to a Config Connector object, or the same GKE pool through
    # another namespace's object: used.
    assert _unwanted({gke, handed, other_ns}, {handed}) == set()
    assert _unwanted({gke, handed}, {other_ns}) == set()
    assert _unwanted({gke, handed}, set()) == {gke, handed}
    # An Existing service names a pool by its name alone, in the operator's own cluster.
    assert _unwanted({gke, local}, {PoolKey("Existing", "", "igs-l4x1")}) == set()
    # Another cluster's pool of the name is another pool.
    assert _unwanted({gke}, {PoolKey("GKE", CLUSTER_B, "igs-l4x1")}) == {gke}


def made_and_ridden(world) -> str:
    """A GKE pool made for "maker", and "rider", an Existing service that names it."""
    world.create("maker")
    world.reconcile("maker")
    [made] = world.gke_pools()
    world.create("rider", node_pool={"provider": "Existing", "name": made.rsplit("/", 1)[1]})
    return made


def test_a_pool_an_existing_service_runs_on_is_not_swept(world) -> None:
    made = made_and_ridden(world)
    gone_by_hand(world, "maker")
    world.reconciler.sweep()
    world.clock.now += ORPHAN_GRACE_S
    assert world.reconciler.sweep() == []
    assert world.double.pools[made]["status"] == "RUNNING"


def test_a_sweep_deletes_nothing_once_another_operator_acts(world) -> None:
    left_for_the_sweep(world, "left", node_pool={"provider": "Local", "maxNodes": 1})
    assert world.reconciler.sweep(acting=lambda: False) == []
    assert local_pool_nodes(world)
    assert len(world.reconciler.sweep(acting=lambda: True)) == 1
    assert not local_pool_nodes(world)


def test_a_sweep_refused_config_connector_s_pools_says_so_once(world, caplog) -> None:
    """The chart grants that provider nothing where it is off, though the cluster may serve
    the kind: none made by this install, and no warning at every sweep."""
    from imagegen_operator.kube import Forbidden
    from imagegen_operator.render.nodepool import CNRM_API_VERSION

    list_ = world.kube.list

    def refused(api_version, kind, *args, **kwargs):
        if api_version == CNRM_API_VERSION:
            raise Forbidden("list ContainerNodePool: 403 Forbidden: cannot list")
        return list_(api_version, kind, *args, **kwargs)

    world.kube.list = refused
    with caplog.at_level(logging.INFO, logger="imagegen_operator"):
        left_for_the_sweep(world, "left", node_pool={"provider": "Local", "maxNodes": 1})
        for _ in range(3):
            world.reconciler.sweep()
    said = [r for r in caplog.records if "ContainerNodePool" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.INFO]
    assert not local_pool_nodes(world)  # the other providers' pools are swept all the same


def test_a_gke_pool_a_config_connector_object_stands_for_goes_with_the_object(world) -> None:
    """Deleted through GKE's API under its object, Config Connector would make it again."""
    world.create("cc", node_pool={"provider": "ConfigConnector", "cluster": CLUSTER_A})
    world.reconcile("cc")
    [obj] = config_connector_pools(world).values()
    name = obj["metadata"]["name"]
    # The GKE pool Config Connector made of it, labelled as every pool the operator makes.
    resource = api.parse(world.body("cc"))
    config = render_gke_nodepool(resource, plan(resource.spec))["spec"]["config"]
    world.double.seed_pool(f"{CLUSTER_A}/nodePools/{name}", "RUNNING", config=config)
    gone_by_hand(world, "ns/cc")
    world.reconciler.sweep()
    world.clock.now += ORPHAN_GRACE_S
    [swept] = world.reconciler.sweep()
    assert swept.provider == "ConfigConnector"
    assert world.double.pools[f"{CLUSTER_A}/nodePools/{name}"]["status"] == "RUNNING"


def test_a_pool_an_existing_service_names_is_kept_when_its_maker_goes(world) -> None:
    made = made_and_ridden(world)
    delete_until_done(world, "maker")
    assert world.double.pools[made]["status"] != "STOPPING"  # kept for the rider
    # An Existing service that names no pool rides none: the pool is not kept for it.
    world.create("maker")
    world.reconcile("maker")
    world.create("unnamed", gpu=TS2_L4, node_pool={"provider": "Existing"})
    gone_by_hand(world, "rider")
    delete_until_done(world, "maker")
    assert made not in world.gke_pools()


def test_a_pool_pods_still_run_on_is_not_swept(world) -> None:
    """Records say unused (a status lost, a service gone), a serving pod says otherwise."""
    left_for_the_sweep(world, "left", node_pool={"provider": "Local", "maxNodes": 1})
    [node] = local_pool_nodes(world)
    for name, owner in (("agent", "DaemonSet"), ("server", "ReplicaSet")):
        world.kube.put({"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": name, "namespace": "ns", "ownerReferences": [{"kind": owner}]},
            "spec": {"nodeName": node}, "status": {"phase": "Running"}})
    # A static pod (GKE's kube-proxy without Dataplane V2), as the kubelet mirrors it.
    world.kube.put({"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": f"kube-proxy-{node}", "namespace": "ns",
        "annotations": {"kubernetes.io/config.mirror": "f00d"},
        "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": node}]},
        "spec": {"nodeName": node}, "status": {"phase": "Running"}})
    assert world.reconciler.sweep() == []
    assert local_pool_nodes(world) == [node]
    world.kube.objects.pop(("v1", "Pod", "ns", "server"))  # every node's pods alone
    assert len(world.reconciler.sweep()) == 1
    assert local_pool_nodes(world) == []


def test_a_field_taken_out_of_the_spec_goes_from_the_children_after_a_restart(world) -> None:
    """An edit that only removes (a service account, a peer of allowFrom) leaves the live
    children a superset of the new render. An operator that did not apply them itself (it
    restarted, or a new leader took over) must still write them, and say Ready only then."""
    team = {"namespaceSelector": {"matchLabels": {"team": "a"}}}
    peer = {**team, "podSelector": {"matchLabels": {"app": "gateway"}}}
    world.create("sd15", server={"serviceAccountName": "reader", "allowFrom": [peer]})
    world.reconcile("sd15")
    world.nodes_ready()
    world.rolled_out("sd15")
    assert world.reconcile("sd15").ready
    deployment = ("apps/v1", "Deployment", "ns", "sd15")
    pod = world.kube.objects[deployment]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "reader"
    world.reconciler = Reconciler(  # a restart: nothing remembered of what was applied
        world.kube, build_providers(world.kube, gke=lambda: world.gke),
        recorder=lambda body, *event: None, default_cluster=lambda: world.default_cluster,
        clock=world.clock)
    world.edit("sd15", server={"allowFrom": [team]})
    world.reconcile("sd15")
    pod = world.kube.objects[deployment]["spec"]["template"]["spec"]
    assert "serviceAccountName" not in pod
    (policy,) = [o for (_, kind, _, _), o in world.kube.objects.items()
                 if kind == "NetworkPolicy"]
    peers = [p for rule in policy["spec"]["ingress"] for p in rule.get("from", [])]
    assert team in peers and peer not in peers
    # The new template is not rolled out yet: not Ready at the new generation.
    assert world.condition("sd15", "Ready")["status"] != "True"


def test_an_autoscaler_the_spec_dropped_goes_while_another_child_is_refused(world) -> None:
    """Left in place, it would go on setting the service's replicas (its /scale), undoing
    the edit, until the refusal is fixed."""
    world.create("sd15", node_pool={"provider": "Local"},
                 autoscaling={"minReplicas": 1, "maxReplicas": 3})
    world.reconcile("sd15")
    hpa = ("autoscaling/v2", "HorizontalPodAutoscaler", "ns", "sd15")
    assert hpa in world.kube.objects
    world.kube.refuse("Service", "spec.ports[0].nodePort: Invalid value")
    body = world.body("sd15")
    del body["spec"]["autoscaling"]
    body["metadata"]["generation"] += 1
    world.kube.put(body)
    world.reconcile("sd15")
    assert "Service" in world.condition("sd15", "Ready")["message"]
    assert hpa not in world.kube.objects


def test_services_sharing_a_pool_one_naming_zones_do_not_overwrite_each_other(world) -> None:
    """A service that names no zones may share a zoned pool: its view of the pool is a
    subset of the other's, and neither rewrites the pool at each resync."""
    pool = {"provider": "ConfigConnector", "cluster": CLUSTER_A, "name": "team-pool"}
    world.create("zoned", node_pool={**pool, "locations": ["us-central1-a"]})
    world.create("anywhere", node_pool=pool)
    world.reconcile("zoned", "anywhere")
    [obj] = config_connector_pools(world).values()
    assert obj["spec"]["nodeLocations"] == ["us-central1-a"]
    writes = len(world.kube.writes_of("ContainerNodePool"))
    for order in (("zoned", "anywhere"), ("anywhere", "zoned")):
        world.reconcile(*order)
    assert len(world.kube.writes_of("ContainerNodePool")) == writes  # no flip-flop
