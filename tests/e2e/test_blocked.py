"""After the change: connections the proxies refused show up as blocked, in
/v1/meshes, /metrics and `passguard status`, for both ways passthrough ends:
the cluster removed (Mesh passthrough: false, MeshPassthrough None:
`tcp.<prefix>.downstream_cx_no_route`) and a Matched MeshPassthrough with no
chain for the destination (`listener.<addr>.no_filter_chain_match`)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import aiohttp

from passguard import config as config_mod
from passguard.app import Daemon
from passguard.demo.sidecar import EnvoyProcess
from passguard.demo.traffic import EchoUpstream, passthrough_connect
from passguard.envoy.names import DEFAULT_CLUSTERS_PATTERN
from passguard.envoy.promtext import PromStatsParser

from .conftest import EnvoyFactory


async def refused(proxy: EnvoyProcess, up: EchoUpstream, n: int) -> None:
    for _ in range(n):
        with contextlib.suppress(ConnectionError, TimeoutError, OSError):
            await passthrough_connect(proxy.listener_host("ipv4"), proxy.listener_port("ipv4"),
                                      up.host, up.port, io_timeout=2.0)


async def view(d: Daemon, path: str) -> Any:
    async with aiohttp.ClientSession() as s, s.get(
            f"http://127.0.0.1:{d.config.listen.port}{path}") as r:
        return await r.json() if r.content_type == "application/json" else await r.text()


async def test_blocked_connections_are_reported(envoy_factory: EnvoyFactory,
                                                echo_upstream: EchoUpstream,
                                                tmp_path: Path) -> None:
    async with EchoUpstream("127.0.0.1") as other:
        off = await envoy_factory("legacy", passthrough=False)
        matched = await envoy_factory("meshpassthrough",
                                      matches=[("127.0.0.1", echo_upstream.port)])
        raw = {"listen": "127.0.0.1:0", "scrape": {"interval": "1s", "timeout": "900ms"},
               "window": "30s", "state": {"path": "s.db"},
               # The test Envoy's listener port stands in for Kuma's 15001.
               "passthrough": {"outbound_port": matched.listener_port("ipv4")},
               "sources": [{"kind": "envoy", "targets": [
                   {"url": off.admin_url, "labels": {"mesh": "off", "dataplane": "off-1"}},
                   {"url": matched.admin_url,
                    "labels": {"mesh": "matched", "dataplane": "matched-1"}}]}]}
        d = Daemon(config_mod.build(raw, tmp_path))
        await d.start(schedule=False)
        try:
            await d.cycle()
            await refused(off, echo_upstream, 3)
            # Allowed by the match: passes; the other destination finds no chain.
            await passthrough_connect(matched.listener_host("ipv4"),
                                      matched.listener_port("ipv4"),
                                      echo_upstream.host, echo_upstream.port)
            await refused(matched, other, 2)
            await d.cycle()
            meshes = {m["mesh"]: m for m in (await view(d, "/v1/meshes"))["meshes"]}
            assert meshes["off"]["blocked_connections"] == 3
            assert meshes["matched"]["blocked_connections"] == 2
            assert meshes["matched"]["connections"] == 1
            [dp] = (await view(d, "/v1/meshes/off"))["dataplanes"]
            assert dp["blocked_connections"] == 3
            metrics = await view(d, "/metrics")
            assert ('passguard_passthrough_blocked_connections_total{dataplane="off-1",'
                    'family="ipv4",mesh="off",service=""} 3.0') in metrics
            html = await view(d, "/")
            assert "blocked" in html
            # kuma-dp mode reads Envoy's Prometheus output: the same counts.
            port = matched.listener_port("ipv4")
            for proxy, want in ((off, 3), (matched, 2)):
                text = await proxy.admin_get("/stats/prometheus")
                reading = PromStatsParser(DEFAULT_CLUSTERS_PATTERN, port).parse(text)
                assert sum(c.no_route for c in reading.families.values()) == want
        finally:
            await d.stop()
