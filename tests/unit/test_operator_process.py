"""Process-level pieces of the operator that need no cluster: log lines, own-write echoes."""

from __future__ import annotations

import json
import logging

import pytest

from imagegen_operator.handlers import parse_args
from imagegen_operator.kube import Kube


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
    assert record["message"].endswith("applied Deployment sd15")
    assert record["object"] == {"namespace": "team-a", "name": "sd15"}


def test_only_the_exact_version_we_applied_is_our_own_echo() -> None:
    kube = Kube(api_client=object())  # own_write needs no API calls
    applied = {"metadata": {"uid": "u1", "resourceVersion": "41"}}
    kube._remember(applied)
    assert kube.own_write(applied)
    # A controller's status update or an edit by hand is a newer version: not ours.
    assert not kube.own_write({"metadata": {"uid": "u1", "resourceVersion": "42"}})
    assert not kube.own_write({"metadata": {"uid": "u2", "resourceVersion": "41"}})
    assert not kube.own_write({"metadata": {}})
