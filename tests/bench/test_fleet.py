"""The fleet simulator (bench/fleet.py) answers like a real Envoy.

A real Envoy 1.40 with Kuma's legacy passthrough (``EnvoyProcess("legacy")``)
gets three passthrough connections; a fleet target is pinned to the very same
traffic (three closed connections, 5 bytes each way).  Both are then asked the
same questions over HTTP and the answers are compared: line grammar, stat
names per cluster, order, what ``usedonly`` hides, the answer to passguard's
own ``filter``, Prometheus names/labels/order, ``/clusters`` shapes, and the
values passguard's ``StatsParser`` reads.  Envoy and the fleet are queried
once per module (a sync fixture), the assertions then work on the bodies.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from bench.fleet import (
    FLEET_GENERATIONS,
    Destination,
    Fleet,
    FleetGeneration,
    TargetSpec,
    assign_patterns,
    parse_mix,
    prometheus_series,
    start_fleet,
)
from passguard.demo.sidecar import EnvoyProcess
from passguard.demo.traffic import EchoUpstream, send_traffic
from passguard.envoy.names import DEFAULT_CLUSTERS_PATTERN, stats_filter
from passguard.envoy.stats import ZERO, StatsParser

# Compared with a real Envoy under passguard's filter, but with a listener port
# neither side uses: the fleet models Kuma's 0.0.0.0:15001 listener, the test
# Envoy listens on a random port (test_kuma_listener_is_in_the_filter covers it).
FILTER = stats_filter(DEFAULT_CLUSTERS_PATTERN, outbound_port=1)
Q = quote(FILTER, safe="")
CLOCK = 1_800_000_000.0  # the fleet's frozen "now"
BUSY = 0  # the fleet target pinned to the real Envoy's traffic
TARGETS, CLUSTERS = 20, 50
PATHS = (
    "/stats",
    "/stats?usedonly",
    f"/stats?filter={Q}",
    f"/stats?filter={Q}&usedonly",
    "/stats/prometheus",
    "/stats/prometheus?usedonly",
    f"/stats/prometheus?filter={Q}",
    "/clusters",
    "/clusters?format=json",
    "/ready",
)
# Only in the test harness's Envoy: its passthrough listeners read a PROXY
# header (see passguard/demo/sidecar.py), Kuma's use the original destination.
HARNESS_ONLY = re.compile(r"^(proxy_proto\.|downstream_cx_proxy_proto_error)|envoy_proxy_proto_|"
                          r"envoy_downstream_cx_proxy_proto_error")

# `name: value` where value is an integer, "No recorded values" or quantiles.
_NUM = r"(?:nan|[0-9.e+-]+)"
STATS_LINE = re.compile(
    rf"^[A-Za-z0-9_.\[\]-]+: (?:\d+|No recorded values|P[0-9.]+\({_NUM},{_NUM}\)"
    rf"(?: P[0-9.]+\({_NUM},{_NUM}\))*)$")
PROM_LINE = re.compile(
    r'^(?:# TYPE envoy_\w+ (?:counter|gauge|histogram)'
    r'|envoy_\w+\{(?:\w+="[^"]*"(?:,\w+="[^"]*")*)?\} [0-9.e+-]+)$')
HOST_LINE = re.compile(r"^(?P<ep>\[[0-9a-f:]+\]:\d+|[0-9.]+:\d+)::(?P<field>\w+)::(?P<value>.*)$")


@dataclass
class Captured:
    real: dict[str, str]
    fleet: dict[str, str]  # PATHS of target BUSY
    filtered: dict[int, tuple[str, str, float]]  # n → (filtered, filtered&usedonly, time)
    headers: dict[str, str]
    real_listener: str  # listener.<address>. of the real outbound IPv4 passthrough
    fleet_obj: Fleet
    big: dict[str, int] = field(default_factory=dict)


def busy_spec() -> TargetSpec:
    """The real Envoy's traffic: 3 connections to one IPv4 destination, closed,
    5 bytes each way (send_traffic's b"hello" and its echo)."""
    return TargetSpec("steady", boot=CLOCK - 3.5, tx_per_cx=5, rx_per_cx=5,
                      destinations=(Destination(0, "93.184.216.34", 443, rate=1.0),))


async def _capture() -> Captured:
    async with EnvoyProcess("legacy") as envoy, EchoUpstream("127.0.0.1") as upstream:
        await send_traffic(envoy, upstream, 3)
        # The proxy sees the upstream close a moment after the client does.
        for _ in range(100):
            if (await envoy.stats(FILTER)).get(
                    "cluster.outbound_passthrough_ipv4.upstream_cx_active") == 0:
                break
            await asyncio.sleep(0.05)
        real = {p: await envoy.admin_get(p) for p in PATHS}
        real_listener = f"listener.127.0.0.1_{envoy.listener_port('ipv4')}."
    # workers=1: the test Envoy runs one worker thread, so names match exactly.
    fleet = await start_fleet(TARGETS, CLUSTERS, seed=7, clock=lambda: CLOCK, workers=1,
                              overrides={BUSY: busy_spec()})
    big = await start_fleet(2, 500, clock=lambda: CLOCK)
    try:
        async with aiohttp.ClientSession() as session:
            got: dict[str, str] = {}
            headers: dict[str, str] = {}
            for p in PATHS:
                async with session.get(fleet.base_url(BUSY) + p) as resp:
                    assert resp.status == 200, (p, await resp.text())
                    got[p] = await resp.text()
                    headers = dict(resp.headers)
            filtered: dict[int, tuple[str, str, float]] = {}
            for n in range(TARGETS):
                async with session.get(f"{fleet.base_url(n)}/stats?filter={Q}") as resp:
                    plain, t = await resp.text(), float(resp.headers["x-fleet-time"])
                async with session.get(f"{fleet.base_url(n)}/stats?filter={Q}&usedonly") as r2:
                    filtered[n] = (plain, await r2.text(), t)
            sizes = {}
            for p in ("/stats", f"/stats?filter={Q}"):
                async with session.get(big.base_url(1) + p) as resp:
                    sizes[p] = len(await resp.read())
    finally:
        await fleet.stop()
        await big.stop()
    return Captured(real, got, filtered, headers, real_listener, fleet, sizes)


@pytest.fixture(scope="module")
def cap() -> Captured:
    # Sync and module-scoped: one Envoy and one fleet for every comparison.
    return asyncio.run(_capture())


def names(body: str) -> list[str]:
    return [line.split(": ", 1)[0] for line in body.splitlines()]


def scalar_names(body: str) -> list[str]:
    """Counters and gauges only (histograms are flushed by Envoy every 5 s, so a
    fresh real Envoy shows none recorded: they are compared separately)."""
    return [n for n, v in (line.split(": ", 1) for line in body.splitlines())
            if v.isdigit()]


def suffixes(all_names: Iterable[str], prefix: str) -> set[str]:
    return {n[len(prefix):] for n in all_names if n.startswith(prefix)}


def globals_of(all_names: Iterable[str]) -> set[str]:
    """Names outside clusters, tcp proxies and passthrough listeners."""
    return {n for n in all_names
            if not re.match(r"cluster\.|tcp\.|listener\.(?!admin\.)", n)
            and not HARNESS_ONLY.search(n)}


# --------------------------------------------------------------------------- /stats


@pytest.mark.e2e
def test_stats_lines_have_envoys_grammar_and_order(cap: Captured) -> None:
    for label, bodies in (("real", cap.real), ("fleet", cap.fleet)):
        for p in PATHS[:4]:
            lines = bodies[p].splitlines()
            bad = [line for line in lines if not STATS_LINE.match(line)]
            assert not bad, (label, p, bad[:3])
            # Counters and gauges sorted bytewise, then histograms sorted.
            scalars = [n.encode() for n, v in (x.split(": ", 1) for x in lines)
                       if v.isdigit()]
            hists = [n.encode() for n, v in (x.split(": ", 1) for x in lines)
                     if not v.isdigit()]
            assert scalars == sorted(scalars), (label, p)
            assert hists == sorted(hists), (label, p)
            assert names(bodies[p]) == [n.decode() for n in scalars + hists], (label, p)


@pytest.mark.e2e
def test_same_stat_names_as_envoy(cap: Captured) -> None:
    real, fleet = names(cap.real["/stats"]), names(cap.fleet["/stats"])
    per_cluster = suffixes(real, "cluster.outbound_passthrough_ipv4.")
    assert len(per_cluster) == 107
    # Every cluster of the fleet (passthrough, inbound, system, 50 services)
    # carries exactly the stats a real Envoy prints for a cluster.
    clusters = {n.split(".")[1] for n in fleet if n.startswith("cluster.")}
    assert len(clusters) == CLUSTERS + 4 + 4
    for c in clusters:
        assert suffixes(fleet, f"cluster.{c}.") == per_cluster, c
    for prefix in ("tcp.outbound_passthrough_ipv4.", "tcp.inbound_passthrough_ipv6.",
                   "cluster.inbound_passthrough_ipv4."):
        assert suffixes(fleet, prefix) == suffixes(real, prefix), prefix
    assert suffixes(fleet, "listener.0.0.0.0_15001.") == suffixes(real, cap.real_listener)
    assert suffixes(fleet, "listener.[__]_15001.") == suffixes(real, cap.real_listener)
    assert globals_of(fleet) == globals_of(real)


@pytest.mark.e2e
def test_usedonly_hides_what_envoy_hides(cap: Captured) -> None:
    real = scalar_names(cap.real["/stats?usedonly"])
    fleet = scalar_names(cap.fleet["/stats?usedonly"])
    for prefix in ("cluster.outbound_passthrough_ipv4.",  # 3 closed connections
                   "cluster.outbound_passthrough_ipv6.",  # idle: only warming_state
                   "cluster.inbound_passthrough_ipv4.",
                   "tcp.outbound_passthrough_ipv4.", "tcp.outbound_passthrough_ipv6."):
        assert suffixes(fleet, prefix) == suffixes(real, prefix), prefix
    assert suffixes(fleet, "listener.0.0.0.0_15001.") == suffixes(real, cap.real_listener)


@pytest.mark.e2e
def test_passguard_filter_gets_the_same_answer(cap: Captured) -> None:
    for p in (f"/stats?filter={Q}", f"/stats?filter={Q}&usedonly"):
        assert names(cap.fleet[p]) == names(cap.real[p]), p
    assert len(names(cap.real[f"/stats?filter={Q}"])) == 15
    parser = StatsParser(DEFAULT_CLUSTERS_PATTERN)
    real = parser.parse(cap.real[f"/stats?filter={Q}"])
    fleet = parser.parse(cap.fleet[f"/stats?filter={Q}"])
    # Same traffic, same counters (uptime differs: the real one just started).
    assert real.families == fleet.families
    assert fleet.families["ipv4"].cx_total == 3
    assert fleet == cap.fleet_obj.expected(BUSY, CLOCK).reading()
    assert float(cap.headers["x-fleet-time"]) == CLOCK


@pytest.mark.e2e
def test_every_target_reads_as_expected(cap: Captured) -> None:
    parser = StatsParser(DEFAULT_CLUSTERS_PATTERN)
    seen_traffic = 0
    for n, (plain, usedonly, t) in cap.filtered.items():
        want = cap.fleet_obj.expected(n, t)
        assert parser.parse(plain) == want.reading(), n
        got = parser.parse(usedonly)
        # usedonly: a family with no traffic is absent, which reads as zero.
        assert got.uptime == want.uptime
        for fam, counters in want.families.items():
            assert got.families.get(fam, ZERO) == counters, (n, fam)
        assert len(plain.encode()) < 1000  # a few hundred bytes per target
        seen_traffic += any(c.cx_total for c in want.clusters)
    assert seen_traffic >= 5  # steady, bursty, restarting and the pinned one


@pytest.mark.e2e
def test_histograms_print_like_envoy(cap: Captured) -> None:
    recorded = "cluster.outbound_passthrough_ipv4.upstream_cx_connect_ms: P0(nan,2.05) P25("
    assert any(line.startswith(recorded) for line in cap.fleet["/stats"].splitlines())
    # Never recorded: "No recorded values", and hidden under usedonly, as in Envoy.
    line = "cluster.outbound_passthrough_ipv6.upstream_cx_connect_ms: No recorded values"
    assert line in cap.real["/stats"].splitlines()
    assert line in cap.fleet["/stats"].splitlines()
    assert "outbound_passthrough_ipv6.upstream_cx_connect_ms" not in cap.fleet["/stats?usedonly"]


def normalized(body: str) -> set[str]:
    """Stat names with listener addresses (the harness binds 127.0.0.1/::1 on free
    ports, Kuma 0.0.0.0/:: on 15001/15006) and harness-only stats taken out."""
    out = set()
    for n in names(body):
        n = re.sub(r"listener\.(?:127\.0\.0\.1|0\.0\.0\.0)_\d+\.", "listener.V4.", n)
        out.add(re.sub(r"listener\.\[__1?\]_\d+\.", "listener.V6.", n))
    return {n for n in out if not HARNESS_ONLY.search(n)}


@pytest.mark.e2e
@pytest.mark.parametrize("generation", FLEET_GENERATIONS)
async def test_every_generation_matches_a_real_envoy(generation: FleetGeneration) -> None:
    """Names (passthrough clusters, tcp prefixes, listeners), Prometheus
    families and passguard's filtered answer, per Kuma naming generation."""
    async with EnvoyProcess(generation) as envoy:
        real = {p: await envoy.admin_get(p) for p in
                ("/stats", f"/stats?filter={Q}", "/stats/prometheus")}
    fleet = await start_fleet(1, 3, generation=generation, clock=lambda: CLOCK, workers=1,
                              overrides={0: TargetSpec("idle", boot=CLOCK - 5)})
    try:
        async with aiohttp.ClientSession() as s:
            got = {}
            for p in real:
                async with s.get(fleet.base_url(0) + p) as resp:
                    got[p] = await resp.text()
    finally:
        await fleet.stop()
    services = re.compile(r"^cluster\.(?:ads_cluster|access_log_sink|kuma_envoy_admin|"
                          r"localhost_8080|[a-z]+-\d{4}_team-\d+_svc_\d+)\.")
    assert {n for n in normalized(got["/stats"]) if not services.match(n)} == \
        normalized(real["/stats"])
    real_types = [t for t in prom_types(real["/stats/prometheus"]) if not HARNESS_ONLY.search(t[0])]
    assert prom_types(got["/stats/prometheus"]) == real_types
    p = f"/stats?filter={Q}"
    assert names(got[p]) == names(real[p])
    parser = StatsParser(DEFAULT_CLUSTERS_PATTERN)
    assert parser.parse(got[p]).families == parser.parse(real[p]).families


# --------------------------------------------------------------------------- Prometheus


def prom_types(body: str) -> list[tuple[str, str]]:
    return [(p[2], p[3]) for p in (line.split() for line in body.splitlines())
            if p[0] == "#"]


def label_keys(body: str) -> dict[str, set[tuple[str, ...]]]:
    out: dict[str, set[tuple[str, ...]]] = {}
    for line in body.splitlines():
        if not line.startswith("#"):
            metric, labels = line.split("{", 1)
            keys = tuple(re.findall(r'(\w+)="', labels.rsplit("}", 1)[0]))
            out.setdefault(metric, set()).add(keys)
    return out


@pytest.mark.e2e
def test_prometheus_like_envoy(cap: Captured) -> None:
    real, fleet = cap.real["/stats/prometheus"], cap.fleet["/stats/prometheus"]
    for label, body in (("real", real), ("fleet", fleet),
                        ("fleet usedonly", cap.fleet["/stats/prometheus?usedonly"])):
        bad = [line for line in body.splitlines() if not PROM_LINE.match(line)]
        assert not bad, (label, bad[:3])
    real_types = [t for t in prom_types(real) if not HARNESS_ONLY.search(t[0])]
    # Same metric families, same types, in the same order.
    assert prom_types(fleet) == real_types
    real_keys = {m: k for m, k in label_keys(real).items() if not HARNESS_ONLY.search(m)}
    assert label_keys(fleet) == real_keys
    # passguard's filter: the same series, line for line (values aside).
    p = f"/stats/prometheus?filter={Q}"
    assert [line.rsplit(" ", 1)[0] for line in cap.fleet[p].splitlines()] == \
           [line.rsplit(" ", 1)[0] for line in cap.real[p].splitlines()]
    want = cap.fleet_obj.expected(BUSY, CLOCK).counters["outbound_passthrough_ipv4"]
    assert (f'envoy_cluster_upstream_cx_total{{envoy_cluster_name="outbound_passthrough_ipv4"}}'
            f" {want.cx_total}") in fleet.splitlines()
    used = cap.fleet["/stats/prometheus?usedonly"]
    assert 'envoy_cluster_upstream_cx_total{envoy_cluster_name="outbound_passthrough_ipv4"}' \
        in used
    assert 'envoy_cluster_upstream_cx_total{envoy_cluster_name="outbound_passthrough_ipv6"}' \
        not in used


def test_prometheus_names_follow_envoys_tag_extraction() -> None:
    # Shapes only the unified generation and multi-worker sidecars have
    # (checked against Envoy 1.40 by hand: /stats/prometheus of a unified sidecar).
    assert prometheus_series(
        "listener.self_transparentproxy_passthrough_outbound_ipv4.worker_1.downstream_cx_total"
    ) == ("listener.worker_downstream_cx_total", "envoy_listener_worker_downstream_cx_total",
          'envoy_worker_id="1",'
          'envoy_listener_address="self_transparentproxy_passthrough_outbound_ipv4"')
    assert prometheus_series("listener.admin.http.admin.downstream_rq_2xx")[1:] == (
        "envoy_listener_admin_http_downstream_rq_xx",
        'envoy_response_code_class="2",envoy_http_conn_manager_prefix="admin"')
    assert prometheus_series("server.uptime")[1:] == ("envoy_server_uptime", "")


# --------------------------------------------------------------------------- /clusters


def cluster_shape(body: str, cluster: str) -> tuple[list[str], list[list[str]], dict[str, int]]:
    """(cluster-level fields, per-host field lists, cx_total per address)."""
    top: list[str] = []
    hosts: list[list[str]] = []
    totals: dict[str, int] = {}
    for line in body.splitlines():
        if not line.startswith(cluster + "::"):
            continue
        rest = line[len(cluster) + 2:]
        m = HOST_LINE.match(rest)
        if m is None:
            top.append(rest.rsplit("::", 1)[0])
            continue
        # A host's block starts with cx_active; one address may have several
        # blocks (Envoy 1.40 creates racing ORIGINAL_DST hosts).
        if m["field"] == "cx_active":
            hosts.append([])
        hosts[-1].append(m["field"])
        if m["field"] == "cx_total":
            totals[m["ep"]] = totals.get(m["ep"], 0) + int(m["value"])
    return top, hosts, totals


@pytest.mark.e2e
def test_clusters_like_envoy(cap: Captured) -> None:
    name = "outbound:passthrough:ipv4"
    real_top, real_hosts, real_totals = cluster_shape(cap.real["/clusters"], name)
    top, hosts, totals = cluster_shape(cap.fleet["/clusters"], name)
    assert top == real_top
    assert real_hosts and hosts
    assert all(h == real_hosts[0] for h in real_hosts + hosts)
    assert sum(real_totals.values()) == 3  # one destination, maybe on several host lines
    assert totals == cap.fleet_obj.expected(BUSY, CLOCK).destinations == {"93.184.216.34:443": 3}
    # Every line is name::...::value; the ORIGINAL_DST hostname quirk is kept.
    assert f"{name}::93.184.216.34:443::hostname::{name}93.184.216.34:443" in cap.fleet["/clusters"]

    def shape(doc: str) -> tuple[list[str], list[str], list[str]]:
        status = next(c for c in json.loads(doc)["cluster_statuses"] if c["name"] == name)
        host: dict[str, Any] = status["host_statuses"][0]
        return list(status), list(host), [s["name"] for s in host["stats"]]

    assert shape(cap.fleet["/clusters?format=json"]) == shape(cap.real["/clusters?format=json"])
    assert cap.fleet["/ready"] == cap.real["/ready"] == "LIVE\n"


# --------------------------------------------------------------------------- sizes and patterns


@pytest.mark.e2e
def test_filtered_is_tiny_unfiltered_is_big(cap: Captured) -> None:
    filtered, full = cap.big[f"/stats?filter={Q}"], cap.big["/stats"]
    assert filtered < 1000
    assert full > 1_000_000  # 500 clusters x 107 lines: megabytes, like a real sidecar
    assert full > 1000 * filtered


def test_pattern_mix_is_exact_and_deterministic() -> None:
    mix = parse_mix("idle=0.7,steady=0.2,bursty=0.05,restarting=0.05")
    got = assign_patterns(20, mix, seed=1)
    assert sorted(got) == sorted(["idle"] * 14 + ["steady"] * 4 + ["bursty", "restarting"])
    assert got == assign_patterns(20, mix, seed=1) != assign_patterns(20, mix, seed=2)
    with pytest.raises(ValueError):
        parse_mix("idle=1,sleepy=1")


async def test_patterns_behave_over_time() -> None:
    now = [CLOCK]
    fleet = await start_fleet(TARGETS, 10, seed=3, clock=lambda: now[0])
    parser = StatsParser(DEFAULT_CLUSTERS_PATTERN)
    try:
        by = {p: [n for n in range(TARGETS) if fleet.pattern(n) == p]
              for p in ("idle", "steady", "bursty", "restarting")}
        assert all(by.values()), by

        async def scrape(n: int, t: float) -> tuple[float, int]:
            now[0] = t
            async with aiohttp.ClientSession() as s, \
                    s.get(f"{fleet.base_url(n)}/stats?filter={Q}") as resp:
                reading = parser.parse(await resp.text())
            assert reading == fleet.expected(n, t).reading()
            return reading.uptime or 0.0, sum(c.cx_total for c in reading.families.values())

        for n in by["idle"]:
            for t in (CLOCK, CLOCK + 3600, CLOCK + 86400):
                assert (await scrape(n, t))[1] == 0
                assert fleet.expected(n, t).destinations == {}

        for n in by["steady"]:
            counts = [(await scrape(n, CLOCK + dt))[1] for dt in (0, 600, 3600)]
            assert counts[0] < counts[1] < counts[2]

        # Restarting: just before a restart and just after, counters and uptime drop.
        n = by["restarting"][0]
        spec = fleet.specs[n]
        boundary = spec.boot + spec.period * (1 + (CLOCK - spec.boot) // spec.period)
        up1, before = await scrape(n, boundary - 1)
        up2, after = await scrape(n, boundary + 1)
        assert before > after and up2 < up1 and up2 <= 1
        assert before > 0

        # Bursty: flat between bursts, growing inside one.
        n = by["bursty"][0]
        spec = fleet.specs[n]
        start = spec.boot + spec.period * (1 + (CLOCK - spec.boot) // spec.period)
        quiet = [(await scrape(n, start - dt))[1] for dt in (60, 30, 1)]
        assert quiet[0] == quiet[1] == quiet[2]
        assert (await scrape(n, start + spec.burst - 0.5))[1] > quiet[2]
    finally:
        await fleet.stop()


async def test_errors_like_envoy() -> None:
    fleet = await start_fleet(2, 5, clock=lambda: CLOCK)
    try:
        async with aiohttp.ClientSession() as s:
            for path, status, text in (
                ("/stats?filter=(", 400, "Invalid re2 regex"),
                ("/stats?type=Bogus", 400, "invalid &type= param"),
                ("/nope", 404, "invalid path"),
            ):
                async with s.get(fleet.base_url(1) + path) as resp:
                    assert resp.status == status
                    assert text in await resp.text()
            async with s.get(f"{fleet.url}2/stats") as resp:
                assert resp.status == 404  # no such target
            # Envoy treats the presence of usedonly as true, whatever its value.
            async with s.get(fleet.base_url(0) + "/stats?usedonly=false") as r1, \
                    s.get(fleet.base_url(0) + "/stats?usedonly") as r2:
                assert await r1.read() == await r2.read()
            async with s.get(fleet.base_url(0) + "/stats?type=Gauges&filter=uptime") as resp:
                assert (await resp.text()).startswith("server.uptime: ")
    finally:
        await fleet.stop()


@pytest.mark.e2e
def test_kuma_listener_is_in_the_filter(cap: Captured) -> None:
    """passguard's real filter (port 15001) also returns the passthrough
    listener's refusals, which a Matched MeshPassthrough produces."""
    wanted = re.compile(stats_filter(DEFAULT_CLUSTERS_PATTERN))
    matched = [n for n in names(cap.fleet["/stats"]) if wanted.match(n)]
    assert "listener.0.0.0.0_15001.no_filter_chain_match" in matched
    # The inbound passthrough listener (15006) is not passthrough to the outside.
    assert not wanted.match("listener.0.0.0.0_15006.no_filter_chain_match")
