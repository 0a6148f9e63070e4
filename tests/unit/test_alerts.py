"""The chart's alerts (charts/imagegen-operator/files/alerts*.yaml), checked by Prometheus'
own promtool: valid rules over series the server and the operator export, each firing where
it should with the words a person reads and quiet on a healthy service
(tests/data/prometheus/alerts_test.yaml), and the chart's PrometheusRule carrying exactly
those rules."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml
from unit.test_chart import find, render

from support.series import exported, read_by

ROOT = Path(__file__).resolve().parents[2]
FILES = ROOT / "charts" / "imagegen-operator" / "files"
ALERTS = FILES / "alerts.yaml"
# Added where the chart makes the operator's ServiceMonitor.
SCRAPE_ALERTS = FILES / "alerts-operator-scraped.yaml"
ALERT_TESTS = ROOT / "tests" / "data" / "prometheus" / "alerts_test.yaml"


def run(promtool: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(promtool), *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def groups(*files: Path) -> list[dict[str, Any]]:
    return [g for f in files for g in yaml.safe_load(f.read_text())["groups"]]


def rules() -> list[dict[str, Any]]:
    return [rule for group in groups(ALERTS, SCRAPE_ALERTS) for rule in group["rules"]]


def test_the_rules_are_valid(promtool):
    result = run(promtool, "check", "rules", ALERTS, SCRAPE_ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr
    found = [line for line in result.stdout.splitlines() if "rules found" in line]
    assert sum(int(line.split()[1]) for line in found) == len(rules()), result.stdout


def test_the_rules_read_only_exported_series():
    read = read_by([rule["expr"] for rule in rules()])
    assert read and read - set().union(*exported().values()) == set()


def test_each_alert_fires_where_it_should_and_only_there(promtool):
    result = run(promtool, "test", "rules", ALERT_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_tested_firing_and_quiet():
    firing, quiet = set(), set()
    for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"]:
        for check in case["alert_rule_test"]:
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert firing == {rule["alert"] for rule in rules()} == quiet


def test_a_wrong_expectation_fails(promtool, tmp_path):
    """promtool compares what fires, word for word: a test that cannot fail tests nothing."""
    tests = yaml.safe_load(ALERT_TESTS.read_text())
    tests["rule_files"] = [str(ALERTS), str(SCRAPE_ALERTS)]
    check = next(c for case in tests["tests"] for c in case["alert_rule_test"]
                 if c.get("exp_alerts"))
    check["exp_alerts"][0]["exp_labels"]["severity"] = "page"
    broken = tmp_path / "broken_test.yaml"
    broken.write_text(yaml.safe_dump(tests))
    result = run(promtool, "test", "rules", broken)
    assert result.returncode != 0, result.stdout
    assert check["alertname"] in result.stderr and 'severity="page"' in result.stderr


def test_the_chart_s_prometheus_rule_is_the_files():
    assert not [d for d in render() if d["kind"] == "PrometheusRule"]  # off by default
    rule = find(render("metrics.prometheusRule.enabled=true",
                       "metrics.prometheusRule.labels.release=kube-prometheus-stack"),
                "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["spec"] == {"groups": groups(ALERTS)}
    # The operator's absence is an alert only where the chart has Prometheus scrape it.
    scraped = find(render("metrics.prometheusRule.enabled=true",
                          "metrics.serviceMonitor.enabled=true"), "PrometheusRule")
    assert scraped["spec"] == {"groups": groups(ALERTS, SCRAPE_ALERTS)}
