"""Helpers for the operations tests: real tools, PromQL from the dashboard and the rules.

`dashboard_queries()` is the entry point for later end-to-end tests: it returns
every PromQL expression of `grafana/passguard.json` (panel targets and query
variables) with Grafana's variables replaced, ready to run against a real
Prometheus (`GET /api/v1/query?query=<q.expr>`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "grafana" / "passguard.json"
PROMETHEUS_DIR = REPO / "config" / "prometheus"
RULES = PROMETHEUS_DIR / "rules.yml"
RULES_TEST = PROMETHEUS_DIR / "rules.test.yml"
SCRAPE_CONFIG = PROMETHEUS_DIR / "scrape.yml"

#: The passguard_* series of DESIGN §3 as they appear in the exposition
#: (counters with their `_total` suffix). Anything else is a typo.
DESIGN_METRICS = frozenset(
    {
        "passguard_passthrough_connections_total",
        "passguard_passthrough_active_connections",
        "passguard_passthrough_bytes_total",
        "passguard_passthrough_blocked_connections_total",
        "passguard_passthrough_connect_failures_total",
        "passguard_passthrough_overflow_total",
        "passguard_mesh_passthrough_connections_window",
        "passguard_mesh_dataplanes",
        "passguard_target_up",
        "passguard_target_scrape_duration_seconds",
        "passguard_last_successful_scrape_timestamp_seconds",
        "passguard_gate_decisions_total",
        "passguard_config_reloads_total",
        "passguard_build_info",
        # DESIGN §6
        "passguard_audit_pruned_total",
        # DESIGN §6: shadow policies
        "passguard_shadow_would_block_connections_total",
        "passguard_shadow_destinations",
        # Not in DESIGN's table, exported by passguard/metrics.py: the
        # operations alerts of issue 17 read them.
        "passguard_audit_write_failures_total",
        "passguard_kuma_discovery_up",
        "passguard_prometheus_source_up",
        "passguard_tls_certificate_reloads_total",
        # Issue 16: the scrape worker process's exits.
        "passguard_scrape_worker_exits_total",
    }
)

#: Metrics that carry no `mesh` label (per process, not per mesh).
PROCESS_METRICS = frozenset({"passguard_config_reloads_total", "passguard_build_info",
                             "passguard_audit_write_failures_total",
                             "passguard_kuma_discovery_up", "passguard_prometheus_source_up",
                             "passguard_tls_certificate_reloads_total",
                             "passguard_scrape_worker_exits_total"})

#: Values for Grafana's built-in variables (a 15 s scrape interval, a 1 h range).
GRAFANA_BUILTINS: Mapping[str, str] = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__interval_ms": "15000",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
}

#: Dashboard variables and the value they take by default ("All" is `.*`).
DASHBOARD_VARIABLES: Mapping[str, str] = {"mesh": ".*"}

_VARIABLE = re.compile(
    r"\$\{(?P<braced>\w+)(?::\w+)?\}|\[\[(?P<old>\w+)(?::\w+)?\]\]|\$(?P<bare>\w+)"
)
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?P<selector>.+?)\s*,\s*(?P<label>\w+)\s*\)\s*$")
_QUERY_RESULT = re.compile(r"^\s*query_result\((?P<expr>.+)\)\s*$")
_METRIC_NAME = re.compile(r"\bpassguard_[a-z0-9_]+\b")


def require_tool(name: str) -> str:
    """The path of a command-line tool; the test FAILS (never skips) without it."""
    path = shutil.which(name)
    if path is None:
        package = "prometheus" if name == "promtool" else "systemd"
        pytest.fail(
            f"{name} is not installed: the operations tests prove the shipped files against "
            f"the real tool (Debian: apt-get install {package})"
        )
    return path


def run(
    argv: list[str], *, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "cat", "LC_ALL": "C.UTF-8"},
    )


def substitute(expr: str, variables: Mapping[str, str] | None = None) -> str:
    """Replace `$var`, `${var}`, `${var:fmt}` and `[[var]]` with concrete values."""
    values = {**GRAFANA_BUILTINS, **DASHBOARD_VARIABLES, **(variables or {})}

    def replace(match: re.Match[str]) -> str:
        name = match.group("braced") or match.group("old") or match.group("bare")
        if name not in values:
            raise ValueError(f"unknown Grafana variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(replace, expr)


def variable_to_promql(query: str) -> str:
    """A query variable's Grafana function as the PromQL that returns the same values."""
    if m := _LABEL_VALUES.match(query):
        return f"group by ({m.group('label')}) ({m.group('selector')})"
    if m := _QUERY_RESULT.match(query):
        return m.group("expr")
    raise ValueError(f"unsupported variable query {query!r}")


@dataclass(frozen=True)
class DashboardQuery:
    """One PromQL expression of the dashboard."""

    where: str  # "panel 'Title' (id 3) refId A" or "variable mesh"
    raw: str  # as written in the dashboard
    expr: str  # Grafana variables substituted: valid PromQL
    instant: bool  # True for instant queries (stat panels, variables)


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def iter_panels(panels: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def variable_query(variable: Mapping[str, Any]) -> str:
    query = variable.get("query")
    if isinstance(query, Mapping):
        query = query.get("query")
    if not isinstance(query, str):
        raise ValueError(f"variable {variable.get('name')!r} has no query string")
    return query


def dashboard_queries(
    variables: Mapping[str, str] | None = None, path: Path = DASHBOARD
) -> list[DashboardQuery]:
    """Every PromQL expression of the dashboard, variables substituted.

    `variables` overrides the defaults, e.g. `{"mesh": "default"}` or
    `{"__rate_interval": "30s"}`.
    """
    dashboard = load_dashboard(path)
    queries: list[DashboardQuery] = []
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        raw = variable_query(variable)
        queries.append(
            DashboardQuery(
                where=f"variable {variable['name']}",
                raw=raw,
                expr=substitute(variable_to_promql(raw), variables),
                instant=True,
            )
        )
    for panel in iter_panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            raw = target.get("expr")
            if not raw:
                continue
            where = f"panel {panel.get('title')!r} (id {panel.get('id')})"
            queries.append(
                DashboardQuery(
                    where=f"{where} refId {target.get('refId')}",
                    raw=raw,
                    expr=substitute(raw, variables),
                    instant=bool(target.get("instant")) and not target.get("range", False),
                )
            )
    return queries


def metric_names(expr: str) -> set[str]:
    """The passguard_* metric names an expression reads."""
    return set(_METRIC_NAME.findall(expr))


def promtool_check_exprs(
    promtool: str, exprs: Mapping[str, str]
) -> subprocess.CompletedProcess[str]:
    """Parse PromQL with promtool: each expression becomes a recording rule.

    `exprs` maps a label (where the expression comes from) to the expression;
    the labels are kept as rule labels so promtool's errors can be traced back.
    """
    rules = [
        {"record": f"passguard_check:query_{i}", "expr": expr, "labels": {"source": where}}
        for i, (where, expr) in enumerate(exprs.items())
    ]
    document = {"groups": [{"name": "promql-parse-check", "rules": rules}]}
    with tempfile.TemporaryDirectory(prefix="passguard-promql-") as tmp:
        path = Path(tmp) / "queries.rules.yml"
        path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
        return run([promtool, "check", "rules", str(path)])


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))
