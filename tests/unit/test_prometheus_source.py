"""Source ``prometheus``: query building, the ``/api/v1/query`` wire format, the
evidence rules, and the HTTP client against a fake server.

``FakePrometheus`` stands in for Prometheus's HTTP API: an aiohttp server that
answers ``POST /api/v1/query`` with canned JSON in the documented response
shape (``{"status": "success", "data": {"resultType": "vector", "result":
[{"metric": {...}, "value": [<unix time>, "<number>"]}]}}``, errors as
``{"status": "error", "errorType": ..., "error": ...}``), and records every
request.  The PromQL itself is exercised against a real Prometheus in
``tests/e2e/test_prometheus_source.py``.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web
from aiohttp.test_utils import TestServer

from passguard.documents import Change, Resource
from passguard.envoy.names import DEFAULT_CLUSTERS_PATTERN
from passguard.envoy.stats import Counters
from passguard.gate.decide import Evidence, decide
from passguard.sources.prometheus import PrometheusSource
from passguard.sources.promevidence import build_evidence
from passguard.sources.promql import FACT, PART, build_queries, duration
from passguard.sources.promwire import PrometheusError, Sample, parse_vector
from passguard.sources.settings import (
    PrometheusLabels,
    PrometheusSourceConfig,
    check_config,
    parse_selector,
    quote,
)
from passguard.store.snapshot import DataplaneEvidence
from passguard.verdicts import GatePolicy

NOW = 1_700_000_000.0
WINDOW = 60.0
THRESHOLD = 9.0  # 3 × a 3 s scrape interval
INTERVAL = 3.0
LABELS = {"mesh": "default", "service": "web"}
CLUSTERS = {"ipv4": "outbound_passthrough_ipv4", "ipv6": "outbound_passthrough_ipv6",
            "legacy": "outbound_passthrough", "matched": "meshpassthrough_tcp_10_0_0_1_443"}

Row = tuple[dict[str, str], str]


def vector(rows: list[Row]) -> dict[str, Any]:
    """A successful instant-query answer, as Prometheus writes it."""
    return {"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": labels, "value": [NOW, value]} for labels, value in rows]}}


def samples(rows: list[Row]) -> list[Sample]:
    return parse_vector(vector(rows), "test")


def dp(name: str, **extra: str) -> dict[str, str]:
    return {**LABELS, "dataplane": name, **extra}


def facts(name: str, **values: float) -> list[Row]:
    return [(dp(name, **{FACT: k}), repr(v)) for k, v in values.items()]


def watched(name: str, since: float = NOW - 600, **more: float) -> list[Row]:
    """Facts of a healthy dataplane Prometheus has watched since ``since``."""
    base: dict[str, float] = {"newest_now": NOW - 1, "newest": NOW - 1, "first_seen": since,
                              "samples": 1 + (NOW - max(since, NOW - 69)) / INTERVAL,
                              "restarts": 0, "up": 1, "uptime": 10_000, "started": NOW - 10_000}
    base.update(more)
    return facts(name, **base)


def series(name: str, family: str = "ipv4", *, increase: str = "0", first: str = "0",
           born_later: bool = False, cluster: str | None = None) -> list[Row]:
    """The window rows of one Envoy passthrough cluster."""
    labels = {"envoy_cluster_name": cluster or CLUSTERS[family]}
    rows = [(dp(name, **labels, **{PART: "increase"}), increase),
            (dp(name, **labels, **{PART: "first"}), first)]
    if born_later:
        rows.append((dp(name, **labels, **{PART: "born_later"}), str(NOW - 5)))
    return rows


def blocked(name: str, value: str, **label: str) -> Row:
    return (dp(name, **(label or {"envoy_tcp_prefix": CLUSTERS["ipv4"]}), **{PART: "blocked"}),
            value)


def stat(name: str, metric: str, value: str, family: str = "ipv4", **labels: str) -> Row:
    if "family" not in labels and not metric.startswith("passguard_"):
        key = "envoy_cluster_name" if metric.startswith("envoy_cluster") else "envoy_tcp_prefix"
        labels.setdefault(key, CLUSTERS[family])
    elif metric.startswith("passguard_"):
        labels.setdefault("family", family)
    return (dp(name, __name__=metric, **labels), value)


def cfg(**kw: Any) -> PrometheusSourceConfig:
    return PrometheusSourceConfig(url=kw.pop("url", "http://prom:9090"),
                                  scrape_interval=kw.pop("scrape_interval", INTERVAL), **kw)


def evidence(window: list[Row], latest: list[Row], fact_rows: list[Row],
             **kw: Any) -> dict[str, DataplaneEvidence]:
    res = build_evidence(kw.pop("config", cfg()), samples(window), samples(latest),
                         samples(fact_rows), now=NOW, window=WINDOW, threshold=THRESHOLD)
    return {e.target.dataplane: e for e in res.evidence}


MESH_OFF = Change(Resource("Mesh", "default", "default", "universal", "None"), None, "assumed")


def verdict(dps: list[DataplaneEvidence], fallback: str = "deny") -> str:
    dec = decide(MESH_OFF, Evidence("default", WINDOW, tuple(dps)),
                 GatePolicy("enforce", fallback))  # type: ignore[arg-type]
    return dec.verdict


# --------------------------------------------------------------------------- queries


def test_queries_envoy_defaults() -> None:
    q = build_queries(cfg(), WINDOW, THRESHOLD)
    pattern = quote(DEFAULT_CLUSTERS_PATTERN)
    assert f"envoy_cluster_upstream_cx_total{{envoy_cluster_name=~{pattern}}}" in q.window
    assert f"envoy_tcp_downstream_cx_no_route{{envoy_tcp_prefix=~{pattern}}}" in q.window
    assert "envoy_listener_no_filter_chain_match{envoy_listener_address=~" in q.window
    # Range = window + tolerance, subquery step = the scrape interval.
    assert q.range_seconds == 69 and q.step_seconds == 3
    assert "[69000ms:3000ms]" in q.window and "[69000ms]" in q.window
    assert "sum by (mesh, dataplane, service, envoy_cluster_name)" in q.window
    assert "sum by (mesh, dataplane, service, envoy_tcp_prefix, envoy_listener_address)" in (
        q.window)
    assert ("sum by (mesh, dataplane, service, envoy_cluster_name, envoy_tcp_prefix, "
            "envoy_listener_address, __name__)") in q.latest
    assert "by (mesh, dataplane, service)" in q.facts
    for name in ("newest_now", "newest", "first_seen", "samples", "restarts", "up",
                 "started", "uptime"):
        assert f'"{FACT}", "{name}", "", ""' in q.facts
    for name in ("increase", "first", "born_later", "blocked"):
        assert f'"{PART}", "{name}", "", ""' in q.window
    assert 'up{mesh!="", dataplane!=""}' in q.facts  # not the `up` of unrelated jobs
    assert "envoy_server_uptime" in q.facts
    assert "label_replace(" not in q.latest  # families are mapped in Python
    assert "passguard_" not in q.window.replace("passguard_part", "")


def test_queries_passguard_metrics_and_label_names() -> None:
    c = cfg(metrics="passguard", labels=PrometheusLabels("kuma_mesh", "kuma_dp", "kuma_svc"))
    q = build_queries(c, WINDOW, THRESHOLD)
    assert "passguard_passthrough_connections_total" in q.window
    assert "passguard_passthrough_blocked_connections_total" in q.window
    assert "envoy_" not in q.window + q.latest + q.facts
    # Agents' duplicates are one counter: max, not sum.
    assert "max by (kuma_mesh, kuma_dp, kuma_svc, family)" in q.window
    assert "sum by" not in q.window + q.latest
    assert "passguard_target_up" in q.facts
    assert "passguard_last_successful_scrape_timestamp_seconds" in q.facts
    for name in ("agent_success", "agent_min_up"):
        assert f'"{FACT}", "{name}"' in q.facts
    assert '"started"' not in q.facts  # agents do not export the proxy's uptime
    assert "direction" in q.latest


@pytest.mark.parametrize("metrics", ["envoy", "passguard"])
def test_extra_selector_reaches_every_selector(metrics: str) -> None:
    q = build_queries(cfg(metrics=metrics, extra_selector='{cluster="eu-1", job=~"kuma.*"}'),
                      WINDOW, THRESHOLD)
    names = r"\b(up|envoy_[a-z_]+|passguard_(?:passthrough|target|last)_[a-z_]+)\b"
    for text in (q.window, q.latest, q.facts):
        # Every {...} is a selector (a __name__-only one included) and has it.
        selectors = re.findall(r"\{([^{}]*)\}", text)
        assert selectors
        for sel in selectors:
            assert 'cluster="eu-1"' in sel and 'job=~"kuma.*"' in sel, sel
        # No metric name is used without a {...} (grouping labels aside).
        bare = re.sub(r"\{[^{}]*\}", "{}", re.sub(r'"(?:[^"\\]|\\.)*"', '""', text))
        bare = re.sub(r"\b(?:by|on) \([^()]*\)", "", bare)
        for m in re.finditer(names, bare):
            assert bare[m.end():].startswith("{"), f"{m.group(1)} without matchers"


def test_cluster_pattern_is_quoted() -> None:
    q = build_queries(cfg(), WINDOW, THRESHOLD, clusters_pattern=r'my\.passthrough"x')
    assert r'envoy_cluster_name=~"my\\.passthrough\"x"' in q.window


def test_listener_pattern_follows_the_outbound_port() -> None:
    q = build_queries(cfg(), WINDOW, THRESHOLD, outbound_port=15123)
    assert "_15123)" in q.window and "_15001" not in q.window


def test_step_is_bounded_for_long_windows() -> None:
    q = build_queries(cfg(scrape_interval=15), 24 * 3600, 45)
    assert q.step_seconds == pytest.approx((24 * 3600 + 45) / 240)


@pytest.mark.parametrize(("seconds", "text"), [(900, "900000ms"), (1.5, "1500ms"),
                                                 (0.0001, "1ms")])
def test_duration(seconds: float, text: str) -> None:
    assert duration(seconds) == text


@pytest.mark.parametrize(("text", "matchers"), [
    ("", ()),
    ("{}", ()),
    ('{cluster="eu-1"}', ('cluster="eu-1"',)),
    ('cluster="eu-1", job=~"kuma-.*",', ('cluster="eu-1"', 'job=~"kuma-.*"')),
    (" { env != 'dev' , zone!~`a|b` } ", ('env!="dev"', 'zone!~"a|b"')),
    (r'path="a\"b\\c"', (r'path="a\"b\\c"',)),
])
def test_parse_selector(text: str, matchers: tuple[str, ...]) -> None:
    assert parse_selector(text) == matchers


@pytest.mark.parametrize(("text", "message"), [
    ('{cluster="eu-1"', "does not end with }"),
    ('cluster=eu-1', "not a label matcher"),
    ('cluster="a"} or vector(1) or {x="y"', "not a label matcher"),
    ('__name__="up"', "__name__"),
    ('job=~"("', "not a regular expression"),
    ('a="b" c="d"', "not a label matcher"),
    ('a="\\q"', "unsupported escape"),
])
def test_parse_selector_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_selector(text)


def test_check_config() -> None:
    assert check_config(cfg()) == []
    bad = cfg(url="prom:9090", labels=PrometheusLabels("mesh", "mesh", "9x"),
              extra_selector="oops", token_file="/t", username="u", timeout=0,
              scrape_interval=-1, forget_after=0, headers=(("Authorization", "x"), ("a b", "c")),
              metrics="graphite")
    keys = [k for k, _ in check_config(bad)]
    assert keys == ["url", "labels.service", "labels.dataplane", "metrics", "extra_selector",
                    "token_file", "password_file", "timeout", "scrape_interval",
                    "forget_after", "headers", "headers"]
    with pytest.raises(ValueError, match="url: must be an http"):
        PrometheusSource(cfg(url="ftp://x"), WINDOW, 3)


# --------------------------------------------------------------------------- wire format


def test_parse_vector_values() -> None:
    rows = parse_vector(vector([({"a": "1"}, "3"), ({"a": "2"}, "NaN"), ({"a": "3"}, "+Inf"),
                                ({"a": "4"}, "-Inf"), ({"a": "5"}, "1.5e3")]), "q")
    values = [r.value for r in rows]
    assert values[0] == 3 and values[1] != values[1] and values[2] == float("inf")
    assert values[3] == float("-inf") and values[4] == 1500
    assert rows[0].labels == {"a": "1"}
    assert parse_vector(vector([]), "q") == []


@pytest.mark.parametrize(("body", "message"), [
    ([], "must be a JSON object, got a list"),
    ({"status": "error", "errorType": "bad_data", "error": "parse error at char 3"},
     "Prometheus answered an error: bad_data: parse error at char 3"),
    ({"status": "weird"}, "status must be \"success\", got 'weird'"),
    ({"status": "success"}, "data must be an object, got null"),
    ({"status": "success", "data": {"resultType": "matrix", "result": []}},
     "data.resultType must be \"vector\", got 'matrix'"),
    ({"status": "success", "data": {"resultType": "scalar", "result": [1, "1"]}},
     "data.resultType must be \"vector\", got 'scalar'"),
    ({"status": "success", "data": {"resultType": "vector", "result": {}}},
     "data.result must be a list, got an object"),
    ({"status": "success", "data": {"resultType": "vector", "result": [7]}},
     "data.result[0] must be an object, got a number"),
    ({"status": "success", "data": {"resultType": "vector", "result": [
        {"value": [1, "1"]}]}}, "data.result[0].metric must map label names to strings"),
    ({"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": {"mesh": 3}, "value": [1, "1"]}]}},
     "data.result[0].metric must map label names to strings"),
    ({"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": {}, "value": "1"}]}}, "data.result[0].value must be [timestamp, \"value\"]"),
    ({"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": {}, "values": [[1, "1"]]}]}}, "data.result[0].value must be"),
    ({"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": {}, "value": ["1", "1"]}]}}, "data.result[0].value[0] must be a timestamp"),
    ({"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": {}, "value": [1, 1]}]}}, "data.result[0].value[1] must be a string"),
    ({"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": {}, "value": [1, "many"]}]}}, "data.result[0].value[1] is not a number"),
    ({"status": "success", "warnings": ["store eu-2 unavailable"],
      "data": {"resultType": "vector", "result": []}},
     "answered with warnings (partial data): store eu-2 unavailable"),
])
def test_parse_vector_errors_name_the_field(body: Any, message: str) -> None:
    with pytest.raises(PrometheusError, match=re.escape(message)) as info:
        parse_vector(body, "POST x (facts query)")
    assert str(info.value).startswith("POST x (facts query): ")


# --------------------------------------------------------------------------- evidence rules


def test_watched_dataplanes_traffic_rounding_and_latest() -> None:
    window = [
        *series("busy", "ipv4", increase="3", first="40"),  # first: before the window
        *series("busy", "ipv6", increase="0.2"),  # extrapolated: any increase is traffic
        blocked("busy", "1.0000000001"),
        blocked("busy", "2", envoy_listener_address="[__]_15001"),
        *series("idle", "ipv4"),
    ]
    latest = [
        stat("busy", "envoy_cluster_upstream_cx_total", "43"),
        stat("busy", "envoy_cluster_upstream_cx_active", "2"),
        stat("busy", "envoy_cluster_upstream_cx_tx_bytes_total", "100"),
        stat("busy", "envoy_cluster_upstream_cx_rx_bytes_total", "200"),
        stat("busy", "envoy_cluster_upstream_cx_connect_fail", "4"),
        stat("busy", "envoy_cluster_upstream_cx_overflow", "5"),
        stat("busy", "envoy_tcp_downstream_cx_no_route", "6"),
        stat("busy", "envoy_listener_no_filter_chain_match", "1",
             envoy_listener_address="10.0.0.1_15001"),
        stat("busy", "envoy_cluster_something_else", "99"),
    ]
    ev = evidence(window, latest, watched("busy") + watched("idle"))
    busy, idle = ev["busy"], ev["idle"]
    assert busy.window == {"ipv4": Counters(cx_total=3, no_route=1),
                           "ipv6": Counters(cx_total=1, no_route=2)}
    assert busy.connections == 4 and busy.blocked_connections == 3
    assert busy.latest == {"ipv4": Counters(43, 2, 100, 200, 4, 5, 7)}
    assert busy.active_connections == 2
    assert (busy.state, busy.covered, busy.gap_reason) == ("fresh", True, None)
    assert busy.target.url == "http://prom:9090" and busy.target.service == "web"
    assert busy.target.tags == {} and busy.target.key == "default/busy"
    assert not busy.target.offline
    assert busy.uptime == 10_000 and busy.last_success == NOW - 1
    assert busy.last_attempt == NOW and busy.scrape_duration is None and busy.error is None
    assert not idle.has_traffic and not idle.unknown
    assert verdict([busy, idle]) == "deny"
    assert verdict([idle]) == "allow"


def test_families_follow_the_cluster_names() -> None:
    window = [*series("a", cluster="pass_through", increase="1"),
              *series("a", cluster="self_transparentproxy_passthrough_outbound_ipv6",
                      increase="2"),
              *series("a", cluster="meshpassthrough_tcp_10_0_0_1_443", increase="3"),
              *series("a", cluster="meshpassthrough_tcp_10_0_0_2_80", increase="4"),
              blocked("a", "5", envoy_listener_address="127.0.0.1_15001"),
              blocked("a", "6", envoy_tcp_prefix="outbound_passthrough")]
    ev = evidence(window, [], watched("a"))["a"]
    assert {f: (c.cx_total, c.no_route) for f, c in ev.window.items()} == {
        "legacy": (1, 6), "ipv6": (2, 0), "matched": (7, 0), "ipv4": (0, 5)}


def test_counter_born_after_the_dataplane_counts_its_first_value() -> None:
    """usedonly / kuma-dp: the counter had no series until its first connection."""
    window = series("u", increase="1", first="2", born_later=True)
    assert evidence(window, [], watched("u"))["u"].connections == 3


def test_active_connection_alone_is_traffic() -> None:
    latest = [stat("ws", "envoy_cluster_upstream_cx_active", "1")]
    ev = evidence(series("ws"), latest, watched("ws"))
    assert ev["ws"].connections == 0 and ev["ws"].has_traffic
    assert verdict(list(ev.values())) == "deny"


def test_new_dataplane_started_inside_the_window_counts_its_first_values() -> None:
    window = series("new", first="5")
    ev = evidence(window, [], watched("new", since=NOW - 20, started=NOW - 25, uptime=25))
    assert ev["new"].covered and ev["new"].connections == 5


def test_new_dataplane_first_seen_at_zero_is_covered() -> None:
    old = watched("old", since=NOW - 20, started=NOW - 99_999)
    ev = evidence(series("old", first="0"), [], old)
    assert ev["old"].covered and not ev["old"].has_traffic
    # Counters absent altogether (usedonly, never used): zero as well.
    assert evidence([], [], old)["old"].covered
    # Counters that appeared after the first sample were zero at it: traffic.
    ev = evidence(series("old", first="2", born_later=True), [], old)
    assert ev["old"].covered and ev["old"].connections == 2


def test_new_dataplane_with_history_is_not_covered_until_a_window_passed() -> None:
    window = series("old", first="12")
    ev = evidence(window, [], watched("old", since=NOW - 20, started=NOW - 99_999))
    old = ev["old"]
    assert not old.covered and old.unknown and not old.has_traffic
    assert "traffic from before Prometheus first saw it (20s ago" in str(old.gap_reason)
    assert verdict([old]) == "deny" and verdict([old], "warn") == "warn"
    # Without envoy_server_uptime (agents) the same rule applies.
    ev = evidence(window, [], facts("old", newest_now=NOW - 1, first_seen=NOW - 20, up=1))
    assert not ev["old"].covered
    # A restart inside the window hides when the first incarnation started.
    ev = evidence(window, [], watched("old", since=NOW - 20, started=NOW - 5, restarts=1))
    assert not ev["old"].covered


def test_seen_for_less_than_one_step() -> None:
    """The subqueries have no point yet: its newest sample is its first."""
    just = facts("just", newest_now=NOW - 0.5, up=1, uptime=99_999, samples=1)
    ev = evidence(series("just", first="4"), [], just)["just"]
    assert ev.state == "fresh" and not ev.covered
    assert "traffic from before Prometheus first saw it (0s ago" in str(ev.gap_reason)
    ev = evidence(series("just", first="0"), [], just)["just"]
    assert ev.covered and not ev.has_traffic


def test_restart_during_a_gap_is_not_covered() -> None:
    window = series("r")
    full = 1 + 69 / INTERVAL
    gap = evidence(window, [], watched("r", restarts=1, samples=full - 4))["r"]
    assert not gap.covered and "restarted during a gap" in str(gap.gap_reason)
    # An agent that could not read the dataplane for a while: a gap too.
    agent = evidence(window, [], watched("r", restarts=1, agent_min_up=0),
                     config=cfg(metrics="passguard"))["r"]
    assert not agent.covered
    # A restart with regular samples is what increase() handles: covered.
    assert evidence(window, [], watched("r", restarts=1, samples=full - 2))["r"].covered
    # A gap without a restart is harmless: counters are cumulative.
    assert evidence(window, [], watched("r", samples=3))["r"].covered


def test_states() -> None:
    rows = (watched("stale", newest_now=NOW - 10, newest=NOW - 10)
            + [r for r in watched("gone") if r[0][FACT] != "newest_now"]
            + watched("down", up=0)
            + watched("fresh"))
    rows = [(lab, str(NOW - 30)) if lab[FACT] == "newest" and lab["dataplane"] == "gone"
            else (lab, v) for lab, v in rows]
    ev = evidence(series("down", increase="2"), [], rows)
    assert ev["stale"].state == "stale" and ev["stale"].unknown
    assert ev["gone"].state == "stale" and ev["gone"].last_success == NOW - 30
    assert ev["down"].state == "failed" and "up == 0" in str(ev["down"].error)
    # What Prometheus saw before the scrapes failed is still evidence (as direct).
    assert ev["down"].connections == 2
    assert ev["fresh"].state == "fresh"
    # forget_after drops what has not been seen for that long.
    ev = evidence([], [], rows, config=cfg(forget_after=20))
    assert "gone" not in ev and "stale" in ev


def test_agent_states() -> None:
    c = cfg(metrics="passguard")
    base = {"newest_now": NOW - 1, "newest": NOW - 1, "first_seen": NOW - 600, "samples": 24,
            "restarts": 0}
    rows = (facts("ok", **base, up=1, agent_success=NOW - 2, agent_min_up=1)
            + facts("behind", **base, up=1, agent_success=NOW - 30)
            + facts("broken", **base, up=0, agent_success=NOW - 30)
            + facts("off", **base))
    latest = [stat("ok", "passguard_passthrough_bytes_total", "10", direction="sent"),
              stat("ok", "passguard_passthrough_bytes_total", "20", direction="received"),
              stat("ok", "passguard_passthrough_connections_total", "7"),
              stat("ok", "passguard_passthrough_active_connections", "1"),
              stat("ok", "passguard_passthrough_blocked_connections_total", "3"),
              stat("ok", "passguard_passthrough_connect_failures_total", "4"),
              stat("ok", "passguard_passthrough_overflow_total", "5")]
    window = [(dp("ok", family="ipv4", **{PART: "increase"}), "2"),
              (dp("ok", family="ipv4", instance="agent-2", **{PART: "increase"}), "2"),
              (dp("ok", family="ipv6", **{PART: "blocked"}), "1")]
    ev = evidence(window, latest, rows, config=c)
    assert ev["ok"].state == "fresh" and ev["ok"].last_success == NOW - 2
    assert ev["ok"].latest == {"ipv4": Counters(7, 1, 10, 20, 4, 5, 3)}
    # Two agents exporting the same dataplane: one counter, not twice.
    assert ev["ok"].window == {"ipv4": Counters(cx_total=2), "ipv6": Counters(no_route=1)}
    assert ev["behind"].state == "stale"
    assert ev["broken"].state == "failed" and "passguard_target_up == 0" in str(
        ev["broken"].error)
    assert ev["off"].state == "offline" and ev["off"].target.offline
    assert not ev["off"].unknown


def test_non_numbers_fail_only_their_dataplane() -> None:
    window = [*series("nan", increase="NaN"), blocked("inf", "+Inf"),
              *series("ok", increase="2")]
    latest = [stat("nan", "envoy_cluster_upstream_cx_active", "3"),
              stat("neg", "envoy_cluster_upstream_cx_total", "-1")]
    rows = watched("nan") + watched("inf") + watched("ok") + watched("neg")
    rows += [(dp("odd", **{FACT: "first_seen"}), "NaN")]
    ev = evidence(window, latest, rows)
    for name, text in [("nan", "increase (envoy_cluster_name=outbound_passthrough_ipv4) is nan"),
                       ("inf", "blocked (envoy_tcp_prefix=outbound_passthrough_ipv4) is inf"),
                       ("neg", "envoy_cluster_upstream_cx_total (envoy_cluster_name="
                               "outbound_passthrough_ipv4) is -1.0"),
                       ("odd", "first_seen is nan")]:
        e = ev[name]
        assert e.state == "failed", name
        assert e.error is not None and text in e.error, e.error
        assert e.window == {} and e.active_connections == 0
    assert ev["ok"].state == "fresh" and ev["ok"].connections == 2
    assert verdict([ev["ok"], ev["nan"]]) == "deny"  # ok has traffic
    assert verdict([ev["nan"]], "warn") == "warn"  # unknown, not traffic


def test_missing_labels() -> None:
    rows = [*watched("ok"), ({FACT: "newest_now", "service": "web"}, "1"),
            ({FACT: "newest", "mesh": "default"}, "1")]
    res = build_evidence(cfg(), [], [], samples(rows), now=NOW, window=WINDOW,
                         threshold=THRESHOLD)
    assert [e.target.dataplane for e in res.evidence] == ["ok"]
    assert res.warnings == ["2 result rows lack the label 'mesh' and 'dataplane': ignored"]
    # Nothing carries them: the label names are wrong, say so.
    with pytest.raises(PrometheusError, match=r"none carries the labels 'kmesh' and 'dataplane' "
                                              r"\(labels.mesh, labels.dataplane\)"):
        build_evidence(cfg(labels=PrometheusLabels(mesh="kmesh")), [], [], samples(rows),
                       now=NOW, window=WINDOW, threshold=THRESHOLD)
    # Rows without a cluster name or a known family are reported, not guessed.
    res = build_evidence(cfg(), samples([(dp("ok", **{PART: "increase"}), "3")]), [],
                         samples(watched("ok")), now=NOW, window=WINDOW, threshold=THRESHOLD)
    assert res.evidence[0].connections == 0
    assert res.warnings == ["rows without a usable family ignored: (no cluster or listener "
                            "label)"]
    res = build_evidence(cfg(metrics="passguard"),
                         samples([(dp("ok", family="ipv5", **{PART: "increase"}), "3")]), [],
                         samples(watched("ok")), now=NOW, window=WINDOW, threshold=THRESHOLD)
    assert res.warnings == ["rows without a usable family ignored: 'ipv5'"]


def test_rows_merge_across_label_variants() -> None:
    """Presence from `up` has no service label; merged with the rows that do."""
    rows = [*watched("a"), ({"mesh": "default", "dataplane": "a", FACT: "up"}, "1"),
            ({"mesh": "default", "dataplane": "a", FACT: "newest"}, str(NOW))]
    window = [*series("a", increase="1"),
              ({"mesh": "default", "dataplane": "a", "service": "web2", PART: "increase",
                "envoy_cluster_name": CLUSTERS["ipv4"]}, "2")]
    ev = evidence(window, [], rows)
    assert ev["a"].target.service == "web"
    assert ev["a"].connections == 3 and ev["a"].last_success == NOW


# --------------------------------------------------------------------------- HTTP


class FakePrometheus:
    """Stands in for Prometheus's ``POST /api/v1/query``: each query text of the
    source maps to a canned answer; ``handler`` replaces the whole answer."""

    def __init__(self) -> None:
        self.answers: dict[str, dict[str, Any]] = {}
        self.handler: Callable[[web.Request], Awaitable[web.StreamResponse]] | None = None
        self.requests: list[tuple[dict[str, str], dict[str, str], str]] = []
        self.server: TestServer | None = None

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.requests.append((form, dict(request.headers), request.path))
        if self.handler is not None:
            return await self.handler(request)
        answer = self.answers.get(form.get("query", ""))
        if answer is None:
            return web.json_response({"status": "error", "errorType": "bad_data",
                                      "error": "unexpected query"}, status=400)
        return web.json_response(answer)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/v1/query", self._serve)
        app.router.add_post("/prefix/api/v1/query", self._serve)
        return app

    def use(self, source: PrometheusSource, window: list[Row], latest: list[Row],
            fact_rows: list[Row]) -> None:
        q = source.queries
        self.answers = {q.window: vector(window), q.latest: vector(latest),
                        q.facts: vector(fact_rows)}

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")


@pytest.fixture
async def prom() -> AsyncIterator[FakePrometheus]:
    fake = FakePrometheus()
    server = TestServer(fake.app(), host="127.0.0.1")
    await server.start_server()
    fake.server = server
    try:
        yield fake
    finally:
        await server.close()


@pytest.fixture
async def make_source() -> AsyncIterator[Callable[..., PrometheusSource]]:
    sources: list[PrometheusSource] = []

    def make(url: str, **kw: Any) -> PrometheusSource:
        s = PrometheusSource(cfg(url=url, scrape_interval=3, timeout=kw.pop("timeout", 2), **kw),
                             WINDOW, 3.0)
        sources.append(s)
        return s

    yield make
    for s in sources:
        await s.close()


BUSY_IDLE: tuple[list[Row], list[Row], list[Row]] = (
    [*series("busy", increase="3"), *series("idle")],
    [], watched("busy") + watched("idle"))


async def test_collect_posts_three_form_queries(prom: FakePrometheus, make_source: Any) -> None:
    src = make_source(prom.url + "/", extra_selector='{cluster="eu-1"}',
                      headers=(("X-Scope-OrgID", "team-a"),))
    prom.use(src, *BUSY_IDLE)
    ev = {e.target.dataplane: e for e in await src.collect(NOW)}
    assert set(ev) == {"busy", "idle"}
    assert ev["busy"].connections == 3 and ev["busy"].target.url == prom.url + "/"
    assert src.last_error is None and src.last_success == NOW and src.warnings == []
    assert len(prom.requests) == 3
    assert {f["query"] for f, _, _ in prom.requests} == set(prom.answers)
    for form, headers, path in prom.requests:
        assert path == "/api/v1/query"
        assert form["time"] == f"{NOW:.3f}" and form["timeout"] == "2000ms"
        assert headers["Accept"] == "application/json"
        assert headers["X-Scope-OrgID"] == "team-a"
        assert "Authorization" not in headers
        assert 'cluster="eu-1"' in form["query"]


async def test_url_with_a_path_prefix(prom: FakePrometheus, make_source: Any) -> None:
    src = make_source(prom.url + "/prefix")
    prom.use(src, *BUSY_IDLE)
    assert len(await src.collect(NOW)) == 2
    assert {p for _, _, p in prom.requests} == {"/prefix/api/v1/query"}


async def test_bearer_token_reread_every_round(prom: FakePrometheus, make_source: Any,
                                               tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("first\n")
    src = make_source(prom.url, token_file=str(token))
    prom.use(src, *BUSY_IDLE)
    await src.collect(NOW)
    token.write_text("second")
    await src.collect(NOW)
    seen = [h["Authorization"] for _, h, _ in prom.requests]
    assert seen == ["Bearer first"] * 3 + ["Bearer second"] * 3
    token.unlink()
    assert [e.state for e in await src.collect(NOW)] == ["failed", "failed"]
    assert src.last_error is not None and f"cannot read token_file {token}" in src.last_error


async def test_basic_auth(prom: FakePrometheus, make_source: Any, tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    src = make_source(prom.url, username="passguard", password_file=str(pw))
    prom.use(src, *BUSY_IDLE)
    await src.collect(NOW)
    # base64("passguard:s3cret")
    assert prom.requests[0][1]["Authorization"] == "Basic cGFzc2d1YXJkOnMzY3JldA=="


async def _status(status: int, body: Any, content_type: str = "application/json"
                  ) -> web.StreamResponse:
    text = body if isinstance(body, str) else json.dumps(body)
    return web.Response(status=status, text=text, content_type=content_type)


@pytest.mark.parametrize(("status", "body", "message"), [
    (400, {"status": "error", "errorType": "bad_data", "error": "1:5: parse error"},
     "HTTP 400: bad_data: 1:5: parse error"),
    (422, {"status": "error", "errorType": "execution",
           "error": "query processing would load too many samples into memory"},
     "HTTP 422: execution: query processing would load too many samples"),
    (503, {"status": "error", "errorType": "timeout", "error": "query timed out"},
     "HTTP 503: timeout: query timed out"),
    (502, "<html>Bad Gateway</html>", "HTTP 502: <html>Bad Gateway</html>"),
    (401, "Unauthorized", "HTTP 401 Unauthorized (it wants credentials: set token_file"),
    (403, "no", "HTTP 403 Forbidden: no"),
    (404, "404 page not found", "HTTP 404: no Prometheus query API there"),
    (200, "<html>login</html>", "the answer is not JSON (starts '<html>login</html>')"),
    (200, {"status": "success", "data": {"resultType": "matrix", "result": []}},
     "data.resultType must be \"vector\", got 'matrix'"),
    (200, {"status": "success", "warnings": ["partial"], "data": {
        "resultType": "vector", "result": []}}, "answered with warnings (partial data): partial"),
])
async def test_http_errors_fail_every_dataplane(prom: FakePrometheus, make_source: Any,
                                                status: int, body: Any, message: str) -> None:
    src = make_source(prom.url)
    prom.use(src, *BUSY_IDLE)
    good = await src.collect(NOW)
    assert verdict(good) == "deny"

    async def answer(_: web.Request) -> web.StreamResponse:
        return await _status(status, body)

    prom.handler = answer
    ev = await src.collect(NOW + 5)
    assert src.last_error is not None and message in src.last_error, src.last_error
    assert src.last_error.startswith(f"POST {prom.url}/api/v1/query (")
    assert src.last_success == NOW and src.consecutive_failures == 1
    assert {e.target.dataplane for e in ev} == {"busy", "idle"}
    for e in ev:
        assert e.state == "failed" and e.unknown and not e.has_traffic
        assert e.error == f"Prometheus: {src.last_error}"
        assert e.last_attempt == NOW + 5 and e.last_success == NOW - 1
    # Unknown → gate.on_insufficient_data, not "traffic".
    assert verdict(ev, "warn") == "warn"
    dec = decide(MESH_OFF, Evidence("default", WINDOW, tuple(ev)), GatePolicy("enforce", "deny"))
    assert dec.verdict == "deny" and "no complete evidence" in dec.reasons[0]
    # Prometheus answers again: back to fresh, error cleared.
    prom.handler = None
    ev = await src.collect(NOW + 2)
    assert src.last_error is None and src.consecutive_failures == 0
    assert {e.state for e in ev} == {"fresh"}


async def test_first_round_failure_knows_no_dataplane(make_source: Any) -> None:
    src = make_source("http://127.0.0.1:9")  # discard port: nothing listens
    assert await src.collect(NOW) == []
    assert src.last_error is not None and "cannot connect" in src.last_error


async def test_unreachable_after_success(prom: FakePrometheus, make_source: Any) -> None:
    src = make_source(prom.url)
    prom.use(src, *BUSY_IDLE)
    assert len(await src.collect(NOW)) == 2
    assert prom.server is not None
    await prom.server.close()
    ev = await src.collect(NOW + 1)
    assert [e.state for e in ev] == ["failed", "failed"]
    assert src.last_error is not None and "cannot connect" in src.last_error


async def test_slow_answer_times_out(prom: FakePrometheus, make_source: Any) -> None:
    src = make_source(prom.url, timeout=0.2)

    async def slow(_: web.Request) -> web.StreamResponse:
        await asyncio.sleep(5)
        return web.json_response(vector([]))

    prom.handler = slow
    assert await src.collect(NOW) == []
    assert src.last_error is not None and "no complete answer within 0.2s" in src.last_error


async def test_answer_size_is_bounded(prom: FakePrometheus, make_source: Any) -> None:
    src = make_source(prom.url, max_response_bytes=1000)
    prom.use(src, [row for i in range(50) for row in series(f"dp-{i}")], [], [])
    await src.collect(NOW)
    assert src.last_error is not None and "over the 1000-byte limit" in src.last_error


async def test_offline_dataplanes_stay_offline_when_prometheus_fails(
        prom: FakePrometheus, make_source: Any) -> None:
    src = make_source(prom.url, metrics="passguard")
    base = {"newest_now": NOW - 1, "newest": NOW - 1, "first_seen": NOW - 600, "samples": 24,
            "restarts": 0}
    prom.use(src, [], [], facts("off", **base) + facts("on", **base, up=1,
                                                       agent_success=NOW - 1))
    assert {e.target.dataplane: e.state for e in await src.collect(NOW)} == {
        "off": "offline", "on": "fresh"}
    prom.answers = {}
    assert {e.target.dataplane: e.state for e in await src.collect(NOW)} == {
        "off": "offline", "on": "failed"}


async def test_unexpected_errors_do_not_escape(prom: FakePrometheus, make_source: Any,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    src = make_source(prom.url)
    prom.use(src, *BUSY_IDLE)

    def boom(*_: Any, **__: Any) -> Any:
        raise RuntimeError("bug")

    monkeypatch.setattr("passguard.sources.prometheus.build_evidence", boom)
    assert await src.collect(NOW) == []
    assert src.last_error == "internal error: RuntimeError: bug"


async def test_tls_ca_file_and_insecure_skip_verify(tmp_path: Path, make_source: Any) -> None:
    """An https Prometheus whose certificate a private CA signed."""
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    fake = FakePrometheus()
    server = TestServer(fake.app(), host="127.0.0.1")
    await server.start_server(ssl=server_ctx)
    fake.server = server
    try:
        url = fake.url
        assert url.startswith("https://")
        # System roots only: the private CA is not trusted.
        plain = make_source(url)
        fake.use(plain, *BUSY_IDLE)
        assert await plain.collect(NOW) == []
        assert f"the TLS certificate of {url.rstrip('/')} is not trusted" \
            in str(plain.last_error)
        trusted = make_source(url, ca_file=str(ca_file))
        fake.use(trusted, *BUSY_IDLE)
        assert len(await trusted.collect(NOW)) == 2 and trusted.last_error is None
        skip = make_source(url, insecure_skip_verify=True)
        fake.use(skip, *BUSY_IDLE)
        assert len(await skip.collect(NOW)) == 2
        # A CA file that goes away is an error of the round, named.
        ca_file.unlink()
        await trusted.collect(NOW)
        assert f"cannot read ca_file {ca_file}" in str(trusted.last_error)
    finally:
        await server.close()


async def test_one_failing_query_ends_the_round(prom: FakePrometheus, make_source: Any) -> None:
    """The facts query is refused at once: the round does not wait for the others."""
    src = make_source(prom.url, timeout=5)
    facts_query = src.queries.facts

    async def answer(request: web.Request) -> web.StreamResponse:
        if (await request.post()).get("query") == facts_query:
            return await _status(422, {"status": "error", "errorType": "execution",
                                       "error": "too many samples"})
        await asyncio.sleep(5)
        return web.json_response(vector([]))

    prom.handler = answer
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert await src.collect(NOW) == []
    assert loop.time() - start < 2
    assert "(facts query): HTTP 422: execution: too many samples" in str(src.last_error)
