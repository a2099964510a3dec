"""``GET /v1/readiness?to=3.0`` and ``passguard upgrade-check`` against the Kuma CP
test server (tests/kuma_cp.py), with real Envoys carrying the traffic: the
report names exactly the dataplanes with traffic that no policy selects (cut
where no policy means None), the dataplanes a Mesh flag locks today (opened
where it means passthrough on), and the documents that fix both."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from passguard import config as config_mod
from passguard.app import Daemon
from passguard.demo.traffic import EchoUpstream, send_traffic
from tests.kuma_cp import FakeKumaCP

from .conftest import EnvoyFactory
from .procs import REPO

pytestmark = pytest.mark.e2e
DISPLAY = "kuma.io/display-name"


async def get(d: Daemon, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.get(
            f"http://127.0.0.1:{d.config.listen.port}{path}") as r:
        return r.status, await (r.json() if r.content_type == "application/json" else r.text())


async def cli(*args: str) -> tuple[int, str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_COLOR": "1"}
    p = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "passguard", *args, cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(p.communicate(), 60)
    assert p.returncode is not None
    return p.returncode, out.decode(), err.decode()


async def test_readiness_names_busy_dataplanes_no_policy_selects(
        envoy_factory: EnvoyFactory, echo_upstream: EchoUpstream, tmp_path: Path) -> None:
    proxies = [await envoy_factory("legacy") for _ in range(4)]
    web, api, db, vault = proxies
    async with FakeKumaCP() as cp:
        # Mesh pay relies on the default (flag unset): web-1 and api-1 are busy,
        # api-1 is covered by a Matched policy (labels: 3.0 selects by labels
        # only), db-1 is idle.
        for name, proxy in (("web-1", web), ("api-1", api), ("db-1", db)):
            cp.add_dataplane("pay", name, admin_url=proxy.admin_url, transparent=True,
                             labels={DISPLAY: name})
        cp.add_policy("pay", "api-out", {
            "targetRef": {"kind": "Dataplane", "labels": {DISPLAY: "api-1"}},
            "default": {"passthroughMode": "Matched", "appendMatch": [
                {"type": "IP", "value": "127.0.0.1", "port": echo_upstream.port,
                 "protocol": "tcp"},
                {"type": "Domain", "value": "example.com", "port": 443, "protocol": "tcp"}]}})
        # Mesh vault is locked by the flag: 3.0 drops the flag.
        cp.add_mesh("vault", networking={"outbound": {"passthrough": False}})
        cp.add_dataplane("vault", "kv-1", admin_url=vault.admin_url, transparent=True,
                         labels={DISPLAY: "kv-1"})
        raw = {"listen": "127.0.0.1:0", "scrape": {"interval": "1s", "timeout": "900ms"},
               "window": "1m", "state": {"path": "s.db"},
               "sources": [{"kind": "kuma", "url": cp.url, "discovery_interval": "1s"}]}
        d = Daemon(config_mod.build(raw, tmp_path))
        await d.start(schedule=False)
        try:
            await d.sources.discover()
            await d.cycle()
            await send_traffic(web, echo_upstream, 3)
            await send_traffic(api, echo_upstream, 2)
            await d.cycle()
            await d.destinations_cycle()

            status, body = await get(d, "/v1/readiness?to=3.0")
            assert status == 200, body
            assert body["status"] == "not_ready" and body["ready"] is False
            assert body["source"]["commit"] == "348b6528bc234b3c4bd7f22ad7c5bf950d6149fc"
            meshes = {m["mesh"]: m for m in body["meshes"]}
            pay, vlt = meshes["pay"], meshes["vault"]
            # Exactly the busy dataplane no policy selects, and only where no
            # policy means None.
            assert pay["outcomes"]["none"]["traffic_cut"] == ["web-1"]
            assert pay["outcomes"]["as_if_true"]["traffic_cut"] == []
            assert pay["outcomes"]["as_if_true"]["lockdown_lifted"] == []
            [keep] = pay["keep_traffic"]
            assert keep["spec"]["targetRef"] == {"kind": "Dataplane",
                                                 "labels": {DISPLAY: "web-1"}}
            assert {(e["value"], e["port"], e["protocol"])
                    for e in keep["spec"]["default"]["appendMatch"]} == {
                ("127.0.0.1", echo_upstream.port, "tcp"),
                ("127.0.0.1", echo_upstream.port, "tls")}
            # Domain + tcp: refused by the 2.14 and 3.0 validators.
            assert [(r["policy"], r["path"]) for r in pay["rejected_entries"]] == [
                ("api-out", "spec.default.appendMatch[1].protocol")]
            assert vlt["outcomes"]["as_if_true"]["lockdown_lifted"] == ["kv-1"]
            assert vlt["outcomes"]["none"]["lockdown_lifted"] == []
            assert vlt["keep_lockdown"][0]["spec"]["default"] == {"passthroughMode": "None"}

            status, one = await get(d, "/v1/readiness?to=3.0&mesh=vault")
            assert status == 200 and [m["mesh"] for m in one["meshes"]] == ["vault"]
            for query, field in (("", "to: required"), ("?to=2.0", "to='2.0'")):
                status, err = await get(d, f"/v1/readiness{query}")
                assert status == 400 and field in err["error"]
            status, err = await get(d, "/v1/readiness?to=3.0&mesh=nope")
            assert status == 404
            status, html = await get(d, "/")
            assert "Ready for Kuma 3.0?" in html and "not ready" in html

            url = f"http://127.0.0.1:{d.config.listen.port}"
            rc, out, err = await cli("upgrade-check", "--to", "3.0", "--server", url)
            print(out)  # README shows this output (pytest -s)
            assert rc == 1, (out, err)
            assert "348b6528bc234b3c4bd7f22ad7c5bf950d6149fc" in out
            assert "mesh pay: NOT READY" in out and "web-1" in out
            rc, out, _ = await cli("upgrade-check", "--to", "3.0", "--server", url, "-o", "yaml")
            print(out)
            docs = [x for x in yaml.safe_load_all(out) if x]
            assert {x["name"] for x in docs} == {"passguard-keep-lockdown", "passguard-keep-web-1"}
        finally:
            await d.stop()


async def test_without_a_control_plane_readiness_is_unknown_exit_2(
        envoy_factory: EnvoyFactory, tmp_path: Path) -> None:
    proxy = await envoy_factory("legacy")
    raw = {"listen": "127.0.0.1:0", "scrape": {"interval": "1s", "timeout": "900ms"},
           "window": "1m", "state": {"path": "s.db"},
           "sources": [{"kind": "envoy", "targets": [
               {"url": proxy.admin_url, "labels": {"mesh": "m", "dataplane": "a"}}]}]}
    d = Daemon(config_mod.build(raw, tmp_path))
    await d.start(schedule=False)
    try:
        await d.cycle()
        status, body = await get(d, "/v1/readiness?to=3.0")
        assert status == 200 and body["status"] == "unknown" and body["ready"] is None
        assert "no control plane lists mesh 'm'" in body["meshes"][0]["reasons"][0]
        rc, _, err = await cli("upgrade-check", "--to", "3.0", "--server",
                               f"http://127.0.0.1:{d.config.listen.port}")
        assert rc == 2 and "readiness unknown: no control plane lists mesh 'm'" in err
    finally:
        await d.stop()
