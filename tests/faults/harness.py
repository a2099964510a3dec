"""An in-process passguard Daemon for fault tests, and small readers of its HTTP API.

Cycles are driven by the test (``await d.cycle()``), so every assertion is
about a known number of scrapes, not about timing luck.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from passguard import config as config_mod
from passguard.app import Daemon


def target(url: str, mesh: str, name: str, service: str = "web") -> dict[str, Any]:
    return {"url": url, "labels": {"mesh": mesh, "dataplane": name, "service": service}}


def mesh_off(mesh: str) -> bytes:
    return (f"type: Mesh\nname: {mesh}\nnetworking:\n  outbound:\n"
            f"    passthrough: false\n").encode()


async def new_daemon(tmp: Path, sources: list[dict[str, Any]], schedule: bool = False,
                     **extra: Any) -> Daemon:
    raw: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "scrape": {"interval": "1s", "timeout": "500ms", "max_response_bytes": "1MiB"},
        "window": "30s",
        "state": {"path": str(tmp / "state.db")},
        "sources": sources,
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    d = Daemon(config_mod.build(raw, tmp))
    await d.start(schedule=schedule)
    return d


async def api(d: Daemon, method: str, path: str, body: bytes | None = None,
              timeout: float = 10.0) -> tuple[int, Any]:
    url = f"http://127.0.0.1:{d.config.listen.port}{path}"
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s,
        s.request(method, url, data=body) as r,
    ):
        if r.content_type == "application/json":
            return r.status, await r.json()
        return r.status, await r.text()


async def check(d: Daemon, mesh: str) -> dict[str, Any]:
    status, body = await api(d, "POST", "/v1/check", mesh_off(mesh))
    assert status == 200, body
    return body  # type: ignore[no-any-return]


async def dataplanes(d: Daemon, mesh: str) -> dict[str, dict[str, Any]]:
    status, body = await api(d, "GET", f"/v1/meshes/{mesh}")
    assert status == 200, body
    return {x["dataplane"]: x for x in body["dataplanes"]}


async def metrics(d: Daemon) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """``{(sample name, labels): value}`` of ``GET /metrics`` (must answer 200)."""
    status, text = await api(d, "GET", "/metrics")
    assert status == 200, text[:500]
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def up(m: dict[tuple[str, frozenset[tuple[str, str]]], float], mesh: str, dp: str) -> float:
    return m[("passguard_target_up", frozenset({("mesh", mesh), ("dataplane", dp)}))]


async def healthy(d: Daemon) -> bool:
    status, _ = await api(d, "GET", "/-/healthy", timeout=5)
    return status == 200


async def timed_cycle(d: Daemon) -> float:
    start = time.monotonic()
    await d.cycle()
    return time.monotonic() - start
