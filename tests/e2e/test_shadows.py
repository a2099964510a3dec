"""Shadow policies on real parts: a real Envoy carries traffic to two real
upstreams through its ORIGINAL_DST passthrough cluster; a shadow that leaves
one of them out counts its connections, one that covers both (tcp and tls
entries, the transport being unknown on the generic cluster) stays clean;
the counter survives a restart of passguard; the CLI answers from the
daemon's HTTP API, behind a token."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from passguard import config as config_mod
from passguard.app import Daemon
from passguard.demo.traffic import EchoUpstream, passthrough_connect, send_traffic

from .conftest import EnvoyFactory

TOKEN = "shadow-test-token"


def matched(name: str, *upstreams: EchoUpstream) -> dict[str, Any]:
    return {"type": "MeshPassthrough", "name": name, "mesh": "m", "spec": {
        "targetRef": {"kind": "Mesh"},
        "default": {"passthroughMode": "Matched", "appendMatch": [
            {"type": "IP", "value": up.host, "port": up.port, "protocol": proto}
            for up in upstreams for proto in ("tcp", "tls")]}}}


async def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PASSGUARD_TOKEN": TOKEN}
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "passguard", "shadow", *args, "--server", url],
        capture_output=True, text=True, timeout=60, env=env)


async def traffic(d: Daemon, proxy: Any, *ups: EchoUpstream) -> None:
    """Connections to each upstream, one held open across the /clusters read
    (Envoy drops an idle ORIGINAL_DST host after 5 s)."""
    for up in ups:
        await send_traffic(proxy, up, 2)
    held = [await passthrough_connect(proxy.listener_host("ipv4"), proxy.listener_port("ipv4"),
                                      up.host, up.port, hold=True) for up in ups]
    await d.cycle()
    await d.destinations_cycle()
    for h in held:
        await h.close()


async def test_shadows_count_what_they_would_cut_and_survive_a_restart(
        envoy_factory: EnvoyFactory, tmp_path: Path) -> None:
    proxy = await envoy_factory("legacy")
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(yaml.safe_dump({"tokens": [
        {"name": "ci", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest()}]}))
    async with EchoUpstream("127.0.0.1") as kept, EchoUpstream("127.0.0.1") as cut:
        raw = {"listen": "127.0.0.1:0", "scrape": {"interval": "1s", "timeout": "500ms"},
               "window": "30s", "state": {"path": "s.db"}, "destinations": {"interval": "2s"},
               "auth": {"tokens_file": str(tokens)},
               "sources": [{"kind": "envoy", "targets": [{"url": proxy.admin_url, "labels": {
                   "mesh": "m", "dataplane": "web-1", "service": "web"}}]}]}
        d = Daemon(config_mod.build(raw, tmp_path))
        await d.start(schedule=False)
        try:
            await d.cycle()
            await d.destinations_cycle()
            url = f"http://127.0.0.1:{d.config.listen.port}"
            auth = {"Authorization": f"Bearer {TOKEN}"}
            async with aiohttp.ClientSession() as s:
                # Token-protected like /v1/check, the item routes too.
                for method, path in (("GET", "/v1/shadows"), ("GET", "/v1/shadows/x"),
                                     ("DELETE", "/v1/shadows/x"), ("POST", "/v1/shadows")):
                    async with s.request(method, url + path) as r:
                        assert r.status == 401, (method, path)
                # Bad input: a 4xx naming the field, never a 500.
                async with s.post(url + "/v1/shadows", headers=auth, data=json.dumps(
                        {"name": "Bad_Name", "documents": [matched("x", kept)]})) as r:
                    assert r.status == 400 and (await r.json())["error"].startswith("name:")
                async with s.post(url + "/v1/shadows?name=y", headers=auth,
                                  data="kind: MeshPassthrough\nspec: 5\n") as r:
                    assert r.status == 400, await r.text()
                async with s.get(url + "/v1/shadows/none", headers=auth) as r:
                    assert r.status == 404
                async with s.get(url + "/v1/shadows/none?days=0", headers=auth) as r:
                    assert r.status == 400 and "days" in (await r.json())["error"]

            policy_dir = tmp_path / "docs"
            policy_dir.mkdir()
            (policy_dir / "narrow.yaml").write_text(yaml.safe_dump(matched("narrow", kept)))
            (policy_dir / "covers.yaml").write_text(yaml.safe_dump(matched("covers", kept, cut)))
            add = await cli(url, "add", "narrow", "-f", str(policy_dir / "narrow.yaml"))
            assert add.returncode == 0, add.stderr
            add = await cli(url, "add", "covers", "-f", str(policy_dir / "covers.yaml"))
            assert add.returncode == 0, add.stderr
            again = await cli(url, "add", "covers", "-f", str(policy_dir / "covers.yaml"))
            assert again.returncode == 2 and "exists" in again.stderr

            await traffic(d, proxy, kept, cut)

            counters = d.shadows.counters
            # 2 sent + 1 held to the left-out upstream: refused; to the other, let through.
            assert counters[("narrow", "m", "web-1")] == [3, 0, 3], counters
            assert counters[("covers", "m", "web-1")] == [0, 0, 6], counters

            show = await cli(url, "show", "narrow", "-o", "json")
            assert show.returncode == 0, show.stderr
            body = json.loads(show.stdout)
            assert [(x["address"], x["connections"]) for x in body["refused"]] == [
                (f"127.0.0.1:{cut.port}", 3)]
            assert body["clean"] is False
            text = await cli(url, "show", "narrow")
            assert f"127.0.0.1:{cut.port}" in text.stdout and "would have cut 1" in text.stdout

            promote = await cli(url, "promote", "narrow", "--clean-for", "10m")
            assert promote.returncode == 1, promote
            assert f"127.0.0.1:{cut.port}" in promote.stderr and promote.stdout == ""
            # Clean since it was added: at least 1 s ago, however fast the above ran.
            await asyncio.sleep(1.2)
            promote = await cli(url, "promote", "covers", "--clean-for", "1s")
            assert promote.returncode == 0, promote.stderr
            assert list(yaml.safe_load_all(promote.stdout)) == [matched("covers", kept, cut)]
            # Default --clean-for is one window (30s): not yet.
            assert (await cli(url, "promote", "covers")).returncode == 1

            listing = await cli(url, "list")
            assert listing.returncode == 0 and "narrow" in listing.stdout

            async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
                metrics = await r.text()
            assert ('passguard_shadow_would_block_connections_total{dataplane="web-1",'
                    'mesh="m",shadow="narrow"} 3.0') in metrics
            assert 'passguard_shadow_destinations{mesh="m",shadow="narrow"} 1.0' in metrics
            assert 'passguard_shadow_destinations{mesh="m",shadow="covers"} 0.0' in metrics
            async with aiohttp.ClientSession() as s, s.get(url + "/") as r:
                page = await r.text()
            assert "Shadow policies" in page and "narrow" in page
        finally:
            await d.stop()

        # Restart: the counter carries on from where it was, never from zero.
        d2 = Daemon(config_mod.build(raw, tmp_path))
        await d2.start(schedule=False)
        try:
            assert d2.shadows.counters[("narrow", "m", "web-1")] == [3, 0, 3]
            await d2.cycle()
            await d2.destinations_cycle()  # the restored events are not counted again
            assert d2.shadows.counters[("narrow", "m", "web-1")] == [3, 0, 3]
            await traffic(d2, proxy, cut)
            assert d2.shadows.counters[("narrow", "m", "web-1")][0] == 6
            assert d2.shadows.counters[("covers", "m", "web-1")] == [0, 0, 9]
            url = f"http://127.0.0.1:{d2.config.listen.port}"
            rm = await cli(url, "rm", "narrow")
            assert rm.returncode == 0, rm.stderr
            assert (await cli(url, "show", "narrow")).returncode == 2
        finally:
            await d2.stop()
