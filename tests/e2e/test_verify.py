"""``passguard verify`` on real parts: a real Envoy carrying passthrough traffic,
``passthrough: false`` applied to it for real (restarted with its passthrough
cluster removed, as Kuma does), a real ``passguard run`` scraping it, and the
CLI polling ``GET /v1/verify`` while the application keeps trying to connect.
The CLI must exit 1 within two scrape cycles of the first refusal, naming the
dataplane and the count; an untouched mesh verifies clean (exit 0)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import pytest

from passguard.demo.sidecar import EnvoyProcess
from passguard.demo.traffic import EchoUpstream, passthrough_connect, send_traffic

from .conftest import EnvoyFactory
from .procs import REPO, Passguard, envoy_target, http, passguard_config

pytestmark = pytest.mark.e2e
INTERVAL = 1.0
MESH_OFF = b"type: Mesh\nname: pay\nnetworking:\n  outbound:\n    passthrough: false\n"


async def keep_trying(proxy: EnvoyProcess, up: EchoUpstream, stop: asyncio.Event,
                      first: list[float]) -> None:
    """The application: one connection every 200 ms, refused or not (bounded)."""
    for _ in range(300):
        if stop.is_set():
            return
        with contextlib.suppress(ConnectionError, TimeoutError, OSError):
            if not first:
                first.append(time.monotonic())
            await passthrough_connect(proxy.listener_host("ipv4"), proxy.listener_port("ipv4"),
                                      up.host, up.port, io_timeout=1.0)
        await asyncio.sleep(0.2)


async def cli(*args: str, timeout: float = 60) -> tuple[int, str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_COLOR": "1"}
    p = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "passguard", *args, cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(p.communicate(), timeout)
    except TimeoutError:
        p.kill()
        await p.wait()
        raise
    assert p.returncode is not None
    return p.returncode, out.decode(), err.decode()


async def test_passthrough_off_makes_verify_exit_1_within_two_cycles(
        envoy_factory: EnvoyFactory, echo_upstream: EchoUpstream, tmp_path: Path) -> None:
    pay = await envoy_factory("legacy")
    shop = await envoy_factory("legacy")
    cfg = passguard_config(tmp_path, [envoy_target(pay.admin_url, "pay", "web-1"),
                                      envoy_target(shop.admin_url, "shop", "cart-1")],
                           interval="1s", window="2m", gate={"mode": "audit"})
    daemon = Passguard(cfg, tmp_path)
    daemon.start()
    try:
        await send_traffic(pay, echo_upstream, 3)
        await send_traffic(shop, echo_upstream, 2)
        await asyncio.sleep(2 * INTERVAL)
        since = time.time()
        # The pipeline asks the gate (audit mode lets it in, recorded), then applies.
        status, decision = daemon.post("/v1/check", MESH_OFF)
        assert status == 200 and decision["allowed"], decision
        pay.passthrough = False
        await pay.restart()

        # Bad input is a 400 naming the field, never a traceback.
        code, _, body = http(daemon.url + "/v1/verify")
        assert code == 400 and "since: required" in json.loads(body)["error"]
        code, _, body = http(daemon.url + "/v1/verify?since=yesterday")
        assert code == 400 and "since=" in json.loads(body)["error"]

        stop, first = asyncio.Event(), []
        app = asyncio.create_task(keep_trying(pay, echo_upstream, stop, first))
        try:
            # No --mesh: the mesh comes from the decision in the audit log.
            rc, out, err = await cli("verify", "--server", daemon.url, "--since", f"{since}",
                                     "--for", "2m")
            detected = time.monotonic()
        finally:
            stop.set()
            await app
        print(out)  # docs/pipelines.md shows this output (pytest -s)
        assert rc == 1, (out, err)
        assert "REFUSED  pay/web-1:" in out and "refused (no route / no filter chain)" in out
        assert first and detected - first[0] <= 2 * INTERVAL + 3.0, detected - first[0]

        body = daemon.get(f"/v1/verify?since={since}")
        assert body["meshes"] == ["pay"] and body["status"] == "refusals"
        [row] = body["refusals"]
        assert row["dataplane"] == "web-1" and row["refused"] >= 1
        assert [d["documents"] for d in body["decisions"]] == [["Mesh pay"]]

        # The untouched mesh keeps its passthrough: clean for the whole --for.
        await send_traffic(shop, echo_upstream, 2)
        rc, out, err = await cli("verify", "--server", daemon.url, "--since", f"{since}",
                                 "--mesh", "shop", "--for", "3s")
        print(out)
        assert rc == 0, (out, err)
        assert out.startswith("CLEAN  no passthrough refusal on 1 dataplane(s) of shop")
        # A mesh passguard does not know is an error (2), named.
        rc, _, err = await cli("verify", "--server", daemon.url, "--since", "1m",
                               "--mesh", "nope")
        assert rc == 2 and "mesh 'nope'" in err
    finally:
        daemon.close()
