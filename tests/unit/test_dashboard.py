"""The chart's Grafana dashboard (charts/imagegen-operator/files/dashboard.json): every query
is PromQL that Prometheus' promtool accepts, reads only series the server and the operator
export, and leaves none of them unshown; the chart ships the file as it stands."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from unit.test_chart import find, render

from support.series import exported, read_by

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "charts" / "imagegen-operator" / "files" / "dashboard.json"
# Grafana's variables, as a query might see them.
VARIABLES = {"$__rate_interval": "5m", "$namespace": ".*", "$service": ".*",
             "$operator_namespace": ".*"}
# Exported and left off the dashboard: the model and settings (a table, not a series).
UNSHOWN = {"imagegen_server"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def test_every_query_is_promql(promtool, tmp_path):
    rules = []
    for index, expr in enumerate(queries()):
        for variable, value in VARIABLES.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard:query_{index}", "expr": expr})
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([str(promtool), "check", "rules", str(path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_queries_read_only_exported_series_and_show_them_all():
    read = read_by(queries())
    families = exported()
    assert read - set().union(*families.values()) == set()
    unshown = {family for family, series in families.items() if not series & read}
    assert unshown == UNSHOWN


def test_panels_are_laid_out_without_overlap():
    taken: set[tuple[int, int]] = set()
    for panel in dashboard()["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                 for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


@pytest.mark.parametrize("namespace", [None, "monitoring"])
def test_the_chart_ships_the_dashboard_for_grafanas_sidecar(namespace):
    assert not [d for d in render() if d["kind"] == "ConfigMap"]  # off by default
    sets = ["metrics.grafanaDashboard.enabled=true"]
    if namespace:
        sets.append(f"metrics.grafanaDashboard.namespace={namespace}")
    config_map = find(render(*sets), "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["namespace"] == (namespace or "imagegen-system")
    assert json.loads(config_map["data"]["imagegen-operator.json"]) == dashboard()
