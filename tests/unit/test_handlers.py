"""The kopf handlers' own bookkeeping: triggers that arrive during a reconcile fold into one
more run and none is dropped; a delete waiting on its pool asks less and less often. The
real handler code, with the reconciler replaced by a recorder (an in-memory stand-in: what
is tested is the handlers, not a reconcile)."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from imagegen_operator import handlers
from imagegen_operator.reconcile import EVENT_REPEAT_S, Outcome, Reconciler
from support.memory_kube import InMemoryKube


class LiveObject:
    """What the handler reads the live service from: always the same object."""

    writes = 0

    def get(self, api_version, kind, name, namespace):
        return BODY


class RecordingReconciler:
    services = None

    def __init__(self, clock=time.monotonic) -> None:
        self.runs = 0
        self.kube = LiveObject()
        self.events: list[tuple[str, str, str]] = []
        # The real Events bookkeeping, which records through this one.
        self.record_once = Reconciler(InMemoryKube(), {}, recorder=self.record,
                                      clock=clock).record_once

    def reconcile(self, body):
        self.runs += 1
        return Outcome(ready=True)

    def record(self, body, type_, reason, message):
        self.events.append((type_, reason, message))


class HookedLock:
    """A lock that calls ``hook(where)`` after each release, ``where`` naming the function
    that held it, until the hook says it is done."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.hook = None

    def __enter__(self):
        self._lock.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()
        where = sys._getframe(1).f_code.co_name
        if self.hook is not None and self.hook(where):
            self.hook = None


BODY = {"metadata": {"uid": "u1", "name": "s", "namespace": "ns"}}


def test_a_trigger_right_after_the_last_look_is_run_not_dropped() -> None:
    reconciler = RecordingReconciler()
    operator = handlers.Operator(reconciler)
    guard = operator._guard = HookedLock()
    triggered = []

    def trigger_once_the_run_is_over(where: str) -> bool:
        service = operator._services.get("u1")
        # The loop's last look, in Operator.reconcile itself, once the run is done.
        if where != "reconcile" or reconciler.runs != 1 or service.dirty:
            return False
        # Between the run's last look at its queue and its end: an update arrives.
        thread = threading.Thread(
            target=lambda: triggered.append(operator.reconcile(BODY, "update", fresh=True)))
        guard.hook = None
        thread.start()
        thread.join(10)
        return True

    guard.hook = trigger_once_the_run_is_over
    operator.reconcile(BODY, "timer", fresh=True)
    assert triggered == [None]
    assert reconciler.runs == 2
    service = operator._services["u1"]
    assert not service.running and not service.dirty


def test_a_delete_waiting_on_its_pool_asks_less_and_less_often() -> None:
    delays = [handlers.retry_delay(retry) for retry in range(12)]
    assert delays[0] == 5 and delays == sorted(delays) and delays[-1] == 60


@pytest.mark.parametrize("value", ["0", "-1", "inf", "soon"])
def test_a_resync_period_that_would_spin_is_refused(value: str) -> None:
    with pytest.raises(SystemExit):
        handlers.parse_args(["--resync-seconds", value])
    assert handlers.parse_args(["--resync-seconds", "0.5"]).resync_seconds == 0.5


@pytest.mark.parametrize(("variable", "value", "option"), [
    ("IMAGEGEN_OPERATOR_RESYNC_SECONDS", "0", "--resync-seconds"),
    ("IMAGEGEN_OPERATOR_STUCK_SECONDS", "-5", "--stuck-seconds"),
    ("IMAGEGEN_OPERATOR_WATCH_TIMEOUT_SECONDS", "0", "--watch-timeout-seconds"),
    ("IMAGEGEN_OPERATOR_METRICS_PORT", "abc", "--metrics-port"),
    ("IMAGEGEN_OPERATOR_HEALTH_PORT", "70000", "--health-port"),
    ("IMAGEGEN_OPERATOR_LOG_FORMAT", "JSON", "--log-format"),
])
def test_a_setting_from_the_environment_is_checked_as_its_option_is(
        monkeypatch, capsys, variable: str, value: str, option: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as exit_:
        handlers.parse_args([])
    assert exit_.value.code == 2
    assert f"argument {option}" in capsys.readouterr().err
    monkeypatch.delenv(variable)
    config = handlers.parse_args([])
    assert (config.resync_seconds, config.metrics_port, config.stuck_seconds) == (30, 8080, 300)


@pytest.mark.parametrize(("variable", "value"), [
    ("IMAGEGEN_GKE_CLUSTER", "serving"),
    ("IMAGEGEN_GKE_NODE_SERVICE_ACCOUNT", "gpu-nodes"),
])
def test_a_gke_setting_that_cannot_be_used_stops_the_start(
        monkeypatch, caplog, variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    assert handlers.run([]) == 2  # before any client is made or handler runs
    assert variable in caplog.text


def test_a_deployment_that_starts_failing_to_create_pods_triggers_its_owner() -> None:
    """Its replica counts stay at 0: only its conditions say the pods cannot be created."""
    operator = handlers.Operator(RecordingReconciler())
    deployment = {"kind": "Deployment", "metadata": {"uid": "d1"}, "spec": {"replicas": 2},
                  "status": {"replicas": 0, "conditions": [
                      {"type": "Progressing", "status": "True", "reason": "NewReplicaSetCreated"}]}}
    assert operator.child_changed("MODIFIED", deployment)
    assert not operator.child_changed("MODIFIED", deployment)
    deployment["status"]["conditions"].append(
        {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate"})
    assert operator.child_changed("MODIFIED", deployment)
    deployment["status"]["conditions"][0]["lastUpdateTime"] = "2026-12-07T00:00:00Z"
    assert not operator.child_changed("MODIFIED", deployment)  # a heartbeat only


def test_the_sweep_is_on_by_default_and_may_be_turned_off(monkeypatch) -> None:
    config = handlers.parse_args([])
    assert config.sweep_seconds == 300 and config.unused_pool_grace_seconds == 600
    monkeypatch.setenv("IMAGEGEN_OPERATOR_SWEEP_SECONDS", "0")
    assert handlers.parse_args([]).sweep_seconds == 0
    with pytest.raises(SystemExit):
        handlers.parse_args(["--unused-pool-grace-seconds", "0"])


def test_namespaces_are_names_not_patterns() -> None:
    assert handlers.parse_args(["--namespace", "team-a", "--namespace", "b"]).namespaces == (
        "team-a", "b")
    for pattern in ("team-*", "!kube-system"):
        with pytest.raises(SystemExit):
            handlers.parse_args(["--namespace", pattern])


def test_writes_counted_by_a_reconcile_that_reports_late_are_not_taken_back() -> None:
    operator = handlers.Operator(RecordingReconciler())
    operator.reconciler.kube.writes = 12
    operator._count_writes()  # a later reconcile reported first
    operator.reconciler.kube.writes = 10  # what an earlier one read
    operator._count_writes()  # no negative increment (Prometheus refuses one)
    assert operator._writes_reported == 12


class Gone(LiveObject):
    def get(self, api_version, kind, name, namespace):
        return None


class Failing(RecordingReconciler):
    def __init__(self, error: Exception, clock=time.monotonic) -> None:
        super().__init__(clock)
        self.error = error

    def reconcile(self, body):
        raise self.error


def test_a_service_found_gone_is_no_longer_counted_as_managed() -> None:
    from imagegen_operator import metrics

    operator = handlers.Operator(RecordingReconciler())
    operator.reconcile(dict(BODY), trigger="timer")
    assert metrics.MANAGED._value.get() == 1
    operator.reconciler.kube = Gone()  # deleted, its finalizer taken off by hand
    operator.reconcile(dict(BODY), trigger="timer")
    assert metrics.MANAGED._value.get() == 0 and not operator._services
    assert metrics.REGISTRY.get_sample_value(
        "imagegen_operator_service_ready", {"service_namespace": "ns", "service": "s"}) is None


class Waiting(RecordingReconciler):
    def reconcile(self, body):
        self.runs += 1
        return Outcome(ready=self.runs > 1)

    def finalize(self, body):
        return True


def test_each_service_s_ready_condition_is_a_series_of_its_own_until_it_is_deleted() -> None:
    """Alerts read it: a service whose pods never run exports no series of its own."""
    from imagegen_operator import metrics

    def ready() -> float | None:
        return metrics.REGISTRY.get_sample_value(
            "imagegen_operator_service_ready", {"service_namespace": "ns", "service": "s"})

    operator = handlers.Operator(Waiting())
    operator.reconcile(dict(BODY), trigger="create")
    assert ready() == 0
    operator.reconcile(dict(BODY), trigger="timer")
    assert ready() == 1
    operator.finalize(dict(BODY))
    assert ready() is None and not operator._services


def test_transient_errors_are_retried_less_and_less_often_and_every_error_is_counted() -> None:
    from imagegen_operator import metrics
    from imagegen_operator.kube import TransientKubeError

    operator = handlers.Operator(Failing(TransientKubeError("the API server is busy")))
    delays = []
    for retry in (0, 3, 20):
        with pytest.raises(handlers.kopf.TemporaryError) as caught:
            operator.reconcile(dict(BODY), trigger="update", retry=retry)
        delays.append(caught.value.delay)
    assert delays[0] == 5 and delays[0] < delays[1] < delays[2] == 60
    assert operator.reconciler.events == []  # the API server is in trouble: no Event
    other = metrics.ERRORS.labels("other")
    before = other._value.get()
    clock = [0.0]
    operator = handlers.Operator(Failing(ValueError("a bug"), clock=lambda: clock[0]),
                                 clock=lambda: clock[0])
    for _ in range(3):  # an Event of a Kubernetes type, once, not at each retry
        with pytest.raises(ValueError):
            operator.reconcile(dict(BODY), trigger="update")
        clock[0] += 60
    assert other._value.get() == before + 3
    [(type_, reason, message)] = operator.reconciler.events
    assert (type_, reason) == ("Warning", "ReconcileError") and "ValueError: a bug" in message
    clock[0] += EVENT_REPEAT_S  # and again while it lasts
    with pytest.raises(ValueError):
        operator.reconcile(dict(BODY), trigger="update")
    assert len(operator.reconciler.events) == 2


def test_a_delete_that_waits_for_its_pool_says_so_once_in_an_event_of_its_own() -> None:
    class Slow(RecordingReconciler):
        def finalize(self, body):
            return False

    operator = handlers.Operator(Slow())
    for retry in range(3):
        with pytest.raises(handlers.kopf.TemporaryError):
            operator.finalize(dict(BODY), retry)
    assert [e[:2] for e in operator.reconciler.events] == [("Normal", "WaitingForNodePool")]


def test_a_delete_that_hangs_turns_the_liveness_probe_unhealthy() -> None:
    clock = [0.0]

    class Hanging(RecordingReconciler):
        def finalize(self, body):
            clock[0] += 400  # stuck on a call for minutes
            assert operator.stuck_for() >= 400
            return True

    operator = handlers.Operator(Hanging(), clock=lambda: clock[0])
    operator.finalize(dict(BODY))
    assert operator.stuck_for() == 0


def test_a_delete_acts_on_the_service_as_it_is_now_not_on_kopfs_copy() -> None:
    live = {**BODY, "status": {"nodePool": {"name": "named-since"}}}
    seen = []

    class Live(LiveObject):
        def get(self, api_version, kind, name, namespace):
            return live

    class Finalizing(RecordingReconciler):
        def finalize(self, body):
            seen.append(body)
            return True

    reconciler = Finalizing()
    reconciler.kube = Live()
    handlers.Operator(reconciler).finalize({**BODY, "status": {}})
    assert seen == [live]


def test_an_event_outside_kopfs_handlers_is_logged(caplog) -> None:
    """The sweep's thread is the operator's own: kopf's poster does not serve it."""
    import logging

    with caplog.at_level(logging.INFO, logger="imagegen_operator"):
        handlers._record(dict(BODY), "Normal", "NodePoolDeleted", "node pool p deleted")
    assert "ns/s: NodePoolDeleted: node pool p deleted" in caplog.text


def ready_series() -> float | None:
    from imagegen_operator import metrics

    return metrics.REGISTRY.get_sample_value(
        "imagegen_operator_service_ready", {"service_namespace": "ns", "service": "s"})


def test_a_service_gone_without_a_delete_handler_leaves_no_series() -> None:
    """Its finalizer taken off by hand: kopf runs no delete handler, only the event."""
    operator = handlers.Operator(RecordingReconciler())
    registry = handlers.kopf.OperatorRegistry()
    handlers.register(registry, operator, handlers.OperatorConfig())
    [gone] = [h for h in registry._watching.get_all_handlers() if h.id == "gone"]
    operator.reconcile(dict(BODY), trigger="create")
    assert ready_series() == 1
    gone.fn(type="MODIFIED", body=dict(BODY))
    assert ready_series() == 1
    gone.fn(type="DELETED", body=dict(BODY))
    assert ready_series() is None and not operator._services


def test_a_delete_finished_during_a_reconcile_leaves_no_series() -> None:
    class DeletedMeanwhile(RecordingReconciler):
        def reconcile(self, body):
            operator.forget(body["metadata"]["uid"])  # on_delete, done on another thread
            return Outcome(ready=False)

    operator = handlers.Operator(DeletedMeanwhile())
    operator.reconcile(dict(BODY), trigger="timer")
    assert ready_series() is None


def test_an_operator_that_stands_down_says_nothing_of_the_services() -> None:
    """The one acting says them; were a service deleted while this one stood by, its
    series would stay, and be heard once this one acts again."""
    operator = handlers.Operator(RecordingReconciler())
    operator.reconcile(dict(BODY), trigger="timer")
    operator.stood_down()
    assert ready_series() is None
    operator.reconcile(dict(BODY), trigger="timer")  # acting again
    assert ready_series() == 1
    operator.forget(BODY["metadata"]["uid"])
