"""``python -m passguard.demo``: passguard on an embedded default, with real parts.

Starts two Envoy sidecars shaped like Kuma's (mesh ``payments``, whose proxy
keeps sending real TCP connections through its passthrough listener to a local
upstream; mesh ``catalog``, whose proxy is idle), runs the real passguard
daemon against them with a short window, then asks the gate — through the
real CLI — whether ``passthrough: false`` may go in for each mesh.

It keeps running (status page, /metrics, traffic) until Ctrl-C or
``--duration`` seconds, then stops everything it started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from passguard.demo.sidecar import EnvoyProcess
from passguard.demo.traffic import EchoUpstream, passthrough_connect

MESH_OFF = "type: Mesh\nname: {mesh}\nnetworking:\n  outbound:\n    passthrough: false\n"


def _say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def _passguard(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "passguard", *args],
        input=stdin,
        text=True,
        capture_output=True,
        timeout=60,
        check=False,
    )


def _wait_ready(url: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(  # noqa: S310
            url + "/-/ready", timeout=2
        ) as r:
            if r.status == 200:
                return
        time.sleep(0.3)
    raise RuntimeError(f"passguard did not become ready at {url}")


def _wait_destinations(url: str, deadline: float) -> None:
    """Until the first destinations pass has seen the busy sidecar's upstream."""
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError), urllib.request.urlopen(  # noqa: S310
            url + "/v1/destinations", timeout=2
        ) as r:
            if json.load(r).get("destinations"):
                return
        time.sleep(0.5)


async def _traffic(busy: EnvoyProcess, upstream: EchoUpstream, stop: asyncio.Event) -> int:
    """One real passthrough connection a second from the busy sidecar."""
    sent = 0
    while not stop.is_set():
        with contextlib.suppress(OSError, TimeoutError):
            await passthrough_connect(
                busy.listener_host("ipv4"),
                busy.listener_port("ipv4"),
                upstream.host,
                upstream.port,
                b"GET / demo\r\n",
            )
            sent += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
    return sent


def _config(port: int, workdir: Path, busy: EnvoyProcess, idle: EnvoyProcess) -> dict[str, Any]:
    """The daemon's configuration: both sidecars as static targets, short cycles."""
    return {
        "listen": f"127.0.0.1:{port}",
        "scrape": {"interval": "2s", "timeout": "1s"},
        "window": "1m",
        # The daemon's default is 60s: the demo's status page would say
        # "No external destination seen" for its first minute.
        "destinations": {"interval": "3s"},
        "state": {"path": str(workdir / "passguard-state.db")},
        "sources": [
            {
                "kind": "envoy",
                "targets": [
                    {
                        "url": busy.admin_url,
                        "labels": {
                            "mesh": "payments",
                            "service": "payments-api",
                            "dataplane": "payments-api-1",
                        },
                    },
                    {
                        "url": idle.admin_url,
                        "labels": {
                            "mesh": "catalog",
                            "service": "catalog-web",
                            "dataplane": "catalog-web-1",
                        },
                    },
                ],
            }
        ],
    }


async def _walkthrough(server: str, duration: float | None, workdir: Path,
                       stop: asyncio.Event) -> None:
    """Ask the gate about each mesh through the real CLI, then wait for the end."""
    await asyncio.to_thread(_wait_ready, server, time.monotonic() + 30)
    await asyncio.sleep(5)  # a few cycles: traffic has been seen since the first
    await asyncio.to_thread(_wait_destinations, server, time.monotonic() + 15)
    for mesh in ("payments", "catalog"):
        _say(f"passguard check: may mesh '{mesh}' set passthrough: false?")
        res = await asyncio.to_thread(
            _passguard,
            "check",
            "-f",
            "-",
            "--server",
            server,
            stdin=MESH_OFF.format(mesh=mesh),
        )
        print(res.stdout + res.stderr, end="")
        print(
            f"(exit code {res.returncode}: "
            f"{ {0: 'allowed', 1: 'refused'}.get(res.returncode, 'error') })"
        )
    _say("passguard destinations -o yaml: a MeshPassthrough keeping what was seen")
    res = await asyncio.to_thread(_passguard, "destinations", "--server", server,
                                  "--mesh", "payments", "-o", "yaml")
    print(res.stdout + res.stderr, end="")
    _say("passguard check: may that MeshPassthrough go in?")
    res = await asyncio.to_thread(_passguard, "check", "-f", "-", "--server", server,
                                  stdin=res.stdout)
    print(res.stdout + res.stderr, end="")
    print(f"(exit code {res.returncode}: "
          f"{ {0: 'allowed', 1: 'refused'}.get(res.returncode, 'error') })")
    _say("passguard status")
    res = await asyncio.to_thread(_passguard, "status", "--server", server)
    print(res.stdout + res.stderr, end="")
    _say(
        f"status page {server}/  ·  metrics {server}/metrics  ·  "
        f"logs {workdir / 'passguard.log'}"
    )
    print(
        "Ctrl-C stops the demo."
        if duration is None
        else f"The demo stops in {duration:g}s."
    )
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), duration)


async def demo(port: int, duration: float | None, workdir: Path) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    _say("starting two Kuma-shaped Envoy sidecars and an external upstream")
    async with (
        EchoUpstream("127.0.0.1") as upstream,
        EnvoyProcess("legacy") as busy,
        EnvoyProcess("unified") as idle,
    ):
        print(f"external upstream      127.0.0.1:{upstream.port}")
        print(
            f"payments-api-1 (busy)  admin {busy.admin_url}, passthrough listener "
            f"127.0.0.1:{busy.listener_port('ipv4')} (Kuma 1.1.2-2.x cluster names)"
        )
        print(f"catalog-web-1 (idle)   admin {idle.admin_url} (Kuma unified naming)")
        cfg_path = workdir / "passguard.yaml"
        cfg_path.write_text(yaml.safe_dump(_config(port, workdir, busy, idle), sort_keys=False))
        traffic = asyncio.create_task(_traffic(busy, upstream, stop))
        _say(f"starting passguard: passguard run -c {cfg_path}")
        log = (workdir / "passguard.log").open("w")
        daemon = await asyncio.to_thread(
            subprocess.Popen,
            [sys.executable, "-m", "passguard", "run", "-c", str(cfg_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        server = f"http://127.0.0.1:{port}"
        try:
            await _walkthrough(server, duration, workdir, stop)
        finally:
            stop.set()
            sent = await traffic
            daemon.send_signal(signal.SIGTERM)
            try:
                code = await asyncio.to_thread(daemon.wait, 15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                code = -9
            log.close()
            print(f"\nstopped: {sent} passthrough connections sent; passguard exited with {code}")
    return 0 if code == 0 else 1


def main() -> int:
    p = argparse.ArgumentParser(
        prog="python -m passguard.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--port", type=int, default=int(os.environ.get("PASSGUARD_DEMO_PORT", 9110)))
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="passguard-demo-") as tmp:
        return asyncio.run(demo(args.port, args.duration, Path(tmp)))


if __name__ == "__main__":
    sys.exit(main())
