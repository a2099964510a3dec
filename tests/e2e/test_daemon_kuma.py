"""The daemon with ``sources: [{kind: kuma}]``: discovery, stats and destinations
through the control plane's inspect API, offline dataplanes, a CP outage.

tests/kuma_cp.py stands in for kuma-cp (Kuma's control plane does not run
here): it serves the response shapes of Kuma's API answers and
proxies its inspect endpoints to real Envoy processes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp

from passguard import config as config_mod
from passguard.app import Daemon
from passguard.demo.traffic import EchoUpstream, passthrough_connect, send_traffic
from tests.kuma_cp import FakeKumaCP

from .conftest import EnvoyFactory

TOKEN = "kuma-user-token"


async def get(d: Daemon, path: str) -> Any:
    async with aiohttp.ClientSession() as s, s.get(
            f"http://127.0.0.1:{d.config.listen.port}{path}") as r:
        return await r.json()


async def check(d: Daemon, mesh: str) -> dict[str, Any]:
    doc = {"type": "Mesh", "name": mesh, "networking": {"outbound": {"passthrough": False}}}
    async with aiohttp.ClientSession() as s, s.post(
            f"http://127.0.0.1:{d.config.listen.port}/v1/check", data=json.dumps(doc)) as r:
        return await r.json()  # type: ignore[no-any-return]


async def test_daemon_through_the_control_plane(
        envoy_factory: EnvoyFactory, echo_upstream: EchoUpstream, tmp_path: Path) -> None:
    web1 = await envoy_factory("unified", admin="unix")
    db1 = await envoy_factory("legacy")
    async with FakeKumaCP(token=TOKEN) as cp:
        cp.add_dataplane("payments", "web-1", admin_url=web1.admin_url, service="web",
                         tags={"version": "v2"})
        cp.add_dataplane("catalog", "db-1", admin_url=db1.admin_url, service="db")
        cp.add_dataplane("catalog", "old-1", service="old", insight="disconnected")
        (tmp_path / "token").write_text(TOKEN + "\n")
        raw = {"listen": "127.0.0.1:0", "scrape": {"interval": "1s", "timeout": "900ms"},
               "window": "30s", "state": {"path": "s.db"},
               "sources": [{"kind": "kuma", "url": cp.url, "token_file": "token",
                            "discovery_interval": "1s"}]}
        d = Daemon(config_mod.build(raw, tmp_path))
        await d.start(schedule=False)
        try:
            await d.cycle()
            await send_traffic(web1, echo_upstream, 3)
            held = await passthrough_connect(web1.listener_host("ipv4"),
                                             web1.listener_port("ipv4"),
                                             echo_upstream.host, echo_upstream.port, hold=True)
            await d.cycle()
            await d.destinations_cycle()
            await held.close()

            payments = await get(d, "/v1/meshes/payments")
            [web] = payments["dataplanes"]
            assert (web["dataplane"], web["service"], web["state"]) == ("web-1", "web", "fresh")
            assert web["connections"] == 4
            catalog = await get(d, "/v1/meshes/catalog")
            states = {x["dataplane"]: x["state"] for x in catalog["dataplanes"]}
            assert states == {"db-1": "fresh", "old-1": "offline"}
            # Every inspect request carried the token.
            inspect = [r for r in cp.requests if "/stats" in r.path_qs or "/clusters" in r.path_qs]
            assert inspect and all(r.authorization == f"Bearer {TOKEN}" for r in inspect)
            dests = await get(d, "/v1/destinations?mesh=payments")
            assert [x["address"] for x in dests["destinations"]] == [
                f"127.0.0.1:{echo_upstream.port}"]

            busy = await check(d, "payments")
            assert busy["verdict"] == "deny" and "web-1 (4)" in busy["decisions"][0]["reasons"][0]
            idle = await check(d, "catalog")
            assert idle["verdict"] == "allow", idle
            assert idle["decisions"][0]["evidence"]["dataplanes"]["offline"] == 1

            # The CP goes down: the last known dataplanes stay, the outage shows.
            await cp.stop()
            kuma = d.sources.kuma[0]
            await kuma.discover()
            await d.cycle()
            assert kuma.last_error
            catalog = await get(d, "/v1/meshes/catalog")
            assert {x["dataplane"] for x in catalog["dataplanes"]} == {"db-1", "old-1"}
            assert {x["state"] for x in catalog["dataplanes"] if x["dataplane"] == "db-1"} \
                == {"failed"}  # its stats come through the CP too
            async with aiohttp.ClientSession() as s, s.get(
                    f"http://127.0.0.1:{d.config.listen.port}/metrics") as r:
                metrics = await r.text()
            assert f'passguard_kuma_discovery_up{{url="{cp.url}"}} 0.0' in metrics
            assert (await check(d, "catalog"))["verdict"] == "deny"  # db-1 is unknown now

            # Back up, and a dataplane removed from the CP is dropped.
            await cp.start()
            cp.remove_dataplane("catalog", "db-1")
            await kuma.discover()
            await d.cycle()
            catalog = await get(d, "/v1/meshes/catalog")
            assert [x["dataplane"] for x in catalog["dataplanes"]] == ["old-1"]
        finally:
            await d.stop()


async def test_cp_down_at_start_keeps_the_restored_window(
        envoy_factory: EnvoyFactory, echo_upstream: EchoUpstream, tmp_path: Path) -> None:
    proxy = await envoy_factory("legacy")
    async with FakeKumaCP(token=TOKEN) as cp:
        cp.add_dataplane("m", "web-1", admin_url=proxy.admin_url)
        (tmp_path / "token").write_text(TOKEN)
        raw = {"listen": "127.0.0.1:0", "scrape": {"interval": "1s", "timeout": "900ms"},
               "window": "30s", "state": {"path": "s.db"},
               "sources": [{"kind": "kuma", "url": cp.url, "token_file": "token",
                            "timeout": "500ms"}]}
        d = Daemon(config_mod.build(raw, tmp_path))
        await d.start(schedule=False)
        await d.cycle()
        await send_traffic(proxy, echo_upstream, 2)
        await d.cycle()
        await d.stop()
        await cp.stop()
        # passguard restarts while the CP is down: the evidence is not deleted.
        d2 = Daemon(config_mod.build(raw, tmp_path))
        await d2.start(schedule=False)
        try:
            await d2.cycle()
            assert d2.store.histories["m/web-1"].segments, "restored window kept"
            await cp.start()
            await d2.sources.discover()
            await d2.cycle()
            body = await check(d2, "m")
            assert body["decisions"][0]["evidence"]["connections"] == 2, body
        finally:
            await d2.stop()


async def post_check(d: Daemon, docs: list[Any]) -> dict[str, Any]:
    body = "\n".join("---\n" + json.dumps(doc) for doc in docs)
    async with aiohttp.ClientSession() as s, s.post(
            f"http://127.0.0.1:{d.config.listen.port}/v1/check", data=body) as r:
        assert r.status == 200, await r.text()
        return await r.json()  # type: ignore[no-any-return]


def mp_doc(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"type": "MeshPassthrough", "name": name, "mesh": "shop", "spec": spec}


async def test_gate_judges_the_control_planes_policies(
        envoy_factory: EnvoyFactory, echo_upstream: EchoUpstream, tmp_path: Path) -> None:
    """The current Mesh and MeshPassthrough policies come from the CP (its
    MeshPassthrough list, Kuma's Universal item shape) and decide the verdict:
    the Mesh flag is no reason to refuse where a policy decides, a policy aimed
    at a dataplane's second inbound selects it, and deleting the policy is
    judged against the flag the CP holds."""
    web = await envoy_factory("legacy")
    api = await envoy_factory("legacy")
    open_all = {"targetRef": {"kind": "Mesh"}, "default": {"passthroughMode": "All"}}
    async with FakeKumaCP(token=TOKEN) as cp:
        cp.add_mesh("shop")
        cp.add_dataplane("shop", "web-1", admin_url=web.admin_url, service="web",
                         extra_inbounds=[{"port": 9901, "name": "admin",
                                          "tags": {"kuma.io/service": "web-admin"}}])
        cp.add_dataplane("shop", "api-1", admin_url=api.admin_url, service="api")
        cp.add_policy("shop", "open", open_all)
        (tmp_path / "token").write_text(TOKEN)
        raw = {"listen": "127.0.0.1:0", "scrape": {"interval": "1s", "timeout": "900ms"},
               "window": "30s", "state": {"path": "s.db"},
               "sources": [{"kind": "kuma", "url": cp.url, "token_file": "token",
                            "discovery_interval": "1s", "stale_after": "1h"}]}
        d = Daemon(config_mod.build(raw, tmp_path))
        await d.start(schedule=False)
        try:
            await d.cycle()
            await send_traffic(web, echo_upstream, 3)
            await d.cycle()
            [state] = d.mesh_states().values()
            assert [p.name for p in state.policies] == ["open"]
            assert str(state.version) == "2.14.3"
            assert {p.name: len(p.inbounds) for p in state.proxies} == {"web-1": 2, "api-1": 1}

            mesh_off = {"type": "Mesh", "name": "shop",
                        "networking": {"outbound": {"passthrough": False}}}
            body = await post_check(d, [mesh_off])
            assert body["verdict"] == "allow", body  # MeshPassthrough "open" decides
            assert not any("no control plane" in w for w in body["warnings"])

            lock_admin = mp_doc("lock-admin", {
                "targetRef": {"kind": "MeshSubset", "tags": {"kuma.io/service": "web-admin"}},
                "default": {"passthroughMode": "None"}})
            body = await post_check(d, [lock_admin])
            assert body["verdict"] == "deny", body
            assert [x["dataplane"] for x in body["decisions"][0]["dataplanes"]] == ["web-1"]

            delete_open = {"object": None, "oldObject": mp_doc("open", open_all)}
            assert (await post_check(d, [delete_open]))["verdict"] == "allow"
            # The CP's Mesh flag goes off: deleting the policy would now cut web-1.
            cp.add_mesh("shop", networking={"outbound": {"passthrough": False}})
            await d.sources.discover()
            body = await post_check(d, [delete_open])
            assert body["verdict"] == "deny", body
            [row] = body["decisions"][0]["dataplanes"]
            assert (row["dataplane"], row["before"], row["after"]) == ("web-1", "All", "None")
        finally:
            await d.stop()
