"""The destination inventory from a real Envoy's ``/clusters``: two real upstreams
reached through the real ORIGINAL_DST passthrough cluster, the inventory and the
generated MeshPassthrough covering them, and a Matched policy that leaves one
out refused by name."""

from __future__ import annotations

import asyncio
import json
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


def matched_policy(*addresses: tuple[str, int]) -> dict[str, Any]:
    return {"type": "MeshPassthrough", "name": "partial", "mesh": "m", "spec": {
        "targetRef": {"kind": "Mesh"},
        "default": {"passthroughMode": "Matched", "appendMatch": [
            {"type": "IP", "value": ip, "port": port, "protocol": "tcp"}
            for ip, port in addresses]}}}


async def test_inventory_policy_and_matched_decision(
        envoy_factory: EnvoyFactory, tmp_path: Path) -> None:
    proxy = await envoy_factory("legacy")
    async with EchoUpstream("127.0.0.1") as up1, EchoUpstream("::1") as up2:
        raw = {"listen": "127.0.0.1:0", "scrape": {"interval": "1s", "timeout": "500ms"},
               "window": "30s", "state": {"path": "s.db"}, "destinations": {"interval": "2s"},
               "sources": [{"kind": "envoy", "targets": [{"url": proxy.admin_url, "labels": {
                   "mesh": "m", "dataplane": "web-1", "service": "web"}}]}]}
        d = Daemon(config_mod.build(raw, tmp_path))
        await d.start(schedule=False)
        try:
            await d.cycle()
            await send_traffic(proxy, up1, 2)
            await send_traffic(proxy, up2, 1)
            # One open connection each: Envoy removes an idle ORIGINAL_DST host
            # after 5 s, which a loaded machine could let pass before the read.
            held = [await passthrough_connect(proxy.listener_host(fam),
                                              proxy.listener_port(fam), up.host, up.port,
                                              hold=True)
                    for fam, up in (("ipv4", up1), ("ipv6", up2))]
            await d.cycle()
            await d.destinations_cycle()
            for h in held:
                await h.close()
            url = f"http://127.0.0.1:{d.config.listen.port}"
            async with aiohttp.ClientSession() as s:
                async with s.get(url + "/v1/destinations?mesh=m") as r:
                    inv = (await r.json())["destinations"]
                got = {x["address"]: x["connections"] for x in inv}
                assert got == {f"127.0.0.1:{up1.port}": 3, f"[::1]:{up2.port}": 2}
                assert {x["service"] for x in inv} == {"web"}

                cli = await asyncio.to_thread(
                    subprocess.run, [sys.executable, "-m", "passguard", "destinations",
                                     "--server", url, "-o", "yaml"],
                    capture_output=True, text=True, timeout=60)
                assert cli.returncode == 0, cli.stderr
                [policy] = list(yaml.safe_load_all(cli.stdout))
                matches = policy["spec"]["default"]["appendMatch"]
                # Seen on the generic passthrough clusters: TLS or plain TCP cannot
                # be told apart, so each destination gets a tcp and a tls entry.
                assert sorted((m["value"], m["port"], m["protocol"]) for m in matches) == [
                    ("127.0.0.1", up1.port, "tcp"), ("127.0.0.1", up1.port, "tls"),
                    ("::1", up2.port, "tcp"), ("::1", up2.port, "tls")]
                assert {x["transport"] for x in inv} == {None}

                # The generated policy keeps every observed destination: allowed.
                async with s.post(url + "/v1/check", data=json.dumps(policy)) as r:
                    ok = await r.json()
                assert ok["verdict"] == "allow", ok

                # One that leaves the IPv6 upstream out is refused, naming it.
                async with s.post(url + "/v1/check", data=json.dumps(
                        matched_policy(("127.0.0.1", up1.port)))) as r:
                    refused = await r.json()
                assert refused["verdict"] == "deny", refused
                [dest] = refused["decisions"][0]["evidence"]["destinations"]
                assert dest == {"address": f"[::1]:{up2.port}", "dataplanes": ["web-1"],
                                "connections": 2}
                assert any(f"[::1]:{up2.port} (2)" in x
                           for x in refused["decisions"][0]["reasons"])
            # The inventory survives a restart of passguard.
            await d.stop()
            d2 = Daemon(config_mod.build(raw, tmp_path))
            await d2.start(schedule=False)
            try:
                assert {x.address for x in d2.store.snapshot.destinations} == set(got)
            finally:
                await d2.stop()
        finally:
            if d.runner is not None:
                await d.stop()


async def test_quiet_dataplanes_are_not_read_again(
        envoy_factory: EnvoyFactory, tmp_path: Path) -> None:
    """Two real proxies; only one gets new traffic after the first pass. The
    second pass reads only that one (the other's /stats prove nothing
    happened), and still records its new destination."""
    busy, quiet = await envoy_factory("legacy"), await envoy_factory("legacy")
    async with EchoUpstream("127.0.0.1") as up1, EchoUpstream("127.0.0.1") as up2:
        raw = {"listen": "127.0.0.1:0", "scrape": {"interval": "1s", "timeout": "500ms"},
               "window": "30s", "state": {"path": "s.db"}, "destinations": {"interval": "2s"},
               "sources": [{"kind": "envoy", "targets": [
                   {"url": p.admin_url, "labels": {"mesh": "m", "dataplane": name}}
                   for p, name in ((busy, "busy-1"), (quiet, "quiet-1"))]}]}
        d = Daemon(config_mod.build(raw, tmp_path))
        await d.start(schedule=False)
        try:
            await send_traffic(quiet, up1, 1)
            await d.cycle()
            await d.destinations_cycle()  # both read: nothing known yet
            first = dict(d.store.book.last_read)
            assert set(first) == {"m/busy-1", "m/quiet-1"}
            held = await passthrough_connect(busy.listener_host("ipv4"),
                                             busy.listener_port("ipv4"), up2.host, up2.port,
                                             hold=True)
            await d.cycle()
            await d.destinations_cycle()
            await held.close()
            assert d.metrics.registry.get_sample_value(
                "passguard_destinations_skipped_dataplanes") == 1  # quiet-1
            assert d.store.book.last_read["m/quiet-1"] == first["m/quiet-1"]
            assert d.store.book.last_read["m/busy-1"] > first["m/busy-1"]
            got = {(x.dataplane, x.address) for x in d.store.snapshot.destinations}
            assert ("busy-1", f"127.0.0.1:{up2.port}") in got
            assert ("quiet-1", f"127.0.0.1:{up1.port}") in got  # kept, not re-read
        finally:
            await d.stop()
