"""The Kuma-shaped Envoy harness against a real Envoy: names, counters, admin API.

Every generation gets real connections through its passthrough listener(s)
to a local echo server, and the numbers are read back from Envoy's admin API
exactly as passguard reads them in production.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
import yaml

from passguard.demo.envoy_config import TcpAdmin, UnixAdmin, build_config
from passguard.demo.kuma_names import (
    GENERATIONS,
    Generation,
    IpFamily,
    listener_stat_prefix,
    passthrough_cluster_name,
    passthrough_stat_name,
    sanitize_metric,
)
from passguard.demo.sidecar import EnvoyProcess
from passguard.demo.traffic import EchoUpstream, passthrough_connect, send_traffic
from tests.kuma_fixtures import cross_check, kuma

from .conftest import EnvoyFactory

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(30)]


ALL_CX_TOTAL = r"^cluster\..*\.upstream_cx_total$"


def _host(address: str, port: int) -> str:
    """How Envoy's ``GET /clusters`` writes a host address."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def clusters_cx_total(clusters_text: str, cluster: str, address: str, port: int) -> tuple[int, int]:
    """(sum of cx_total, number of host lines) for one destination of one cluster.

    ORIGINAL_DST may hold several hosts for one address: connections that
    arrive together, before the new host has reached every worker, each
    create their own.  So the lines are summed, not read one by one."""
    prefix = f"{cluster}::{_host(address, port)}::cx_total::"
    values = [
        int(line[len(prefix) :]) for line in clusters_text.splitlines() if line.startswith(prefix)
    ]
    return sum(values), len(values)


async def wait_for_stat(envoy: EnvoyProcess, name: str, expected: int, within: float = 5.0) -> int:
    """Poll one stat until it reads ``expected`` (absent reads 0); bounded."""
    deadline = time.monotonic() + within
    value = -1
    while time.monotonic() < deadline:
        value = (await envoy.stats("^" + re.escape(name) + "$")).get(name, 0)
        if value == expected:
            return value
        await asyncio.sleep(0.05)
    return value


def _upstreams(
    envoy: EnvoyProcess, v4: EchoUpstream, v6: EchoUpstream
) -> list[tuple[IpFamily, EchoUpstream]]:
    pairs: list[tuple[IpFamily, EchoUpstream]] = [("ipv4", v4), ("ipv6", v6)]
    return [(family, up) for family, up in pairs if family in envoy.families]


async def _start(
    envoy_factory: EnvoyFactory,
    generation: Generation,
    v4: EchoUpstream,
    v6: EchoUpstream,
    **kwargs: Any,
) -> EnvoyProcess:
    if generation == "meshpassthrough":
        kwargs.setdefault("matches", [(v4.host, v4.port), (v6.host, v6.port)])
    return await envoy_factory(generation, **kwargs)


# ----------------------------------------------------------------- names vs Kuma golden files


def _golden(path: str) -> list[dict[str, Any]]:
    data = yaml.safe_load(kuma(path).read_text())
    return [r["resource"] for r in data["resources"]]


def _passthrough_names(resources: list[dict[str, Any]]) -> set[tuple[str, str, str | None]]:
    """(kind, name, stat name) of every ORIGINAL_DST cluster and passthrough listener.

    Keys are camelCase (Kuma's goldens and our config alike)."""
    out: set[tuple[str, str, str | None]] = set()
    for res in resources:
        if res.get("type") == "ORIGINAL_DST":
            out.add(("cluster", res["name"], res.get("altStatName")))
        elif "filterChains" in res:
            for chain in res["filterChains"]:
                for flt in chain["filters"]:
                    cfg = flt["typedConfig"]
                    out.add(("listener", res["name"], cfg["statPrefix"]))
                    out.add(("route", res["name"], cfg["cluster"]))
            out.add(("listener-prefix", res["name"], res.get("statPrefix")))
    return out


@cross_check
@pytest.mark.parametrize(
    ("generation", "golden"),
    [
        ("0.6", "envoy-config/0.6.0-template-proxy-pass_through.golden.yaml"),
        (
            "1.1",
            "envoy-config/1.1.1-transparent-proxy-outbound-passthrough-no-ipfamily.golden.yaml",
        ),
        ("legacy", "envoy-config/v2.14.3-transparent-proxy-legacy.golden.yaml"),
        ("unified", "envoy-config/v2.14.3-transparent-proxy-unified.golden.yaml"),
    ],
)
def test_config_names_match_kuma_golden(generation: Generation, golden: str) -> None:
    resources = _golden(golden)
    if generation == "0.6":
        # The 0.6 golden also holds inbound/static resources; keep the catch-all
        # listener and the passthrough cluster.
        resources = [r for r in resources if r["name"] in ("catch_all", "pass_through")]
    config = build_config(generation, TcpAdmin(9901))
    ours = config["staticResources"]["clusters"] + config["staticResources"]["listeners"]
    assert _passthrough_names(ours) == _passthrough_names(resources)


@cross_check
def test_kuma_meshpassthrough_golden_follows_our_sanitising() -> None:
    for cluster in _golden("meshpassthrough/v2.14.3-basic.clusters.golden.yaml"):
        assert sanitize_metric(cluster["name"]) == cluster["altStatName"]


@pytest.mark.parametrize(("name", "stat"), [
    ("meshpassthrough_tcp_10.0.0.1_443", "meshpassthrough_tcp_10_0_0_1_443"),
    ("meshpassthrough_tls_*.storage.example_443", "meshpassthrough_tls___storage_example_443"),
    ("meshpassthrough_tcp_2001:db8::10_5432", "meshpassthrough_tcp_2001_db8__10_5432"),
    ("meshpassthrough_tcp_198.51.100.0/24_*", "meshpassthrough_tcp_198_51_100_0_24__"),
    ("meshpassthrough_http_ledger-api.example_80", "meshpassthrough_http_ledger-api_example_80"),
])
def test_meshpassthrough_stat_names_follow_kuma_sanitising(name: str, stat: str) -> None:
    """Kuma's SanitizeMetric keeps [A-Za-z0-9_{}=-] and turns the rest into `_`."""
    assert sanitize_metric(name) == stat


def test_meshpassthrough_config_names() -> None:
    config = build_config(
        "meshpassthrough", UnixAdmin("/tmp/a.sock"), matches=[("127.0.0.1", 8080)]
    )
    (cluster,) = [
        c for c in config["staticResources"]["clusters"] if c["name"].startswith("meshpassthrough_")
    ]
    assert cluster["name"] == "meshpassthrough_tcp_127.0.0.1_8080"
    assert cluster["altStatName"] == "meshpassthrough_tcp_127_0_0_1_8080"
    assert config["admin"]["address"] == {"pipe": {"path": "/tmp/a.sock"}}


# ----------------------------------------------------------------- real Envoy, real traffic


@pytest.mark.parametrize("generation", GENERATIONS)
async def test_passthrough_counts_connections(
    envoy_factory: EnvoyFactory,
    echo_upstream: EchoUpstream,
    echo_upstream_v6: EchoUpstream,
    generation: Generation,
) -> None:
    envoy = await _start(envoy_factory, generation, echo_upstream, echo_upstream_v6)
    expected: dict[str, int] = {}
    for family, upstream in _upstreams(envoy, echo_upstream, echo_upstream_v6):
        assert await send_traffic(envoy, upstream, 3) == 3
        assert upstream.connections == 3
        dest = (upstream.host, upstream.port)
        expected[f"cluster.{passthrough_stat_name(generation, family, dest)}.upstream_cx_total"] = 3

    # Exactly the expected stat names count traffic; nothing else does.
    counted = {k: v for k, v in (await envoy.stats(ALL_CX_TOTAL)).items() if v}
    assert counted == expected

    clusters = await envoy.admin_get("/clusters")
    for family, upstream in _upstreams(envoy, echo_upstream, echo_upstream_v6):
        dest = (upstream.host, upstream.port)
        cluster = passthrough_cluster_name(generation, family, dest)
        total, lines = clusters_cx_total(clusters, cluster, upstream.host, upstream.port)
        assert (total, lines >= 1) == (3, True), clusters


@pytest.mark.parametrize("generation", GENERATIONS)
async def test_sequential_connections_show_one_host(
    envoy_factory: EnvoyFactory,
    echo_upstream: EchoUpstream,
    echo_upstream_v6: EchoUpstream,
    generation: Generation,
) -> None:
    """Once Envoy knows the destination as a host, later connections share its
    line: ``outbound:passthrough:ipv4::127.0.0.1:PORT::cx_total::3``.

    The wait after the first connection is needed: a new ORIGINAL_DST host
    reaches the workers through the main thread, and a connection that comes
    before that (easy on a loaded machine) creates a second host for the same
    address, i.e. a second line.  Readers of /clusters must sum the lines."""
    envoy = await _start(envoy_factory, generation, echo_upstream, echo_upstream_v6)
    family: IpFamily = envoy.families[-1]
    upstream = echo_upstream if family == "ipv4" else echo_upstream_v6
    dest = (upstream.host, upstream.port)
    cluster = passthrough_cluster_name(generation, family, dest)

    await send_traffic(envoy, upstream, 1)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        clusters = await envoy.admin_get("/clusters")
        if clusters_cx_total(clusters, cluster, *dest) == (1, 1):
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.1)  # the main thread's update still has to reach the worker
    await send_traffic(envoy, upstream, 2, parallel=1)

    line = f"{cluster}::{_host(*dest)}::cx_total::3"
    assert line in (await envoy.admin_get("/clusters")).splitlines()


@pytest.mark.parametrize("generation", GENERATIONS)
async def test_held_connection_is_active(
    envoy_factory: EnvoyFactory,
    echo_upstream: EchoUpstream,
    echo_upstream_v6: EchoUpstream,
    generation: Generation,
) -> None:
    envoy = await _start(envoy_factory, generation, echo_upstream, echo_upstream_v6)
    family: IpFamily = envoy.families[-1]  # IPv6 where the generation has it
    upstream = echo_upstream if family == "ipv4" else echo_upstream_v6
    dest = (upstream.host, upstream.port)
    active = f"cluster.{passthrough_stat_name(generation, family, dest)}.upstream_cx_active"

    held = await passthrough_connect(
        envoy.listener_host(family), envoy.listener_port(family), *dest, hold=True
    )
    try:
        assert held.echo == b"hello"
        assert await wait_for_stat(envoy, active, 1) == 1
    finally:
        await held.close()
    assert await wait_for_stat(envoy, active, 0) == 0


@pytest.mark.parametrize("generation", GENERATIONS)
async def test_restart_resets_counters(
    envoy_factory: EnvoyFactory,
    echo_upstream: EchoUpstream,
    echo_upstream_v6: EchoUpstream,
    generation: Generation,
) -> None:
    envoy = await _start(envoy_factory, generation, echo_upstream, echo_upstream_v6)
    dest = (echo_upstream.host, echo_upstream.port)
    total = f"cluster.{passthrough_stat_name(generation, 'ipv4', dest)}.upstream_cx_total"
    await send_traffic(envoy, echo_upstream, 3)
    assert (await envoy.stats(ALL_CX_TOTAL))[total] == 3

    url, port, pid = envoy.admin_url, envoy.listener_port("ipv4"), envoy.pid
    await envoy.restart()
    assert (envoy.admin_url, envoy.listener_port("ipv4")) == (url, port)
    assert envoy.pid != pid
    assert (await envoy.stats(ALL_CX_TOTAL)).get(total, 0) == 0

    await send_traffic(envoy, echo_upstream, 1)
    assert (await envoy.stats(ALL_CX_TOTAL))[total] == 1


async def test_unix_socket_admin(envoy_factory: EnvoyFactory, echo_upstream: EchoUpstream) -> None:
    """Kuma 2.14 puts Envoy admin on a Unix socket; a plain aiohttp UnixConnector reads it."""
    envoy = await envoy_factory("legacy", admin="unix")
    assert isinstance(envoy.admin, UnixAdmin)
    assert envoy.admin_url == f"unix://{envoy.admin.path}"
    await send_traffic(envoy, echo_upstream, 3)

    stat_filter = quote(r"^cluster\.outbound_passthrough_ipv4\.upstream_cx_total$", safe="")
    async with (
        aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=envoy.admin.path),
            timeout=aiohttp.ClientTimeout(total=5),
        ) as session,
        session.get("http://localhost/ready") as ready,
    ):
        assert (ready.status, (await ready.text()).strip()) == (200, "LIVE")
        async with session.get(f"http://localhost/stats?filter={stat_filter}") as resp:
            assert resp.status == 200
            assert (
                await resp.text()
            ).strip() == "cluster.outbound_passthrough_ipv4.upstream_cx_total: 3"


async def test_meshpassthrough_unmatched_destination_is_refused(
    envoy_factory: EnvoyFactory, echo_upstream: EchoUpstream
) -> None:
    """A destination no appendMatch allows has no filter chain: Envoy closes the
    connection and counts it in ``listener.<address>.no_filter_chain_match``,
    not in ``tcp.*.downstream_cx_no_route`` nor in ``downstream_cx_total``."""
    async with EchoUpstream("127.0.0.1") as other:
        envoy = await envoy_factory("meshpassthrough", matches=[("127.0.0.1", echo_upstream.port)])
        host, port = envoy.listener_host("ipv4"), envoy.listener_port("ipv4")
        with pytest.raises(ConnectionError):
            await passthrough_connect(host, port, other.host, other.port)
        assert other.connections == 0
        # The allowed destination still passes (filter chain chosen by the
        # address the PROXY header restored).
        assert (
            await passthrough_connect(host, port, echo_upstream.host, echo_upstream.port)
            == b"hello"
        )

    prefix = listener_stat_prefix("meshpassthrough", "ipv4", host, port)
    stats = await envoy.stats(r"no_filter_chain_match|downstream_cx_no_route|downstream_cx_total")
    assert stats[f"listener.{prefix}.no_filter_chain_match"] == 1
    assert stats[f"listener.{prefix}.downstream_cx_total"] == 1  # only the allowed one
    assert {k: v for k, v in stats.items() if k.endswith("downstream_cx_no_route") and v} == {}
    stat = passthrough_stat_name("meshpassthrough", dest=(echo_upstream.host, echo_upstream.port))
    assert (await envoy.stats(ALL_CX_TOTAL))[f"cluster.{stat}.upstream_cx_total"] == 1


@pytest.mark.parametrize("generation", GENERATIONS)
async def test_passthrough_off_counts_no_route(
    envoy_factory: EnvoyFactory,
    echo_upstream: EchoUpstream,
    echo_upstream_v6: EchoUpstream,
    generation: Generation,
) -> None:
    """Mesh ``passthrough: false`` (and MeshPassthrough ``None`` / ``Matched`` with
    no match) keeps the listener but drops its cluster: each connection is
    refused and counted in ``tcp.<prefix>.downstream_cx_no_route``."""
    if generation == "meshpassthrough":
        envoy = await envoy_factory(generation, matches=[])
    else:
        envoy = await envoy_factory(generation, passthrough=False)
    expected: dict[str, int] = {}
    for family, upstream in _upstreams(envoy, echo_upstream, echo_upstream_v6):
        with pytest.raises(ConnectionError):
            await passthrough_connect(
                envoy.listener_host(family),
                envoy.listener_port(family),
                upstream.host,
                upstream.port,
            )
        assert upstream.connections == 0
        base = "legacy" if generation == "meshpassthrough" else generation
        expected[f"tcp.{passthrough_stat_name(base, family)}.downstream_cx_no_route"] = 1
    stats = await envoy.stats(r"downstream_cx_no_route$")
    assert {k: v for k, v in stats.items() if v} == expected
    assert {k: v for k, v in (await envoy.stats(ALL_CX_TOTAL)).items() if v} == {}
