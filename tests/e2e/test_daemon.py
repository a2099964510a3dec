"""The daemon against real Envoy sidecars with real passthrough traffic.

Each test starts Envoy processes shaped like Kuma sidecars (passguard.demo.sidecar),
sends real TCP connections through their passthrough listeners to a local echo
upstream, runs a real passguard Daemon in this event loop (cycles driven by the
test so timing is deterministic), and reads its real HTTP API.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from passguard import config as config_mod
from passguard.app import Daemon
from passguard.demo.traffic import EchoUpstream, passthrough_connect, send_traffic

from .conftest import EnvoyFactory

MESH_OFF = b"type: Mesh\nname: %s\nnetworking:\n  outbound:\n    passthrough: false\n"
DaemonFactory = Callable[..., Awaitable[Daemon]]


def target(url: str, mesh: str, name: str, service: str = "web") -> dict[str, Any]:
    return {"url": url, "labels": {"mesh": mesh, "dataplane": name, "service": service}}


@pytest.fixture
async def make_daemon(tmp_path: Path) -> AsyncIterator[DaemonFactory]:
    daemons: list[Daemon] = []

    async def make(
        targets: list[dict[str, Any]],
        window: str = "30s",
        interval: str = "1s",
        state: Path | None = None,
        **extra: Any,
    ) -> Daemon:
        raw = {
            "listen": "127.0.0.1:0",
            "scrape": {"interval": interval, "timeout": "400ms"},
            "window": window,
            "state": {"path": str(state or tmp_path / "state.db")},
            "sources": [{"kind": "envoy", "targets": targets}],
            **extra,
        }
        d = Daemon(config_mod.build(raw, tmp_path))
        daemons.append(d)
        await d.start(schedule=False)
        return d

    yield make
    for d in daemons:
        if d.runner is not None:
            await d.stop()


async def api(d: Daemon, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, f"http://127.0.0.1:{d.config.listen.port}{path}", data=body) as r,
    ):
        if r.content_type == "application/json":
            return r.status, await r.json()
        return r.status, await r.text()


async def check(d: Daemon, mesh: str) -> dict[str, Any]:
    status, body = await api(d, "POST", "/v1/check", MESH_OFF % mesh.encode())
    assert status == 200, body
    return body  # type: ignore[no-any-return]


async def mesh_view(d: Daemon, mesh: str) -> dict[str, Any]:
    status, body = await api(d, "GET", f"/v1/meshes/{mesh}")
    assert status == 200, body
    return body  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("generation", "families"),
    [
        ("0.6", {"legacy"}),
        ("1.1", {"legacy"}),
        ("legacy", {"ipv4", "ipv6"}),
        ("unified", {"ipv4", "ipv6"}),
    ],
)
async def test_traffic_detected_per_generation_and_family(
    generation: str,
    families: set[str],
    envoy_factory: EnvoyFactory,
    echo_upstream: EchoUpstream,
    echo_upstream_v6: EchoUpstream,
    make_daemon: DaemonFactory,
) -> None:
    busy = await envoy_factory(generation)
    idle = await envoy_factory(generation)
    d = await make_daemon(
        [target(busy.admin_url, "busy", "busy-1"), target(idle.admin_url, "idle", "idle-1")]
    )
    await d.cycle()  # first sample: all counters zero → covered from the start
    await send_traffic(busy, echo_upstream, 3)
    if "ipv6" in families:
        await send_traffic(busy, echo_upstream_v6, 2)
    await d.cycle()

    denied = await check(d, "busy")
    assert denied["allowed"] is False and denied["verdict"] == "deny"
    expected = 5 if "ipv6" in families else 3
    assert denied["decisions"][0]["evidence"]["connections"] == expected
    assert f"busy-1 ({expected})" in denied["decisions"][0]["reasons"][0]
    allowed = await check(d, "idle")
    assert allowed["allowed"] is True and allowed["verdict"] == "allow"

    _, text = await api(d, "GET", "/metrics")
    got = {}
    for fam in text_string_to_metric_families(text):
        if fam.name == "passguard_passthrough_connections":
            for s in fam.samples:
                if s.labels["dataplane"] == "busy-1" and s.value:
                    got[s.labels["family"]] = s.value
    want = {"legacy": 3} if families == {"legacy"} else {"ipv4": 3, "ipv6": 2}
    assert got == want


async def test_restart_mid_window_counts_both_sides(
    envoy_factory: EnvoyFactory, echo_upstream: EchoUpstream, make_daemon: DaemonFactory
) -> None:
    proxy = await envoy_factory("legacy")
    d = await make_daemon([target(proxy.admin_url, "m", "web-1")])
    await d.cycle()
    await send_traffic(proxy, echo_upstream, 4)
    await d.cycle()
    await proxy.restart()  # counters back to zero, same admin address
    await send_traffic(proxy, echo_upstream, 2)
    await d.cycle()
    view = await mesh_view(d, "m")
    [dp] = view["dataplanes"]
    assert dp["connections"] == 6 and dp["state"] == "fresh" and dp["covered"] is True


async def test_connection_held_open_from_before_the_window_counts(
    envoy_factory: EnvoyFactory, echo_upstream: EchoUpstream, make_daemon: DaemonFactory
) -> None:
    proxy = await envoy_factory("unified")
    held = await passthrough_connect(
        proxy.listener_host("ipv4"),
        proxy.listener_port("ipv4"),
        echo_upstream.host,
        echo_upstream.port,
        hold=True,
    )
    try:
        # A 2 s window: the connection was opened (and counted) before it.
        d = await make_daemon([target(proxy.admin_url, "m", "db-1")], window="2s", interval="500ms")
        await d.cycle()
        await asyncio.sleep(2.5)
        await d.cycle()
        body = await check(d, "m")
        ev = body["decisions"][0]["evidence"]
        assert body["verdict"] == "deny", body
        assert ev["active_connections"] == 1
        assert "open now: db-1 (1)" in " ".join(body["decisions"][0]["reasons"])
    finally:
        await held.close()


async def test_old_idle_proxy_allowed_at_once_old_traffic_unknown_until_watched(
    envoy_factory: EnvoyFactory, echo_upstream: EchoUpstream, make_daemon: DaemonFactory
) -> None:
    idle = await envoy_factory("legacy")
    used = await envoy_factory("legacy")
    await send_traffic(used, echo_upstream, 2)
    # Both proxies must be older than the 3 s window by their own server.uptime
    # (Envoy refreshes it at each 5 s stats flush).
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        stats = await idle.stats(r"^server\.uptime$")
        stats2 = await used.stats(r"^server\.uptime$")
        if min(stats.get("server.uptime", 0), stats2.get("server.uptime", 0)) >= 5:
            break
        await asyncio.sleep(0.5)
    d = await make_daemon(
        [target(idle.admin_url, "idle", "idle-1"), target(used.admin_url, "used", "used-1")],
        window="3s",
        interval="500ms",
    )
    await d.cycle()
    assert (await check(d, "idle"))["verdict"] == "allow"
    first = await check(d, "used")
    assert first["verdict"] == "deny"
    assert first["decisions"][0]["evidence"]["dataplanes"]["unknown"] == 1
    assert "before passguard watched it" in first["decisions"][0]["reasons"][0]
    # Watched for a whole window with no new traffic: now it is known idle.
    end = time.monotonic() + 3.6
    while time.monotonic() < end:
        await asyncio.sleep(0.5)
        await d.cycle()
    later = await check(d, "used")
    assert later["verdict"] == "allow", later


async def _bad_proxies() -> tuple[web.AppRunner, int]:
    """Fake 'proxies' that lie: they stand in for broken sidecars, not for Envoy."""

    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.Response(text="server.uptime: 1\n")

    async def error(request: web.Request) -> web.Response:
        return web.Response(status=500, text="upstream connect error")

    async def garbage(request: web.Request) -> web.Response:
        return web.Response(text="<html><body>It works!</body></html>")

    app = web.Application()
    app.router.add_get("/hang/stats", hang)
    app.router.add_get("/error/stats", error)
    app.router.add_get("/garbage/stats", garbage)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, port


@pytest.mark.parametrize("fallback", ["deny", "warn", "allow"])
async def test_broken_proxies_are_unknown_and_others_keep_being_scraped(
    fallback: str, envoy_factory: EnvoyFactory, make_daemon: DaemonFactory
) -> None:
    good = await envoy_factory("legacy")
    runner, port = await _bad_proxies()
    try:
        base = f"http://127.0.0.1:{port}"
        d = await make_daemon(
            [
                target(good.admin_url, "m", "good-1"),
                target(f"{base}/hang", "m", "hang-1"),
                target(f"{base}/error", "m", "error-1"),
                target(f"{base}/garbage", "m", "garbage-1"),
                target("http://127.0.0.1:1", "m", "refused-1"),
            ],
            gate={"on_insufficient_data": fallback},
        )
        start = time.monotonic()
        await d.cycle()
        # The hanging proxy costs one timeout (400 ms), not 30 s.
        assert time.monotonic() - start < 5
        view = await mesh_view(d, "m")
        states = {x["dataplane"]: (x["state"], x["error"]) for x in view["dataplanes"]}
        assert states["good-1"] == ("fresh", None)
        assert states["hang-1"][0] == "failed" and "within 0.4s" in states["hang-1"][1]
        assert states["error-1"][0] == "failed" and "HTTP 500" in states["error-1"][1]
        assert states["garbage-1"][0] == "failed" and "not an Envoy" in states["garbage-1"][1]
        assert states["refused-1"][0] == "failed"
        body = await check(d, "m")
        assert body["verdict"] == fallback
        assert body["decisions"][0]["evidence"]["dataplanes"]["unknown"] == 4
        status, _ = await api(d, "GET", "/-/healthy")
        assert status == 200
        _, metrics = await api(d, "GET", "/metrics")
        assert 'passguard_target_up{dataplane="good-1",mesh="m"} 1.0' in metrics
        assert 'passguard_target_up{dataplane="hang-1",mesh="m"} 0.0' in metrics
        assert 'passguard_mesh_dataplanes{mesh="m",state="failed"} 4.0' in metrics
    finally:
        await runner.cleanup()


async def test_unix_socket_admin(
    envoy_factory: EnvoyFactory, echo_upstream: EchoUpstream, make_daemon: DaemonFactory
) -> None:
    proxy = await envoy_factory("unified", admin="unix")
    assert proxy.admin_url.startswith("unix:///")
    d = await make_daemon([target(proxy.admin_url, "m", "sock-1")])
    await d.cycle()
    await send_traffic(proxy, echo_upstream, 1)
    await d.cycle()
    assert (await mesh_view(d, "m"))["dataplanes"][0]["connections"] == 1


async def test_restart_of_passguard_resumes_the_window(
    envoy_factory: EnvoyFactory,
    echo_upstream: EchoUpstream,
    make_daemon: DaemonFactory,
    tmp_path: Path,
) -> None:
    proxy = await envoy_factory("legacy")
    state = tmp_path / "resume.db"
    d1 = await make_daemon([target(proxy.admin_url, "m", "web-1")], state=state)
    await d1.cycle()
    await send_traffic(proxy, echo_upstream, 3)
    await d1.cycle()
    before = await check(d1, "m")
    await d1.stop()
    d2 = await make_daemon([target(proxy.admin_url, "m", "web-1")], state=state)
    status, _ = await api(d2, "GET", "/-/ready")
    assert status == 200, "ready at once: state was restored"
    after = await check(d2, "m")
    assert after["decisions"] == before["decisions"]
    await d2.cycle()
    assert (await check(d2, "m"))["decisions"][0]["evidence"]["connections"] == 3
