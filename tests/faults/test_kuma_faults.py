"""A broken Kuma control plane under a running daemon (source ``kuma``, stats through
the CP's inspect API): down, slow, refusing the token, paginating wrongly,
failing one dataplane's inspect endpoint.

Whatever the CP does, the daemon stays healthy, keeps the dataplanes it knew
(their evidence is never dropped because a listing failed), reports the
problem (``passguard_kuma_discovery_up 0``, each unreachable dataplane
``failed`` with the reason), and the gate answers from the evidence it has:
traffic seen is still ``deny``; a mesh whose dataplanes cannot be read gets
``on_insufficient_data``. When the CP is back, everything is fresh again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from passguard.app import Daemon
from tests.kuma_cp import FakeKumaCP

from .conftest import DaemonFactory
from .harness import check, dataplanes, healthy, metrics, timed_cycle
from .hostile import HostileProxies

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

TOKEN = "cp-token-1"


@pytest.fixture
async def cp(hostile: HostileProxies) -> AsyncIterator[FakeKumaCP]:
    async with FakeKumaCP(token=TOKEN) as server:
        # Behind the inspect API: controlled proxies (counters set by the test).
        server.add_dataplane("busy", "busy-1", admin_url=hostile.ctl_url("busy-1"))
        server.add_dataplane("busy", "busy-2", admin_url=hostile.ctl_url("busy-2"))
        server.add_dataplane("idle", "idle-1", admin_url=hostile.ctl_url("idle-1"))
        server.add_dataplane("idle", "idle-2", admin_url=hostile.ctl_url("idle-2"))
        yield server


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "kuma-token"
    path.write_text(TOKEN + "\n")
    return path


async def _daemon(make_daemon: DaemonFactory, cp: FakeKumaCP, token_file: Path,
                  hostile: HostileProxies, fallback: str = "deny") -> Daemon:
    d = await make_daemon(
        [{"kind": "kuma", "url": cp.url, "token_file": str(token_file),
          "discovery_interval": "1s", "timeout": "500ms", "page_size": 1}],
        gate={"on_insufficient_data": fallback})
    await d.cycle()  # first sample: idle-* read zero, busy-* too
    hostile.control("busy-1", cx_total=7)
    await d.cycle()  # busy-1 opened 7 connections since
    assert (await check(d, "busy"))["verdict"] == "deny"
    assert (await check(d, "idle"))["verdict"] == "allow"
    return d


async def _discovery_up(d: Daemon, cp: FakeKumaCP) -> float:
    return (await metrics(d))[("passguard_kuma_discovery_up", frozenset({("url", cp.url)}))]


async def _states(d: Daemon, mesh: str) -> dict[str, tuple[str, str | None]]:
    return {k: (v["state"], v["error"]) for k, v in (await dataplanes(d, mesh)).items()}


@pytest.mark.parametrize("fallback", ["deny", "allow"])
async def test_cp_down_then_back(cp: FakeKumaCP, token_file: Path, hostile: HostileProxies,
                                 make_daemon: DaemonFactory, fallback: str) -> None:
    d = await _daemon(make_daemon, cp, token_file, hostile, fallback)
    await cp.stop()
    await d.sources.discover()
    assert await _discovery_up(d, cp) == 0.0
    assert "cannot connect to the Kuma CP" in (d.sources.kuma[0].last_error or "")
    assert await timed_cycle(d) < 2.0
    assert await healthy(d)
    # Still known (the list is kept), but unreadable through the CP: failed, with why.
    states = await _states(d, "idle")
    assert set(states) == {"idle-1", "idle-2"}
    assert all(s == "failed" and "Connect call failed" in (e or "") for s, e in states.values())
    assert (await check(d, "idle"))["verdict"] == fallback
    # Traffic seen before the outage is still in the window: deny whatever the fallback.
    busy = await check(d, "busy")
    assert busy["verdict"] == "deny" and busy["decisions"][0]["evidence"]["connections"] == 7

    await cp.start()  # same port
    await d.sources.discover()
    await d.cycle()
    assert await _discovery_up(d, cp) == 1.0
    assert all(s == "fresh" for s, _ in (await _states(d, "idle")).values())
    assert (await check(d, "idle"))["verdict"] == "allow"
    assert (await check(d, "busy"))["verdict"] == "deny"


async def test_slow_cp_is_bounded(cp: FakeKumaCP, token_file: Path, hostile: HostileProxies,
                                  make_daemon: DaemonFactory) -> None:
    d = await _daemon(make_daemon, cp, token_file, hostile)
    cp.slow(".*", 1.5)
    start = time.monotonic()
    await d.sources.discover()
    # One pass is bounded by max(discovery_interval, timeout) = 1 s.
    assert time.monotonic() - start < 1.5
    assert await _discovery_up(d, cp) == 0.0
    assert await timed_cycle(d) < 0.5 + 1.5  # each inspect read costs one scrape.timeout
    states = await _states(d, "idle")
    assert all(s == "failed" and "within 0.5s" in (e or "") for s, e in states.values()), states
    assert (await check(d, "idle"))["verdict"] == "deny"
    assert (await check(d, "busy"))["verdict"] == "deny"
    assert await healthy(d)
    cp.clear_faults()
    await d.sources.discover()
    await d.cycle()
    assert (await check(d, "idle"))["verdict"] == "allow"


@pytest.mark.parametrize("pagination", ["next-self", "total-lies", "empty-next"])
async def test_wrong_pagination_keeps_the_known_dataplanes(
    cp: FakeKumaCP, token_file: Path, hostile: HostileProxies, make_daemon: DaemonFactory,
    pagination: str,
) -> None:
    """A listing that cannot be complete is an error, never a shorter list: no
    dataplane (and none of its evidence) is dropped, scraping goes on."""
    d = await _daemon(make_daemon, cp, token_file, hostile)
    cp.pagination = pagination  # type: ignore[assignment]
    await d.sources.discover()
    assert await _discovery_up(d, cp) == 0.0
    assert d.sources.kuma[0].last_error
    hostile.control("busy-2", cx_total=2)
    await d.cycle()
    assert set(await _states(d, "busy")) == {"busy-1", "busy-2"}
    assert all(s == "fresh" for s, _ in (await _states(d, "idle")).values())
    busy = await check(d, "busy")
    assert busy["verdict"] == "deny" and busy["decisions"][0]["evidence"]["connections"] == 9
    assert (await check(d, "idle"))["verdict"] == "allow"
    cp.pagination = "ok"
    await d.sources.discover()
    assert await _discovery_up(d, cp) == 1.0


async def test_rotated_token_is_named(cp: FakeKumaCP, token_file: Path,
                                      hostile: HostileProxies, make_daemon: DaemonFactory) -> None:
    d = await _daemon(make_daemon, cp, token_file, hostile)
    cp.token = "cp-token-2"  # the CP rotated it; the file still holds the old one
    await d.sources.discover()
    assert "HTTP 401" in (d.sources.kuma[0].last_error or "")
    await d.cycle()
    states = await _states(d, "idle")
    assert all(s == "failed" and "HTTP 401" in (e or "") for s, e in states.values()), states
    assert (await check(d, "idle"))["verdict"] == "deny"
    await asyncio.to_thread(token_file.write_text, "cp-token-2\n")  # re-read at every pass
    await d.sources.discover()
    await d.cycle()
    assert (await check(d, "idle"))["verdict"] == "allow"


async def test_one_dataplanes_inspect_failing(cp: FakeKumaCP, token_file: Path,
                                              hostile: HostileProxies,
                                              make_daemon: DaemonFactory) -> None:
    d = await _daemon(make_daemon, cp, token_file, hostile, "warn")
    cp.fail(r"/dataplanes/idle-2/stats", 500)
    await d.cycle()
    states = await _states(d, "idle")
    assert states["idle-1"] == ("fresh", None)
    assert states["idle-2"][0] == "failed" and "HTTP 500" in (states["idle-2"][1] or "")
    assert (await check(d, "idle"))["verdict"] == "warn"
    # The proxy behind it hangs instead: bounded by scrape.timeout, same verdict.
    cp.clear_faults()
    hostile.control("idle-2", mode="hang")
    assert await timed_cycle(d) < 2.0
    assert "within 0.5s" in ((await _states(d, "idle"))["idle-2"][1] or "")
    assert (await check(d, "idle"))["verdict"] == "warn"
    await hostile.stop()  # cut the CP's own hanging read of the proxy (its timeout is 5 s)
