"""The daemon with ``sources: [{kind: prometheus}]``: the gate answers from PromQL.

A real Prometheus 2.42 scrapes real Envoy sidecars' ``/stats/prometheus`` with
mesh/dataplane/service labels; passguard scrapes nothing itself. Busy mesh →
deny, idle mesh → allow; Prometheus gone → unknown → on_insufficient_data.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp

from passguard import config as config_mod
from passguard.app import Daemon
from passguard.demo.traffic import EchoUpstream, send_traffic

from .conftest import EnvoyFactory
from .procs import Prometheus, require_binary

WAIT = 60.0


async def check(d: Daemon, mesh: str) -> dict[str, Any]:
    doc = {"type": "Mesh", "name": mesh, "networking": {"outbound": {"passthrough": False}}}
    async with aiohttp.ClientSession() as s, s.post(
            f"http://127.0.0.1:{d.config.listen.port}/v1/check", data=json.dumps(doc)) as r:
        return await r.json()  # type: ignore[no-any-return]


async def metrics(d: Daemon) -> str:
    async with aiohttp.ClientSession() as s, s.get(
            f"http://127.0.0.1:{d.config.listen.port}/metrics") as r:
        return await r.text()


async def test_gate_answers_from_promql(envoy_factory: EnvoyFactory,
                                        echo_upstream: EchoUpstream, tmp_path: Path) -> None:
    binary = require_binary("prometheus")  # fails, never skips, without it
    busy = await envoy_factory("legacy")
    idle = await envoy_factory("unified")
    prom_dir = tmp_path / "prometheus"
    prom_dir.mkdir()
    prom = Prometheus(prom_dir, interval="1s", scrape_configs=[{
        "job_name": "envoy", "metrics_path": "/stats/prometheus",
        "static_configs": [
            {"targets": [e.admin_url.removeprefix("http://")],
             "labels": {"mesh": mesh, "dataplane": f"{mesh}-1", "service": f"{mesh}-svc"}}
            for mesh, e in (("busy", busy), ("idle", idle))]}])
    await asyncio.to_thread(prom.start, binary)
    raw = {"listen": "127.0.0.1:0", "scrape": {"interval": "1s", "timeout": "900ms"},
           "window": "10s", "state": {"path": "s.db"},
           "sources": [{"kind": "prometheus", "url": prom.url, "scrape_interval": "1s",
                        "timeout": "5s"}]}
    d = Daemon(config_mod.build(raw, tmp_path))
    await d.start(schedule=False)
    try:
        # Prometheus first sees both proxies idle, then the busy one gets traffic.
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            await d.cycle()
            if len(d.store.snapshot.dataplanes) == 2:
                break
            await asyncio.sleep(0.5)
        await send_traffic(busy, echo_upstream, 3)
        verdicts: dict[str, str] = {}
        while time.monotonic() < deadline:
            await asyncio.sleep(1)
            await d.cycle()
            verdicts = {m: (await check(d, m))["verdict"] for m in ("busy", "idle")}
            if verdicts == {"busy": "deny", "idle": "allow"}:
                break
        assert verdicts == {"busy": "deny", "idle": "allow"}, (
            verdicts, d.store.snapshot.dataplanes, prom.log_tail(10))
        body = await check(d, "busy")
        assert body["decisions"][0]["evidence"]["connections"] == 3
        text = await metrics(d)
        assert f'passguard_prometheus_source_up{{url="{prom.url}"}} 1.0' in text
        # Its series live in that Prometheus already: not exported again.
        assert 'passguard_passthrough_connections_total{dataplane="busy-1"' not in text
        assert 'passguard_mesh_passthrough_connections_window{mesh="busy"} 3.0' in text

        await asyncio.to_thread(prom.close)  # Prometheus goes away
        await d.cycle()
        after = await check(d, "idle")
        assert after["verdict"] == "deny", after  # unknown → on_insufficient_data
        assert "failed: Prometheus" in after["decisions"][0]["reasons"][0]
        assert f'passguard_prometheus_source_up{{url="{prom.url}"}} 0.0' in await metrics(d)
    finally:
        await d.stop()
        await asyncio.to_thread(prom.close)
