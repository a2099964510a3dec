"""Broken proxies: every way a sidecar's admin can fail, against one real daemon.

One daemon scrapes a real Envoy with real passthrough traffic (mesh ``busy``),
a good idle proxy (mesh ``idle``) and one target per fault, each alone in its
own mesh whose ``gate.on_insufficient_data`` rotates through deny / warn /
allow. For every fault the daemon must stay healthy, the good targets must
keep their cadence and their verdicts, and the broken target must be
``failed`` with its reason in ``GET /v1/meshes/{mesh}`` and
``passguard_target_up 0`` in ``/metrics``, while the gate answers that mesh's
``on_insufficient_data``.
"""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from passguard.demo.traffic import EchoUpstream, send_traffic
from passguard.scraper import Scraper
from tests.e2e.conftest import EnvoyFactory

from .conftest import DaemonFactory
from .harness import api, check, dataplanes, healthy, metrics, target, timed_cycle, up
from .hostile import HostileProxies

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

TIMEOUT = 0.5  # scrape.timeout of the daemons below
# A cycle costs one timeout (the broken targets are scraped side by side,
# each in its own slot), plus the machine's slack: 2 cores, everything on them.
CYCLE_BOUND = TIMEOUT + 1.5
FALLBACKS = ("deny", "warn", "allow")

# mode → what the operator reads in dataplanes[].error
FAULTS: dict[str, str] = {
    "hang": "no complete answer from /stats within 0.5s",
    "reset": "Connection reset by peer",
    "close": "closed the connection without answering",
    "status503": "HTTP 503 from /stats",
    "redirect": "HTTP 302 from /stats",
    "truncated": "truncated or malformed body",
    "truncated_chunked": "truncated or malformed body",
    "endless": "/stats sent more than 1048576 bytes",
    "endless_chunked": "/stats sent more than 1048576 bytes",
    "huge_announced": "announced 10737418240 bytes, over the 1048576-byte limit",
    "slow": "no complete answer from /stats within 0.5s",
    "slow_headers": "no complete answer from /stats within 0.5s",
    "garbage": "not an Envoy admin /stats answer",
    "not_http": "bad HTTP answer from /stats",
    "bad_content_length": "bad HTTP answer from /stats",
    "html": "not an Envoy admin /stats answer",
    "json": "not an Envoy admin /stats answer",
    "prometheus": "not an Envoy admin /stats answer",
    "empty": "empty body",
    "gzip_bomb": "/stats sent more than 1048576 bytes",
}


def fault_mesh(mode: str) -> str:
    return "f-" + mode.replace("_", "-")


def fallback_of(i: int) -> str:
    return FALLBACKS[i % len(FALLBACKS)]


async def _wait_closed(hostile: HostileProxies, timeout: float = 5.0) -> dict[str, int]:
    """The connections the broken proxies held are closed by passguard, not leaked."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        still = {m: n for m, n in hostile.open.items() if n}
        if not still:
            return {}
        await asyncio.sleep(0.05)
    return {m: n for m, n in hostile.open.items() if n}


async def test_every_broken_proxy_is_unknown_with_its_reason(
    envoy_factory: EnvoyFactory, echo_upstream: EchoUpstream, hostile: HostileProxies,
    make_daemon: DaemonFactory,
) -> None:
    busy = await envoy_factory("legacy")
    targets = [target(busy.admin_url, "busy", "busy-1"),
               target(hostile.url("ok"), "idle", "idle-1")]
    overrides: dict[str, dict[str, str]] = {}
    for i, mode in enumerate(FAULTS):
        targets.append(target(hostile.url(mode), fault_mesh(mode), mode))
        overrides[fault_mesh(mode)] = {"on_insufficient_data": fallback_of(i)}
    d = await make_daemon([{"kind": "envoy", "targets": targets}],
                          gate={"on_insufficient_data": "deny", "meshes": overrides})

    last_success: dict[str, str] = {}
    durations = []
    for n in range(3):
        await send_traffic(busy, echo_upstream, 2)
        durations.append(await timed_cycle(d))
        assert await healthy(d)
        # The good targets were scraped in this very cycle, whatever the others did.
        for mesh, dp in (("busy", "busy-1"), ("idle", "idle-1")):
            view = (await dataplanes(d, mesh))[dp]
            assert view["state"] == "fresh" and view["error"] is None, (n, view["error"])
            assert view["last_scrape"] is not None
            last_success[dp] = view["last_scrape"]
        assert (await check(d, "busy"))["verdict"] == "deny"
        assert (await check(d, "idle"))["verdict"] == "allow"
        if n < 2:
            await asyncio.sleep(1.0)  # RFC 3339 times have whole seconds
    print(f"\n{len(FAULTS)} broken proxies + 2 good ones: cycles took "
          f"{', '.join(f'{x:.3f}' for x in durations)} s (scrape.timeout {TIMEOUT} s)")
    assert max(durations) < CYCLE_BOUND, durations
    busy_view = (await dataplanes(d, "busy"))["busy-1"]
    assert busy_view["connections"] == 6 and busy_view["covered"] is True

    m = await metrics(d)
    assert m[("passguard_scrape_cycle_duration_seconds", frozenset())] < CYCLE_BOUND
    assert up(m, "busy", "busy-1") == 1.0 and up(m, "idle", "idle-1") == 1.0
    problems = []
    for i, (mode, reason) in enumerate(FAULTS.items()):
        mesh = fault_mesh(mode)
        view = (await dataplanes(d, mesh))[mode]
        body = await check(d, mesh)
        decision = body["decisions"][0]
        got = (view["state"], reason in (view["error"] or ""), up(m, mesh, mode),
               body["verdict"], decision["evidence"]["dataplanes"]["unknown"])
        if got != ("failed", True, 0.0, fallback_of(i), 1):
            problems.append(f"{mode}: state={view['state']} error={view['error']!r} "
                            f"up={up(m, mesh, mode)} verdict={body['verdict']} "
                            f"(want {fallback_of(i)})")
        assert any(mode in r for r in decision["reasons"]), decision["reasons"]
    assert not problems, "\n".join(problems)
    assert m[("passguard_mesh_dataplanes", frozenset({("mesh", "f-hang"),
                                                      ("state", "failed")}))] == 1.0
    assert await _wait_closed(hostile) == {}
    assert await healthy(d)


async def test_big_answers_share_one_buffer_budget(
    hostile: HostileProxies, make_daemon: DaemonFactory,
) -> None:
    """Six proxies streaming endless bodies at once (each read ~400 ms before
    it reaches max_response_bytes, 1 MiB) against scrape.max_buffered_bytes
    1 MiB: together they never hold more than the budget beyond their first
    64 KiB each, the reads past it fail naming the key, the good proxy's small
    answer is never refused, and nothing stays charged after the cycle."""
    targets = [target(hostile.url("ok"), "idle", "idle-1")]
    targets += [target(hostile.url("endless_slow"), "f-big", f"big-{i}") for i in range(6)]
    d = await make_daemon([{"kind": "envoy", "targets": targets}],
                          scrape={"interval": "3s", "timeout": "2s",
                                  "max_buffered_bytes": "1MiB", "worker": "inline"})
    # In the daemon's process, where the budget can be watched (a scrape
    # worker runs the same ScrapeClient with the same budget).
    assert isinstance(d.scraper, Scraper)
    client = d.scraper.client
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, client.buffered)
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch())
    try:
        await d.cycle()
    finally:
        watcher.cancel()
    views = await dataplanes(d, "f-big")
    errors = [str(v["error"]) for v in views.values()]
    assert all(v["state"] == "failed" for v in views.values()), views
    over_budget = [e for e in errors if "(scrape.max_buffered_bytes)" in e]
    assert over_budget and all("/stats sent more than 1048576 bytes" in e or e in over_budget
                               for e in errors), errors
    assert 0 < peak <= 1024 * 1024, peak
    assert client.buffered == 0
    assert (await dataplanes(d, "idle"))["idle-1"]["state"] == "fresh"
    print(f"\n6 endless answers at once: {len(over_budget)} cut by the 1 MiB budget, "
          f"peak charged {peak} bytes")
    assert await healthy(d)


async def test_broken_proxies_do_not_slow_the_schedule(
    hostile: HostileProxies, make_daemon: DaemonFactory,
) -> None:
    """The real scheduler: cycles keep a 500 ms interval while the slowest
    targets each take a whole timeout (and the endless ones a megabyte)."""
    targets = [target(hostile.url("ok"), "idle", "idle-1")]
    targets += [target(hostile.url(mode), fault_mesh(mode), mode) for mode in FAULTS]
    d = await make_daemon([{"kind": "envoy", "targets": targets}], schedule=True,
                          scrape={"interval": "500ms", "timeout": "400ms"},
                          destinations={"interval": "1s"})
    seen: list[float] = []
    deadline = time.monotonic() + 4.0
    while time.monotonic() < deadline:
        for dp in d.store.snapshot.dataplanes:
            if dp.target.dataplane == "idle-1" and dp.last_success is not None and (
                    not seen or dp.last_success != seen[-1]):
                seen.append(dp.last_success)
        await asyncio.sleep(0.02)
    gaps = [b - a for a, b in itertools.pairwise(seen)]
    print(f"\nscheduled cycles with {len(FAULTS)} broken proxies: {len(seen)} in 4 s, gaps "
          f"{min(gaps):.3f}-{max(gaps):.3f} s (interval 0.5 s)")
    assert len(seen) >= 6, seen
    # 500 ms apart, give or take the 2-core machine's jitter.
    assert max(gaps) < 0.5 + 0.35, gaps
    assert await healthy(d)


async def test_flapping_proxy_follows_and_keeps_outage_traffic(make_daemon: DaemonFactory) -> None:
    """A proxy whose port goes away and comes back, five times: failed while down
    (connection refused), fresh when up, and connections it opened while it
    could not be scraped are counted when it is back (counters are cumulative)."""
    async with HostileProxies() as flappy, HostileProxies() as steady:
        d = await make_daemon([{"kind": "envoy", "targets": [
            target(flappy.ctl_url("flappy"), "flap", "flappy-1"),
            target(steady.ctl_url("steady"), "steady", "steady-1"),
        ]}], gate={"on_insufficient_data": "warn"})
        await d.cycle()
        assert (await check(d, "flap"))["verdict"] == "allow"
        seen_traffic = False
        for i in range(5):
            await flappy.stop()
            flappy.control("flappy").cx_total += 0 if i < 2 else 3
            await d.cycle()
            view = (await dataplanes(d, "flap"))["flappy-1"]
            assert view["state"] == "failed" and "Connect call failed" in view["error"], view
            body = await check(d, "flap")
            # Unknown and no traffic seen: on_insufficient_data; traffic seen: deny.
            want = "deny" if seen_traffic else "warn"
            assert body["verdict"] == want, body["decisions"][0]["reasons"]
            assert (await dataplanes(d, "steady"))["steady-1"]["state"] == "fresh"
            await flappy.start()  # same port
            await d.cycle()
            view = (await dataplanes(d, "flap"))["flappy-1"]
            assert view["state"] == "fresh", view
            seen_traffic = i >= 2
            body = await check(d, "flap")
            assert body["verdict"] == ("deny" if seen_traffic else "allow"), body
        assert (await dataplanes(d, "flap"))["flappy-1"]["connections"] == 9
        assert await healthy(d)


async def test_real_envoy_restart_counts_both_sides(
    envoy_factory: EnvoyFactory, echo_upstream: EchoUpstream, make_daemon: DaemonFactory,
) -> None:
    """A real Envoy stops (failed, refused), starts again with counters at zero
    on the same admin address: the window keeps what it did before and adds
    what it does after (reset-aware, like Prometheus increase())."""
    proxy = await envoy_factory("unified")
    d = await make_daemon([{"kind": "envoy", "targets": [
        target(proxy.admin_url, "m", "web-1")]}])
    await d.cycle()
    await send_traffic(proxy, echo_upstream, 4)
    await d.cycle()
    await proxy.stop()
    await d.cycle()
    view = (await dataplanes(d, "m"))["web-1"]
    assert view["state"] == "failed" and view["connections"] == 4, view
    assert (await check(d, "m"))["verdict"] == "deny"  # traffic is traffic, scrape or not
    await proxy.start()
    await send_traffic(proxy, echo_upstream, 1)
    await d.cycle()
    view = (await dataplanes(d, "m"))["web-1"]
    assert view == {**view, "state": "fresh", "connections": 5, "covered": True}, view
    m = await metrics(d)
    assert up(m, "m", "web-1") == 1.0


# --------------------------------------------------------------------------- bugs


async def test_a_counter_too_long_for_int_fails_one_target_not_the_cycle(
    hostile: HostileProxies, make_daemon: DaemonFactory,
) -> None:
    d = await make_daemon([{"kind": "envoy", "targets": [
        target(hostile.url("ok"), "idle", "idle-1"),
        target(hostile.url("counter_5000_digits"), "bad", "bad-1")]}])
    await d.cycle()
    assert (await dataplanes(d, "idle"))["idle-1"]["state"] == "fresh"
    assert (await dataplanes(d, "bad"))["bad-1"]["state"] == "failed"


async def test_a_counter_too_large_for_a_float_does_not_break_metrics(
    hostile: HostileProxies, make_daemon: DaemonFactory,
) -> None:
    d = await make_daemon([{"kind": "envoy", "targets": [
        target(hostile.url("ok"), "idle", "idle-1"),
        target(hostile.url("counter_400_digits"), "bad", "bad-1")]}])
    await d.cycle()
    status, _ = await api(d, "GET", "/metrics")
    assert status == 200
    assert (await dataplanes(d, "bad"))["bad-1"]["state"] == "failed"


@pytest.mark.parametrize("mode", ["clusters_5000_digits", "clusters_json_inf"])
async def test_a_bad_clusters_counter_fails_one_target_not_the_inventory(
    mode: str, hostile: HostileProxies, make_daemon: DaemonFactory,
) -> None:
    d = await make_daemon([{"kind": "envoy", "targets": [
        target(hostile.url("ok"), "idle", "idle-1"),
        target(hostile.url(mode), "bad", "bad-1")]}])
    await d.cycle()
    await d.destinations_cycle()
    status, body = await api(d, "GET", "/v1/destinations")
    assert status == 200 and body["destinations"] == []

