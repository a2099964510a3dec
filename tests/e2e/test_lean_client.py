"""The lean admin client against real Envoy (TCP and Unix admin), the fleet
simulator's big bodies, and the faults suite's broken proxies, each read side
by side with aiohttp's AdminClient, the reference it replaces."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from bench.fleet import start_fleet
from passguard.demo.traffic import EchoUpstream, send_traffic
from passguard.envoy.admin import AdminClient
from passguard.envoy.lean import LeanClient, ScrapeClient
from passguard.envoy.names import DEFAULT_CLUSTERS_PATTERN, stats_filter
from passguard.errors import ScrapeError
from tests.faults.hostile import HostileProxies
from tests.faults.test_proxy_faults import FAULTS

from .conftest import EnvoyFactory

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

MAX_BYTES = 64 * 1024 * 1024
FILTER = {"filter": stats_filter(DEFAULT_CLUSTERS_PATTERN)}
ADMIN_CX = {"filter": r"^http\.admin\.downstream_cx_total$"}
ADMINS = pytest.mark.parametrize("admin", ["tcp", "unix"])


@pytest.fixture
async def clients() -> AsyncIterator[tuple[LeanClient, AdminClient]]:
    lean, ref = LeanClient(MAX_BYTES), AdminClient(8, MAX_BYTES)
    try:
        yield lean, ref
    finally:
        await lean.close()
        await ref.close()


def without_uptime(text: str) -> str:
    """``server.uptime`` ticks between two reads; everything else must not move."""
    return "\n".join(line for line in text.splitlines() if not line.startswith("server.uptime"))


def value(text: str) -> int:
    return int(text.strip().rsplit(":", 1)[1])


@ADMINS
async def test_one_connection_serves_many_gets(envoy_factory: EnvoyFactory, admin: str,
                                               clients: tuple[LeanClient, AdminClient]) -> None:
    """Envoy's own count of admin connections does not move while the lean
    client reads it 30 times: every GET after the first reuses the connection."""
    lean, _ = clients
    envoy = await envoy_factory("legacy", admin=admin)
    before = value(await lean.get(envoy.admin_url, "/stats", ADMIN_CX, 5.0))
    for _ in range(30):
        await lean.get(envoy.admin_url, "/stats", FILTER, 5.0)
    after = value(await lean.get(envoy.admin_url, "/stats", ADMIN_CX, 5.0))
    assert after == before
    assert (lean.opened, lean.retries, lean.idle) == (1, 0, 1)


@ADMINS
async def test_an_envoy_restarted_between_two_gets_is_read_again(
        envoy_factory: EnvoyFactory, admin: str,
        clients: tuple[LeanClient, AdminClient]) -> None:
    lean, _ = clients
    envoy = await envoy_factory("legacy", admin=admin)
    first = await lean.get(envoy.admin_url, "/stats", FILTER, 5.0)
    assert "server.uptime" in first
    for n in range(2):
        await envoy.restart()
        # The pooled connection died with the old Envoy: dropped while idle, or
        # found closed on use and retried once; either way, no error.
        again = await lean.get(envoy.admin_url, "/stats", FILTER, 5.0)
        assert without_uptime(again) == without_uptime(first)
        assert lean.opened == n + 2 and lean.retries <= n + 1


@ADMINS
async def test_the_filtered_stats_and_clusters_read_as_admin_client_reads_them(
        envoy_factory: EnvoyFactory, echo_upstream: EchoUpstream, admin: str,
        clients: tuple[LeanClient, AdminClient]) -> None:
    lean, ref = clients
    envoy = await envoy_factory("legacy", admin=admin)
    await send_traffic(envoy, echo_upstream, 3)
    # Envoy closes the upstream side of the echoed connections a moment after
    # send_traffic returns (upstream_cx_active falls to 0): compare once settled.
    for _ in range(50):
        stats = await lean.get(envoy.admin_url, "/stats", FILTER, 5.0)
        ref_stats = await ref.get(envoy.admin_url, "/stats", FILTER, 5.0)
        if without_uptime(stats) == without_uptime(ref_stats):
            break
        await asyncio.sleep(0.1)
    assert "cluster.outbound_passthrough_ipv4.upstream_cx_total: 3" in stats
    assert without_uptime(stats) == without_uptime(ref_stats)
    # Envoy sends /clusters chunked, its clusters in hash order: same lines.
    clusters = await lean.get(envoy.admin_url, "/clusters", None, 5.0)
    assert "outbound:passthrough:ipv4::" in clusters
    assert sorted(clusters.splitlines()) == sorted(
        (await ref.get(envoy.admin_url, "/clusters", None, 5.0)).splitlines())
    # The whole unfiltered /stats (tens of KiB): the same stat names.
    names = {line.split(":")[0] for line in (await lean.get(envoy.admin_url, "/stats", None,
                                                            5.0)).splitlines()}
    ref_names = {line.split(":")[0] for line in (await ref.get(envoy.admin_url, "/stats",
                                                               None, 5.0)).splitlines()}
    assert names == ref_names and len(names) > 300


async def test_big_unfiltered_bodies_read_as_admin_client_reads_them(
        clients: tuple[LeanClient, AdminClient]) -> None:
    """The fleet simulator with a frozen clock answers the same bytes twice: a
    multi-MiB /clusters and /stats of a 2,000-cluster sidecar, byte for byte."""
    lean, ref = clients
    t0 = 1_700_000_000.0
    async with await start_fleet(2, 2000, clock=lambda: t0) as fleet:
        base = f"{fleet.url}0"
        for path, params in (("/clusters", None), ("/stats", None),
                             ("/clusters", {"format": "json"}), ("/stats", FILTER)):
            got = await lean.get(base, path, params, 30.0)
            assert got == await ref.get(base, path, params, 30.0), (path, params)
        assert len(await lean.get(base, "/clusters", None, 30.0)) > 1_000_000
        assert lean.opened == 1


async def test_the_broken_proxies_of_the_faults_suite_give_the_same_reasons() -> None:
    """Every fault of tests/faults/test_proxy_faults.py, read by ScrapeClient's
    lean path and by AdminClient: both name the reason the suite expects, or
    both hand the body on (the stats parser then refuses it)."""
    async with HostileProxies() as hostile:
        sc = ScrapeClient(64, 1024 * 1024)
        ref = AdminClient(64, 1024 * 1024)
        try:
            modes = list(FAULTS)
            results = await asyncio.gather(
                *(sc.get(hostile.url(m), "/stats", FILTER, 0.5) for m in modes),
                *(ref.get(hostile.url(m), "/stats", FILTER, 0.5) for m in modes),
                return_exceptions=True)
            problems = []
            for mode, got, want in zip(modes, results[:len(modes)], results[len(modes):],
                                       strict=True):
                for who, r in (("lean", got), ("aiohttp", want)):
                    if isinstance(r, ScrapeError):
                        if FAULTS[mode] not in str(r):
                            problems.append(f"{mode} ({who}): {r}")
                    elif isinstance(r, BaseException):
                        problems.append(f"{mode} ({who}): {type(r).__name__}: {r}")
                if isinstance(got, str) != isinstance(want, str):
                    problems.append(f"{mode}: lean {got!r:.60} vs aiohttp {want!r:.60}")
            assert not problems, "\n".join(problems)
            assert sc.lean.opened == len(modes) and sc.buffered == 0
            assert "upstream connect error" not in str(results[modes.index("status503")])
        finally:
            await sc.close()
            await ref.close()
        # Nothing held open on the broken proxies' side.
        for _ in range(100):
            if not any(hostile.open.values()):
                break
            await asyncio.sleep(0.02)
        assert not any(hostile.open.values()), dict(hostile.open)
