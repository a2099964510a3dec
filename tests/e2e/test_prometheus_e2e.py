"""The shipped dashboard and Prometheus rules, run by a real Prometheus against a real passguard.

Two real Envoy sidecars (one with real passthrough traffic, one idle), a real
``passguard run`` scraping them every second, and a real Prometheus 2.x
scraping passguard every second with ``config/prometheus/rules.yml`` loaded.
Then every PromQL expression of ``grafana/passguard.json`` and of the rules
goes through Prometheus's HTTP API, and the test says, query by query, which
ones must return data with traffic flowing and which alerts must stay quiet.

One change is made to the rules file: the recording group's ``interval: 30s``
is shortened to 1s (in a copy) so its rules are evaluated within seconds; the
expressions, names and every other field are the shipped ones (checked).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from passguard import __version__
from passguard.demo.traffic import EchoUpstream, send_traffic
from tests.ops.promql import RULES, DashboardQuery, dashboard_queries, metric_names

from .conftest import EnvoyFactory
from .procs import (
    Passguard,
    Prometheus,
    PromQLError,
    envoy_target,
    passguard_config,
    require_binary,
    wait_until,
)

pytestmark = pytest.mark.e2e

#: Bound for each wait on Prometheus (samples, rule evaluations).
WAIT = 45.0
JOB = "passguard"  # the job name rules.yml matches (`job=~"passguard|passguard-agent"`)
MESH_OFF = "type: Mesh\nname: {}\nnetworking:\n  outbound:\n    passthrough: false\n"
FIRST_BATCH, SECOND_BATCH = 3, 5

# --------------------------------------------------------------------------- expectations

#: What every dashboard query must return in this setup (traffic on mesh
#: `busy`, mesh `idle` quiet, a deny and an allow gate decision made, nothing
#: broken): "data", or the reason it may be empty. A panel that is not listed
#: fails the test: classify it here.
DASHBOARD_EXPECT: dict[str, str] = {
    "variable mesh": "data",
    "panel 'Passthrough connections in the gate window' (id 2) refId A": "data",
    "panel 'Dataplanes not fresh' (id 3) refId A": "data",  # sum of zeros per mesh
    "panel 'Blocked passthrough connections (range)' (id 4) refId A": "data",  # increase = 0
    "panel 'Passthrough connections / s per mesh' (id 6) refId A": "data",
    "panel 'Passthrough connections / s per service' (id 7) refId A": "data",
    "panel 'Active passthrough connections' (id 8) refId A": "data",
    "panel 'Passthrough bytes / s' (id 9) refId A": "data",
    "panel 'Passthrough connections by IP family' (id 10) refId A": "data",
    "panel 'Blocked passthrough connections' (id 11) refId A": "data",  # 0, but a series
    "panel 'Passthrough errors / s' (id 12) refId A": "data",  # overflow rate 0
    "panel 'Passthrough errors / s' (id 12) refId B": "data",  # connect failure rate 0
    "panel 'Passthrough connections in the gate window' (id 14) refId A": "data",
    "panel 'Gate decisions by verdict' (id 15) refId A": "data",  # two /v1/check calls
    "panel 'Dataplanes by state' (id 17) refId A": "data",
    "panel 'Targets down' (id 18) refId A": "data",  # 0 per mesh
    "panel 'Scrape duration' (id 19) refId A": "data",
    "panel 'Scrape duration' (id 19) refId B": "data",
    "panel 'Time since last successful scrape (oldest per mesh)' (id 20) refId A": "data",
    "panel 'Oldest dataplanes (top 10)' (id 21) refId A": "data",
    "panel 'Config reloads' (id 23) refId A": "data",  # success/failure children exist at 0
    "panel 'Failed reloads (range)' (id 24) refId A": "data",
    "panel 'passguard instances by version' (id 25) refId A": "data",
    # No shadow is registered in this stack: the queries must run, with no data.
    "panel 'Connections shadows would have refused / s' (id 27) refId A": "empty",
    "panel 'Destinations shadows would cut (evidence window)' (id 28) refId A": "empty",
}

#: Recording rules: every one must produce series once evaluated.
RECORDING_RULES = {
    "mesh_service:passguard_passthrough_connections:rate5m",
    "mesh:passguard_passthrough_connections:rate5m",
    "mesh_service:passguard_passthrough_active_connections:sum",
    "mesh_service_direction:passguard_passthrough_bytes:rate5m",
    "mesh_service:passguard_passthrough_blocked_connections:rate5m",
    "mesh_service:passguard_passthrough_overflow:rate5m",
    "mesh_service:passguard_passthrough_connect_failures:rate5m",
    "mesh:passguard_target_up:ratio",
    "mesh_verdict:passguard_gate_decisions:rate5m",
}

#: Alerts: all of them only fire when something is broken, so with this
#: healthy setup each expression must return NOTHING; the selectors it is
#: built from (comparison stripped) must return data, which proves the
#: alert watches series that exist and is quiet for the right reason.
ALERT_UNDERLYING: dict[str, list[str]] = {
    "PassguardDown": ['up{job=~"passguard|passguard-agent"}'],
    "PassguardNotScraping": [
        "time() - passguard_last_successful_scrape_timestamp_seconds",
        "passguard_target_up",
        "count by (job, instance, mesh) (passguard_target_up)",
        'count by (job, instance) (up{job=~"passguard|passguard-agent"} == 1)',
    ],
    "PassguardTargetsStale": [
        'sum by (job, instance, mesh) (passguard_mesh_dataplanes{state=~"stale|failed"})',
    ],
    "PassthroughCircuitBreakerOverflow": [
        "sum by (mesh, service, dataplane) (increase(passguard_passthrough_overflow_total[10m]))",
        "passguard_passthrough_overflow_total",
    ],
    "PassthroughTrafficBlocked": [
        "sum by (mesh, service, dataplane) "
        "(increase(passguard_passthrough_blocked_connections_total[10m]))",
        "passguard_passthrough_blocked_connections_total",
    ],
    "PassguardAuditPrunedBySize": ['passguard_audit_pruned_total{reason="size"}'],
    # No shadow in this stack (tests/e2e/test_shadows.py exercises them; the
    # promtool cases in config/prometheus/rules.test.yml prove the expression).
    "PassguardShadowWouldBlock": [],
    "PassguardAuditWriteFailing": [
        "sum by (job, instance) (increase(passguard_audit_write_failures_total[10m]))"],
    # This stack has no kuma or prometheus source, so no series: the promtool
    # cases prove the expressions; tests/e2e/test_daemon_kuma.py and
    # test_daemon_prometheus.py the metrics.
    "PassguardKumaDiscoveryDown": [],
    "PassguardPrometheusSourceDown": [],
    "PassguardConfigReloadFailed": [
        "sum by (job, instance) "
        '(increase(passguard_config_reloads_total{outcome="failure"}[15m]))'],
    "PassguardTLSCertificateReloadFailed": [
        "sum by (job, instance) "
        '(increase(passguard_tls_certificate_reloads_total{outcome="failure"}[15m]))'],
    # Exported (as 0) whether or not a worker runs.
    "PassguardScrapeWorkerRestarting": [
        "sum by (job, instance) (increase(passguard_scrape_worker_exits_total[15m]))"],
}


# --------------------------------------------------------------------------- setup


def fast_rules_copy(tmp: Path) -> Path:
    """rules.yml with every group evaluated each second; nothing else changed."""
    shipped = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    fast = copy.deepcopy(shipped)
    for group in fast["groups"]:
        if "interval" in group:
            group["interval"] = "1s"
    for a, b in zip(shipped["groups"], fast["groups"], strict=True):
        assert {k: v for k, v in a.items() if k != "interval"} == \
               {k: v for k, v in b.items() if k != "interval"}
    path = tmp / "rules.yml"
    path.write_text(yaml.safe_dump(fast, sort_keys=False), encoding="utf-8")
    return path


def mesh_connections(pg: Passguard) -> dict[str, int]:
    return {m["mesh"]: m["connections"] for m in pg.get("/v1/meshes")["meshes"]}


@dataclass
class Stack:
    passguard: Passguard
    prometheus: Prometheus
    rules: dict[str, Any]


@contextlib.asynccontextmanager
async def running_stack(binary: str, envoy_factory: EnvoyFactory, echo_upstream: EchoUpstream,
                        tmp_path: Path) -> AsyncIterator[Stack]:
    """Envoys with traffic → passguard → Prometheus, all stopped on exit."""
    busy = await envoy_factory("legacy")
    idle = await envoy_factory("unified")
    cfg = passguard_config(tmp_path, [
        envoy_target(busy.admin_url, "busy", "busy-1", service="web"),
        envoy_target(idle.admin_url, "idle", "idle-1", service="catalog"),
    ], interval="1s", window="1m")
    pg = Passguard(cfg, tmp_path)
    prom_dir = tmp_path / "prometheus"
    prom_dir.mkdir()
    rules_path = fast_rules_copy(prom_dir)
    prom = Prometheus(prom_dir, rule_files=[rules_path], interval="1s", scrape_configs=[{
        "job_name": JOB,
        "scrape_interval": "1s",
        "scrape_timeout": "1s",
        "static_configs": [{"targets": [pg.address]}],
    }])
    try:
        await asyncio.to_thread(pg.start)
        await send_traffic(busy, echo_upstream, FIRST_BATCH)
        await asyncio.to_thread(wait_until, lambda: mesh_connections(pg).get("busy")
                                == FIRST_BATCH, WAIT, "passguard to see the traffic",
                                details=pg.log_tail)
        # Real gate decisions, so passguard_gate_decisions_total has series.
        for mesh, verdict in (("busy", "deny"), ("idle", "allow")):
            status, body = await asyncio.to_thread(pg.post, "/v1/check",
                                                   MESH_OFF.format(mesh).encode())
            assert status == 200 and body["verdict"] == verdict, body
        await asyncio.to_thread(prom.start, binary)
        # A few samples of passguard in Prometheus before more traffic.
        await asyncio.to_thread(wait_until, lambda: prom.values(
            f'count_over_time(up{{job="{JOB}"}}[1m])', "job").get(JOB, 0) >= 3,
            WAIT, "3 scrapes of passguard by Prometheus", details=prom.log_tail)
        # Traffic while Prometheus watches: rates and increases are above zero.
        await send_traffic(busy, echo_upstream, SECOND_BATCH)
        total = FIRST_BATCH + SECOND_BATCH
        await asyncio.to_thread(wait_until, lambda: prom.values(
            'sum by (mesh) (passguard_mesh_passthrough_connections_window)', "mesh"
        ).get("busy") == total, WAIT, f"Prometheus to see {total} busy connections",
            details=lambda: prom.log_tail() + "\n" + pg.log_tail())
        await asyncio.to_thread(time.sleep, 2.5)  # a few samples after the change
        yield Stack(pg, prom, yaml.safe_load(rules_path.read_text()))
    finally:
        await asyncio.to_thread(prom.close)
        await asyncio.to_thread(pg.close)


# --------------------------------------------------------------------------- checks


def run_query(prom: Prometheus, where: str, expr: str, failures: list[str]
              ) -> list[dict[str, Any]] | None:
    try:
        return prom.query(expr)
    except PromQLError as exc:
        failures.append(f"{where}: Prometheus refused {expr!r}: {exc}")
        return None


def check_dashboard(prom: Prometheus, queries: list[DashboardQuery],
                    failures: list[str]) -> dict[str, list[dict[str, Any]]]:
    unclassified = {q.where for q in queries} - DASHBOARD_EXPECT.keys()
    gone = DASHBOARD_EXPECT.keys() - {q.where for q in queries}
    if unclassified:
        failures.append(f"dashboard queries not classified in DASHBOARD_EXPECT: {unclassified}")
    if gone:
        failures.append(f"DASHBOARD_EXPECT lists queries the dashboard no longer has: {gone}")
    results: dict[str, list[dict[str, Any]]] = {}
    now = time.time()
    for q in queries:
        result = run_query(prom, q.where, q.expr, failures)
        if result is None:
            continue
        results[q.where] = result
        want_data = DASHBOARD_EXPECT.get(q.where) == "data"
        if want_data and not result:
            failures.append(f"{q.where}: no data for {q.expr!r}")
        if not q.instant:  # a time series panel: the range query Grafana sends
            try:
                series = prom.query_range(q.expr, now - 60, now, 1)
            except PromQLError as exc:
                failures.append(f"{q.where}: range query refused {q.expr!r}: {exc}")
                continue
            if want_data and not series:
                failures.append(f"{q.where}: no data over the last minute for {q.expr!r}")
    return results


def by(result: list[dict[str, Any]], *labels: str) -> dict[tuple[str, ...], float]:
    return {tuple(s["metric"].get(k, "") for k in labels): float(s["value"][1]) for s in result}


async def test_dashboard_and_rules_against_real_prometheus(
        envoy_factory: EnvoyFactory, echo_upstream: EchoUpstream, tmp_path: Path) -> None:
    binary = require_binary("prometheus")  # the test fails, never skips, without it
    async with running_stack(binary, envoy_factory, echo_upstream, tmp_path) as stack:
        await check_stack(stack)


async def check_stack(stack: Stack) -> None:
    prom, failures = stack.prometheus, []
    total = FIRST_BATCH + SECOND_BATCH

    # Prometheus scrapes passguard successfully.
    targets = await asyncio.to_thread(prom.api, "targets")
    [target] = [t for t in targets["activeTargets"] if t["labels"]["job"] == JOB]
    assert target["health"] == "up", target

    # ---- every dashboard query
    queries = dashboard_queries({"mesh": ".*", "__rate_interval": "1m", "__range": "1h"})
    results = await asyncio.to_thread(check_dashboard, prom, queries, failures)

    # ... and the values behind them tell the truth about this setup.
    def panel(where: str, *labels: str) -> dict[tuple[str, ...], float]:
        return by(results.get(where, []), *labels)

    window = panel("panel 'Passthrough connections in the gate window' (id 2) refId A", "mesh")
    assert window == {("busy",): total, ("idle",): 0}, window
    rates = panel("panel 'Passthrough connections / s per mesh' (id 6) refId A", "mesh")
    assert rates.get(("busy",), 0) > 0 and rates.get(("idle",)) == 0, rates
    assert set(panel("variable mesh", "mesh")) == {("busy",), ("idle",)}
    states = panel("panel 'Dataplanes by state' (id 17) refId A", "state")
    assert states == {("fresh",): 2, ("stale",): 0, ("failed",): 0, ("offline",): 0}, states
    assert panel("panel 'Targets down' (id 18) refId A", "mesh") == {("busy",): 0, ("idle",): 0}
    decisions = panel("panel 'Gate decisions by verdict' (id 15) refId A", "mesh", "verdict")
    assert set(decisions) == {("busy", "deny"), ("idle", "allow")}, decisions
    versions = panel("panel 'passguard instances by version' (id 25) refId A", "version")
    assert versions == {(__version__,): 1}, versions
    assert panel("panel 'Failed reloads (range)' (id 24) refId A") == {(): 0}

    # ---- rules.yml: loaded, healthy, and every expression runs
    loaded = await asyncio.to_thread(prom.api, "rules")
    shipped = [r for g in stack.rules["groups"] for r in g["rules"]]
    got = [r for g in loaded["groups"] for r in g["rules"]]
    assert len(got) == len(shipped), (len(got), len(shipped))
    for rule in got:
        if rule["health"] != "ok":
            failures.append(f"rule {rule['name']}: health {rule['health']}: "
                            f"{rule.get('lastError')}")
    records = {r["record"]: r["expr"] for r in shipped if "record" in r}
    alerts = {r["alert"]: r["expr"] for r in shipped if "alert" in r}
    assert set(records) == RECORDING_RULES, "classify the new/removed recording rules"
    assert set(alerts) == set(ALERT_UNDERLYING), "classify the new/removed alerts"

    # Recording rules: the expression has data, and so has the recorded series
    # once Prometheus evaluated the group (every second in this copy).
    for name, expr in records.items():
        result = await asyncio.to_thread(run_query, prom, f"recording rule {name}", expr,
                                         failures)
        if result is not None and not result:
            failures.append(f"recording rule {name}: its expression has no data: {expr!r}")

    def all_recorded() -> bool:
        return all(prom.query(name) for name in records)

    try:
        await asyncio.to_thread(wait_until, all_recorded, WAIT,
                                "every recording rule to produce series")
    except AssertionError:
        missing = [n for n in records if not prom.query(n)]
        failures.append(f"recording rules produced no series: {missing}")
    recorded = by(await asyncio.to_thread(prom.query,
                                          "mesh:passguard_passthrough_connections:rate5m"),
                  "mesh")
    assert recorded.get(("busy",), 0) > 0 and recorded.get(("idle",)) == 0, recorded
    assert by(await asyncio.to_thread(prom.query, "mesh:passguard_target_up:ratio"),
              "mesh") == {("busy",): 1, ("idle",): 1}

    # Alerts: quiet on a healthy system, built on series that exist.
    for name, expr in alerts.items():
        result = await asyncio.to_thread(run_query, prom, f"alert {name}", expr, failures)
        if result:
            failures.append(f"alert {name} fires on a healthy system: {result}")
        for selector in ALERT_UNDERLYING[name]:
            if not metric_names(selector) <= metric_names(expr) | {"up"}:
                failures.append(f"alert {name}: {selector!r} reads metrics its expr does not")
            data = await asyncio.to_thread(run_query, prom, f"alert {name} selector",
                                           selector, failures)
            if data is not None and not data:
                failures.append(f"alert {name}: underlying {selector!r} has no data")
    states_of = {r["name"]: r["state"] for r in got if r["type"] == "alerting"}
    assert all(s == "inactive" for s in states_of.values()), states_of

    assert not failures, "\n".join(failures)
