"""The chart's alerts (charts/imagegen-operator/files/alerts.yaml), checked by Prometheus'
own promtool: valid rules, each firing where it should with the words a person reads and
quiet on a healthy service (tests/data/prometheus/alerts_test.yaml), and the chart's
PrometheusRule carrying exactly those rules."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from unit.test_chart import find, render

from support.tools import pinned_tool

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "charts" / "imagegen-operator" / "files" / "alerts.yaml"
ALERT_TESTS = ROOT / "tests" / "data" / "prometheus" / "alerts_test.yaml"


@pytest.fixture(scope="module")
def promtool() -> Path:
    return pinned_tool("promtool")


def run(promtool: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(promtool), *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def alert_names() -> set[str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {rule["alert"] for group in groups for rule in group["rules"]}


def test_the_rules_are_valid(promtool):
    result = run(promtool, "check", "rules", ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in result.stdout


def test_each_alert_fires_where_it_should_and_only_there(promtool):
    result = run(promtool, "test", "rules", ALERT_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_tested_firing_and_quiet():
    firing, quiet = set(), set()
    for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"]:
        for check in case["alert_rule_test"]:
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert firing == alert_names() == quiet


def test_a_wrong_expectation_fails(promtool, tmp_path):
    """promtool compares what fires, word for word: a test that cannot fail tests nothing."""
    tests = yaml.safe_load(ALERT_TESTS.read_text())
    tests["rule_files"] = [str(ALERTS)]
    check = next(c for case in tests["tests"] for c in case["alert_rule_test"]
                 if c.get("exp_alerts"))
    check["exp_alerts"][0]["exp_labels"]["severity"] = "page"
    broken = tmp_path / "broken_test.yaml"
    broken.write_text(yaml.safe_dump(tests))
    result = run(promtool, "test", "rules", broken)
    assert result.returncode != 0, result.stdout
    assert check["alertname"] in result.stderr and 'severity="page"' in result.stderr


def test_the_chart_s_prometheus_rule_is_the_file():
    assert not [d for d in render() if d["kind"] == "PrometheusRule"]  # off by default
    rule = find(render("metrics.prometheusRule.enabled=true",
                       "metrics.prometheusRule.labels.release=kube-prometheus-stack"),
                "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["spec"] == yaml.safe_load(ALERTS.read_text())
