"""POST /v1/check with good, bad and hostile bodies: a clear 4xx, never a 500, and the
daemon stays healthy. The daemon runs for real here, with one real Envoy target."""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from passguard import config as config_mod
from passguard.app import Daemon
from passguard.demo.sidecar import EnvoyProcess

from .conftest import EnvoyFactory

MESH_OFF_K8S = """apiVersion: kuma.io/v1alpha1
kind: Mesh
metadata:
  name: default
spec:
  networking:
    outbound:
      passthrough: false
"""
ALIAS_BOMB = "a: &a [x,x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},"
    f"*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},"
    f"*{chr(97 + i)},*{chr(97 + i)}]\n"
    for i in range(8)
)


@pytest.fixture
async def daemon(envoy_factory: EnvoyFactory, tmp_path: Path) -> AsyncIterator[Daemon]:
    proxy: EnvoyProcess = await envoy_factory("legacy")
    raw = {
        "listen": "127.0.0.1:0",
        "scrape": {"interval": "1s", "timeout": "500ms"},
        "window": "10s",
        "state": {"path": str(tmp_path / "s.db")},
        "sources": [
            {
                "kind": "envoy",
                "targets": [
                    {"url": proxy.admin_url, "labels": {"mesh": "default", "dataplane": "web-1"}}
                ],
            }
        ],
    }
    d = Daemon(config_mod.build(raw, tmp_path))
    await d.start(schedule=False)
    await d.cycle()
    yield d
    await d.stop()


async def post(d: Daemon, body: bytes, ctype: str = "application/yaml") -> tuple[int, dict]:  # type: ignore[type-arg]
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"http://127.0.0.1:{d.config.listen.port}/v1/check",
            data=body,
            headers={"Content-Type": ctype},
        ) as r,
    ):
        return r.status, await r.json()


async def healthy(d: Daemon) -> bool:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://127.0.0.1:{d.config.listen.port}/-/healthy") as r,
    ):
        return r.status == 200


@pytest.mark.parametrize(
    ("body", "ctype", "fragment"),
    [
        (MESH_OFF_K8S.encode(), "application/yaml", None),
        (
            json.dumps(
                {
                    "object": {
                        "type": "Mesh",
                        "name": "default",
                        "networking": {"outbound": {"passthrough": False}},
                    },
                    "oldObject": None,
                }
            ).encode(),
            "application/json",
            None,
        ),
        (
            (MESH_OFF_K8S + "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n").encode(),
            "application/yaml",
            None,
        ),
        (
            json.dumps(
                {"apiVersion": "v1", "kind": "List", "items": [{"type": "Mesh", "name": "default"}]}
            ).encode(),
            "application/json",
            None,
        ),
    ],
)
async def test_accepted_inputs(
    daemon: Daemon, body: bytes, ctype: str, fragment: str | None
) -> None:
    status, answer = await post(daemon, body, ctype)
    assert status == 200, answer
    assert answer["verdict"] in ("allow", "deny")


async def test_other_kinds_are_listed_in_warnings(daemon: Daemon) -> None:
    body = MESH_OFF_K8S + "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n"
    _, answer = await post(daemon, body.encode())
    assert any("v1 ConfigMap" in w and "ignored" in w for w in answer["warnings"])


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b"type: Mesh\nname: [unclosed", 400, "line"),
        (ALIAS_BOMB.encode(), 400, "alias"),
        (b"[" * 5000 + b"]" * 5000, 400, "deep"),
        (b"type: Mesh\nname: caf\xe9\n", 400, "UTF-8"),
        (
            b"type: Mesh\nname: default\nnetworking: {outbound: {passthrough: 'false'}}\n",
            400,
            "networking.outbound.passthrough must be true or false, got a string 'false'",
        ),
        (b"type: Mesh\nname: a\nname: b\n", 400, "duplicate"),
        (b"", 400, "no documents"),
        (b"just text", 400, "expected a resource"),
        (b"type: Mesh\nname: x\n" + b"#" * (1024 * 1024 + 10), 413, "over the limit"),
    ],
)
async def test_bad_inputs_get_a_clear_4xx(
    daemon: Daemon, body: bytes, status: int, fragment: str
) -> None:
    start = time.monotonic()
    got, answer = await post(daemon, body)
    assert time.monotonic() - start < 5, "bounded time"
    assert got == status, answer
    assert fragment.lower() in answer["error"].lower(), answer
    assert "Traceback" not in answer["error"]
    assert await healthy(daemon)


async def test_a_chunked_body_over_the_limit_gets_413(daemon: Daemon) -> None:
    """No Content-Length to refuse up front: the limit is counted as it arrives
    (and gzip-encoded bodies are counted decoded)."""
    port = daemon.config.listen.port

    async def chunks() -> AsyncIterator[bytes]:
        yield b"type: Mesh\nname: x\n"
        for _ in range(40):
            yield b"#" * 32 * 1024 + b"\n"

    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{port}/v1/check", data=chunks(),
                          headers={"Content-Type": "application/yaml"}) as r:
            assert r.status == 413
            assert "over the limit of 1048576 bytes" in (await r.json())["error"]
        bomb = gzip.compress(b"type: Mesh\nname: x\n" + b"#" * (4 * 1024 * 1024))
        async with s.post(f"http://127.0.0.1:{port}/v1/check", data=bomb,
                          headers={"Content-Type": "application/yaml",
                                   "Content-Encoding": "gzip"}) as r:
            assert r.status == 413, await r.text()
    assert await healthy(daemon)


async def test_json_nan_is_refused(daemon: Daemon) -> None:
    # In YAML, NaN is a plain string; in JSON it is not JSON at all.
    status, answer = await post(
        daemon, b'{"type": "Mesh", "name": "x", "n": NaN}', "application/json"
    )
    assert status == 400 and "nan" in answer["error"].lower()


async def test_read_routes(daemon: Daemon) -> None:
    port = daemon.config.listen.port
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port}/v1/meshes") as r:
            body = await r.json()
            assert body["window_seconds"] == 10
            [m] = body["meshes"]
            assert m["mesh"] == "default" and m["dataplanes"]["total"] == 1
            assert m["verdict_if_disabled"] == "allow"
        async with s.get(f"http://127.0.0.1:{port}/v1/meshes/nope") as r:
            assert r.status == 404 and "nope" in (await r.json())["error"]
        async with s.get(f"http://127.0.0.1:{port}/") as r:
            html = await r.text()
            assert "web-1" in html and "safe to disable passthrough now" in html
        async with s.get(f"http://127.0.0.1:{port}/nowhere") as r:
            assert r.status == 404
