"""grafana/: the dashboard JSON and provisioning examples; every query parsed by promtool."""

from __future__ import annotations

from typing import Any

import pytest

from tests.ops.promql import (
    DASHBOARD,
    DESIGN_METRICS,
    PROCESS_METRICS,
    REPO,
    dashboard_queries,
    iter_panels,
    load_dashboard,
    load_yaml,
    metric_names,
    promtool_check_exprs,
    require_tool,
    substitute,
    variable_query,
    variable_to_promql,
)

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# The metrics the dashboard must show (the brief's panel list).
SHOWN = {
    "passguard_shadow_would_block_connections_total",
    "passguard_shadow_destinations",
    "passguard_passthrough_connections_total",
    "passguard_passthrough_active_connections",
    "passguard_passthrough_bytes_total",
    "passguard_passthrough_blocked_connections_total",
    "passguard_mesh_passthrough_connections_window",
    "passguard_gate_decisions_total",
    "passguard_mesh_dataplanes",
    "passguard_target_up",
    "passguard_target_scrape_duration_seconds",
    "passguard_last_successful_scrape_timestamp_seconds",
    "passguard_config_reloads_total",
}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return load_dashboard()


def variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


def test_identity(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "passguard"
    assert dashboard["schemaVersion"] >= 39
    assert dashboard["title"]
    # An importable-as-is dashboard: no export placeholders.
    assert "__inputs" not in dashboard
    assert "__requires" not in dashboard
    assert "${DS_" not in DASHBOARD.read_text(encoding="utf-8")


def test_datasource_variable(dashboard: dict[str, Any]) -> None:
    datasource = variables(dashboard)["datasource"]
    assert datasource["type"] == "datasource"
    assert datasource["query"] == "prometheus"


def test_mesh_variable(dashboard: dict[str, Any]) -> None:
    mesh = variables(dashboard)["mesh"]
    assert mesh["type"] == "query"
    assert variable_query(mesh) == "label_values(passguard_mesh_dataplanes, mesh)"
    assert mesh["multi"] is True
    assert mesh["includeAll"] is True
    assert mesh["datasource"] == DATASOURCE


def test_every_panel_and_target_uses_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    panels = [p for p in iter_panels(dashboard["panels"]) if p["type"] != "row"]
    assert panels
    for panel in panels:
        assert panel.get("datasource") == DATASOURCE, panel["title"]
        assert panel.get("targets"), f"{panel['title']} has no query"
        for target in panel["targets"]:
            assert target.get("datasource", DATASOURCE) == DATASOURCE, panel["title"]
            assert target.get("expr"), panel["title"]


def test_panel_ids_are_unique_and_the_grid_does_not_overlap(dashboard: dict[str, Any]) -> None:
    panels = list(iter_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_queries_read_only_passguard_metrics_and_show_all_of_them() -> None:
    used: set[str] = set()
    for query in dashboard_queries():
        names = metric_names(query.expr)
        assert names, f"{query.where} reads no passguard metric"
        assert names <= DESIGN_METRICS, f"{query.where}: {names - DESIGN_METRICS}"
        used |= names
    assert used >= SHOWN, f"not shown: {SHOWN - used}"


def test_per_mesh_queries_honour_the_mesh_variable() -> None:
    for query in dashboard_queries():
        if query.where.startswith("variable"):
            continue
        if metric_names(query.raw) <= PROCESS_METRICS:
            continue
        assert 'mesh=~"$mesh"' in query.raw, query.where


def test_every_query_parses_with_promtool() -> None:
    promtool = require_tool("promtool")
    queries = dashboard_queries()
    assert len(queries) >= 15
    result = promtool_check_exprs(promtool, {q.where: q.expr for q in queries})
    assert result.returncode == 0, result.stdout + result.stderr


def test_queries_parse_for_a_chosen_mesh_too() -> None:
    promtool = require_tool("promtool")
    queries = dashboard_queries({"mesh": "(default|staging)", "__rate_interval": "30s"})
    assert all("$" not in q.expr for q in queries)
    result = promtool_check_exprs(promtool, {q.where: q.expr for q in queries})
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_parse_check_rejects_bad_promql() -> None:
    # Proves promtool_check_exprs really parses: a broken query must fail.
    promtool = require_tool("promtool")
    result = promtool_check_exprs(promtool, {"broken": "sum by (mesh (rate(x[5m]))"})
    assert result.returncode != 0


def test_substitution() -> None:
    assert substitute('rate(x{mesh=~"$mesh"}[$__rate_interval])') == 'rate(x{mesh=~".*"}[1m])'
    assert substitute('x{mesh=~"${mesh:regex}"}[${__range}]', {"mesh": "a|b"}) == (
        'x{mesh=~"a|b"}[1h]'
    )
    with pytest.raises(ValueError, match="unknown Grafana variable"):
        substitute("x[$nope]")
    assert variable_to_promql('label_values(up{job="a"}, instance)') == (
        'group by (instance) (up{job="a"})'
    )


def test_dashboard_provisioning_example() -> None:
    document = load_yaml(REPO / "grafana" / "provisioning" / "dashboards" / "passguard.yaml")
    assert document["apiVersion"] == 1
    (provider,) = document["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"].startswith("/")


def test_datasource_provisioning_example() -> None:
    document = load_yaml(REPO / "grafana" / "provisioning" / "datasources" / "prometheus.yaml")
    assert document["apiVersion"] == 1
    (datasource,) = document["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"].startswith("http")
    # $__rate_interval needs the scrape interval.
    assert datasource["jsonData"]["timeInterval"]
