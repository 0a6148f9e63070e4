"""Process-level pieces of the operator that need no cluster: log lines, own-write echoes."""

from __future__ import annotations

import json
import logging

import pytest

from imagegen_operator.handlers import parse_args
from imagegen_operator.kube import Kube
from imagegen_operator.render import DEFAULT_SERVER_IMAGE


@pytest.fixture
def root_logging():
    """parse_args configures the root logger: put it back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


def _format(root: logging.Logger, message: str) -> str:
    record = logging.LogRecord("kopf.objects", logging.INFO, __file__, 1, message, None, None)
    record.k8s_ref = {"namespace": "team-a", "name": "sd15"}
    record.k8s_skip = False
    return root.handlers[-1].format(record)


def test_every_object_message_names_its_object(root_logging) -> None:
    parse_args([])
    line = _format(root_logging, "Handler 'on_change' succeeded.")
    assert "[team-a/sd15] Handler 'on_change' succeeded." in line
    assert " INFO kopf.objects: " in line


def test_json_log_lines_carry_the_object(root_logging) -> None:
    parse_args(["--log-format", "json"])
    record = json.loads(_format(root_logging, "applied Deployment sd15"))
    assert record["message"] == "applied Deployment sd15"
    assert record["object"] == {"namespace": "team-a", "name": "sd15"}


def test_json_log_lines_carry_cloud_logging_s_severity_names(root_logging) -> None:
    parse_args(["--log-format", "json"])
    handler = root_logging.handlers[-1]
    record = logging.LogRecord("kopf.objects", logging.WARNING, __file__, 1, "slow", None, None)
    assert handler.filter(record)  # as handle() does before it formats
    assert json.loads(handler.format(record))["severity"] == "WARNING"


def test_the_server_image_of_services_that_name_none_is_configurable(root_logging,
                                                                     monkeypatch) -> None:
    assert parse_args([]).server_image == DEFAULT_SERVER_IMAGE
    monkeypatch.setenv("IMAGEGEN_OPERATOR_SERVER_IMAGE", "registry.example/server:2")
    assert parse_args([]).server_image == "registry.example/server:2"
    assert parse_args(["--server-image=r/s:3"]).server_image == "r/s:3"


def test_only_the_exact_version_we_applied_is_our_own_echo() -> None:
    kube = Kube(api_client=object())  # own_write needs no API calls
    applied = {"metadata": {"uid": "u1", "resourceVersion": "41"}}
    kube._remember(applied)
    assert kube.own_write(applied)
    # A controller's status update or an edit by hand is a newer version: not ours.
    assert not kube.own_write({"metadata": {"uid": "u1", "resourceVersion": "42"}})
    assert not kube.own_write({"metadata": {"uid": "u2", "resourceVersion": "41"}})
    assert not kube.own_write({"metadata": {}})


# --- Events: news only ---------------------------------------------------------------------

def _status(**conditions: tuple[str, str]) -> dict:
    return {"conditions": [{"type": t, "status": s, "reason": r, "message": f"{t} says {r}"}
                           for t, (s, r) in conditions.items()]}


def _events(before: dict, after: dict) -> list[tuple[str, str]]:
    from imagegen_operator.status import events_for

    return [event[:2] for event in events_for(before, after)]


WAITING = _status(Ready=("False", "ReplicasNotReady"), NodePoolReady=("False", "Provisioning"),
                  Stalled=("False", "Reconciling"))
READY = _status(Ready=("True", "Ready"), NodePoolReady=("True", "Ready"),
                Stalled=("False", "Ready"))
STUCK = _status(Ready=("False", "QuotaExceeded"), NodePoolReady=("False", "QuotaExceeded"),
                Stalled=("True", "QuotaExceeded"))


@pytest.mark.parametrize("before, after, expected", [
    ({}, WAITING, []),  # a new service is not ready yet: its status says so, no news
    (WAITING, READY, [("Normal", "Ready"), ("Normal", "Ready")]),
    (READY, READY, []),
    (READY, WAITING, [("Warning", "ReplicasNotReady"), ("Warning", "Provisioning")]),
    ({}, STUCK, [("Warning", "QuotaExceeded")]),  # stuck from the start: one warning
    (WAITING, STUCK, [("Warning", "QuotaExceeded")]),  # stuck after a first False
    (STUCK, STUCK, []),
], ids=["new", "ready", "steady", "regressed", "stuck-at-once", "stuck-later", "still-stuck"])
def test_events_are_recorded_for_news_only(before, after, expected) -> None:
    assert _events(before, after) == expected


def test_the_pool_is_polled_only_while_it_is_on_its_way() -> None:
    from imagegen_operator.handlers import waiting_for_pool

    def body(status: dict, deleting: bool = False) -> dict:
        meta = {"name": "x", **({"deletionTimestamp": "2026-01-01T00:00:00Z"} if deleting else {})}
        return {"metadata": meta, "status": status}

    assert waiting_for_pool(body(WAITING))
    assert not waiting_for_pool(body({}))  # never planned: the create handler runs first
    assert not waiting_for_pool(body(READY))
    assert not waiting_for_pool(body(STUCK))  # a person has to act
    assert not waiting_for_pool(body(WAITING, deleting=True))
