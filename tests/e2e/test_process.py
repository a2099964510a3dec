"""``passguard`` as real processes: the daemon, the CLI's exit codes, reload, stop,
and ``promtool check metrics`` on what the daemon exposes. Envoy is real too."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from passguard.demo.sidecar import EnvoyProcess
from passguard.demo.traffic import EchoUpstream, send_traffic

from .conftest import EnvoyFactory

MESH_OFF = "type: Mesh\nname: {}\nnetworking:\n  outbound:\n    passthrough: false\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A ``passguard run`` child process with its config file and log."""

    def __init__(self, cfg: dict[str, Any], tmp: Path) -> None:
        self.cfg = cfg
        self.path = tmp / "passguard.yaml"
        self.log = tmp / "passguard.log"
        self.write(cfg)
        self.url = f"http://{cfg['listen']}"
        self.proc: subprocess.Popen[bytes] | None = None

    def write(self, cfg: dict[str, Any]) -> None:
        self.path.write_text(yaml.safe_dump(cfg))

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "passguard", "run", "-c", str(self.path)],
            stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError("daemon not ready:\n" + self.log.read_text())

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            body = r.read().decode()
            return json.loads(body) if r.headers.get_content_type() == "application/json" \
                else body

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(20)

    def cli(self, *args: str, stdin: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "passguard", *args], input=stdin,
                              text=True, capture_output=True, timeout=60,
                              env={**os.environ, **(env or {})})


@pytest.fixture
async def setup(envoy_factory: EnvoyFactory, echo_upstream: EchoUpstream,
                tmp_path: Path) -> AsyncIterator[tuple[Proc, EnvoyProcess, EnvoyProcess]]:
    busy = await envoy_factory("legacy")
    idle = await envoy_factory("unified")
    cfg = {
        "listen": f"127.0.0.1:{free_port()}",
        "scrape": {"interval": "500ms", "timeout": "400ms"},
        "window": "30s",
        "state": {"path": str(tmp_path / "state.db")},
        "sources": [{"kind": "envoy", "targets": [
            {"url": busy.admin_url, "labels": {"mesh": "busy", "dataplane": "busy-1"}},
            {"url": idle.admin_url, "labels": {"mesh": "idle", "dataplane": "idle-1"}},
        ]}],
    }
    p = Proc(cfg, tmp_path)
    await asyncio.to_thread(p.start)
    await send_traffic(busy, echo_upstream, 3)
    await asyncio.sleep(1.5)  # a few cycles
    yield p, busy, idle
    if p.proc is not None and p.proc.poll() is None:
        p.proc.kill()
        p.proc.wait(10)


async def test_cli_exit_codes(setup: tuple[Proc, EnvoyProcess, EnvoyProcess],
                              tmp_path: Path) -> None:
    p, _, _ = setup
    refused = await asyncio.to_thread(p.cli, "check", "-f", "-", "--server", p.url,
                                      stdin=MESH_OFF.format("busy"))
    assert refused.returncode == 1, refused.stderr
    assert "DENY" in refused.stdout and "busy-1 (3)" in refused.stdout
    allowed = await asyncio.to_thread(p.cli, "check", "-f", "-", "-o", "json",
                                      stdin=MESH_OFF.format("idle"),
                                      env={"PASSGUARD_SERVER": p.url})
    assert allowed.returncode == 0, allowed.stderr
    assert json.loads(allowed.stdout)["verdict"] == "allow"
    bad = await asyncio.to_thread(p.cli, "check", "-f", "-", "--server", p.url,
                                  stdin="type: Mesh\nname: [")
    assert bad.returncode == 2 and "stdin" in bad.stderr and "Traceback" not in bad.stderr
    unreachable = await asyncio.to_thread(p.cli, "check", "-f", "-", "--server",
                                          f"http://127.0.0.1:{free_port()}",
                                          stdin=MESH_OFF.format("idle"))
    assert unreachable.returncode == 2 and "cannot reach passguard" in unreachable.stderr
    missing = await asyncio.to_thread(p.cli, "check", "-f", str(tmp_path / "nope.yaml"),
                                      "--server", p.url)
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    # --old: the mesh was already disabled, so nothing is reduced.
    old = tmp_path / "old.yaml"
    old.write_text(MESH_OFF.format("busy"))
    same = await asyncio.to_thread(p.cli, "check", "-f", "-", "--old", str(old), "--server",
                                   p.url, stdin=MESH_OFF.format("busy"))
    assert same.returncode == 0, same.stdout + same.stderr
    status = await asyncio.to_thread(p.cli, "status", "--server", p.url)
    assert status.returncode == 0
    lines = {ln.split()[0]: ln.split() for ln in status.stdout.splitlines()[2:]}
    assert lines["busy"][-1] == "deny" and lines["idle"][-1] == "allow"
    status_json = await asyncio.to_thread(p.cli, "status", "--server", p.url, "-o", "json")
    assert {m["mesh"] for m in json.loads(status_json.stdout)["meshes"]} == {"busy", "idle"}


async def test_standalone_check_scrapes_once(setup: tuple[Proc, EnvoyProcess, EnvoyProcess]
                                             ) -> None:
    p, _, _ = setup
    refused = await asyncio.to_thread(p.cli, "check", "-f", "-", "-c", str(p.path), "-o",
                                      "json", stdin=MESH_OFF.format("busy"))
    assert refused.returncode == 1, refused.stderr
    body = json.loads(refused.stdout)
    assert "since it started" in body["evidence_source"]
    assert "since the proxies started" in body["decisions"][0]["reasons"][0]
    # stderr is a pipe here, as in a pipeline: no progress line.
    assert "dataplanes read" not in refused.stderr
    allowed = await asyncio.to_thread(p.cli, "check", "-f", "-", "-c", str(p.path),
                                      stdin=MESH_OFF.format("idle"))
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr


async def test_reload_good_and_bad_config(setup: tuple[Proc, EnvoyProcess, EnvoyProcess]
                                          ) -> None:
    p, _, _ = setup
    # A bad file is refused (HTTP and SIGHUP) and the old config keeps running.
    p.path.write_text("window: forever\n")
    req = urllib.request.Request(p.url + "/-/reload", method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        await asyncio.to_thread(urllib.request.urlopen, req)
    assert info.value.code == 400 and b"window" in info.value.read()
    assert p.proc is not None
    p.proc.send_signal(signal.SIGHUP)
    await asyncio.sleep(1)
    metrics = await asyncio.to_thread(p.get, "/metrics")
    assert 'passguard_config_reloads_total{outcome="failure"} 2.0' in metrics
    assert (await asyncio.to_thread(p.get, "/v1/meshes"))["window_seconds"] == 30
    # A good file is applied without a restart.
    p.write({**p.cfg, "window": "45s", "gate": {"meshes": {"busy": {"mode": "warn"}}},
             "limits": {"max_connections": 4, "max_body_bytes": "1KiB"}})
    p.proc.send_signal(signal.SIGHUP)
    await asyncio.sleep(1)
    metrics = await asyncio.to_thread(p.get, "/metrics")
    assert 'passguard_config_reloads_total{outcome="success"} 1.0' in metrics
    assert (await asyncio.to_thread(p.get, "/v1/meshes"))["window_seconds"] == 45
    warned = await asyncio.to_thread(p.cli, "check", "-f", "-", "--server", p.url,
                                     stdin=MESH_OFF.format("busy"))
    assert warned.returncode == 0 and "WARN" in warned.stdout
    assert "refused, keeping the running configuration" in p.log.read_text()
    # So does the body limit: read with the running config's limit.
    req = urllib.request.Request(p.url + "/v1/check", data=b"#" * 2048 + b"\n" +
                                 MESH_OFF.format("idle").encode(), method="POST",
                                 headers={"Content-Type": "application/yaml"})
    with pytest.raises(urllib.error.HTTPError) as info:
        await asyncio.to_thread(urllib.request.urlopen, req)
    assert info.value.code == 413
    assert b"over the limit of 1024 bytes" in info.value.read()
    # The lowered connection cap applies at once: four idle connections hold
    # it, the fifth is answered 503 and closed.
    host, port = p.url.removeprefix("http://").rsplit(":", 1)
    held = [await asyncio.open_connection(host, int(port)) for _ in range(4)]
    try:
        # The daemon accepts the four on its next turns: asked until it has
        # (bounded), a request is refused 503 by the full cap.
        deadline = time.monotonic() + 5
        while True:
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"GET /v1/meshes HTTP/1.1\r\nHost: passguard\r\n"
                         b"Connection: close\r\n\r\n")
            async with asyncio.timeout(5):
                answer = await reader.read()
            writer.close()
            if answer.startswith(b"HTTP/1.1 503") or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert answer.startswith(b"HTTP/1.1 503") and b"of 4 (limits.max_connections)" in answer
    finally:
        for _, w in held:
            w.close()


async def test_sigterm_stops_cleanly_and_restart_resumes(
        setup: tuple[Proc, EnvoyProcess, EnvoyProcess]) -> None:
    p, _, _ = setup
    before = await asyncio.to_thread(p.cli, "check", "-f", "-", "--server", p.url, "-o", "json",
                                     stdin=MESH_OFF.format("busy"))
    assert await asyncio.to_thread(p.stop) == 0
    assert "stopped" in p.log.read_text()
    await asyncio.to_thread(p.start)
    after = await asyncio.to_thread(p.cli, "check", "-f", "-", "--server", p.url, "-o", "json",
                                    stdin=MESH_OFF.format("busy"))
    b, a = json.loads(before.stdout), json.loads(after.stdout)
    assert a["verdict"] == b["verdict"] == "deny"
    assert a["decisions"][0]["evidence"]["connections"] == 3
    assert await asyncio.to_thread(p.stop, signal.SIGINT) == 0


async def test_metrics_pass_promtool(setup: tuple[Proc, EnvoyProcess, EnvoyProcess],
                                     tmp_path: Path) -> None:
    p, _, _ = setup
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: install Debian's prometheus package (.ci/test does)"
    text = await asyncio.to_thread(p.get, "/metrics")
    assert 'passguard_passthrough_connections_total{dataplane="busy-1",family="ipv4"' in text
    res = await asyncio.to_thread(subprocess.run, [promtool, "check", "metrics"], input=text,
                                  text=True, capture_output=True, timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr

    def openmetrics() -> tuple[str, str]:
        req = urllib.request.Request(p.url + "/metrics",
                                     headers={"Accept": "application/openmetrics-text"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.headers["Content-Type"], r.read().decode()

    ctype, body = await asyncio.to_thread(openmetrics)
    assert ctype.startswith("application/openmetrics-text")
    assert body.endswith("# EOF\n")


@pytest.fixture(autouse=True)
def _no_proxy_env() -> Iterator[None]:
    # urllib honours http_proxy: loopback requests must never go to a proxy.
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.lower().endswith("_proxy")}
    yield
    os.environ.update(saved)


async def test_audit_survives_sigkill_right_after_an_answer(
        setup: tuple[Proc, EnvoyProcess, EnvoyProcess]) -> None:
    p, _, _ = setup
    answered = await asyncio.to_thread(p.cli, "check", "-f", "-", "--server", p.url,
                                       stdin=MESH_OFF.format("busy"))
    assert answered.returncode == 1
    assert p.proc is not None
    p.proc.kill()  # no chance to flush anything after the answer went out
    p.proc.wait(10)
    await asyncio.to_thread(p.start)
    audit = await asyncio.to_thread(p.get, "/v1/audit?mesh=busy")
    [entry] = audit["entries"]
    assert entry["verdict"] == "deny" and entry["source"] == "check"
    assert entry["documents"][0]["digest"].startswith("sha256:")
    # And after a normal restart.
    assert await asyncio.to_thread(p.stop) == 0
    await asyncio.to_thread(p.start)
    assert len((await asyncio.to_thread(p.get, "/v1/audit"))["entries"]) == 1


def test_non_loopback_bind_without_auth_refuses_to_start(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"listen: 0.0.0.0:{free_port()}\nstate: {{path: s.db}}\n")
    res = subprocess.run([sys.executable, "-m", "passguard", "run", "-c", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "is not a loopback address and no authentication is configured" in res.stderr
    assert "auth.insecure" in res.stderr and "Traceback" not in res.stderr


def test_start_failures_name_the_key_and_leave_no_traceback(tmp_path: Path) -> None:
    """What stops a start (the listen port taken, a state path no database
    can be made at) is one line naming the key, exit 2, never a traceback."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        cfg = tmp_path / "c.yaml"
        cfg.write_text(f"listen: 127.0.0.1:{port}\nstate: {{path: s.db}}\n")
        res = subprocess.run([sys.executable, "-m", "passguard", "run", "-c", str(cfg)],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 2, res.stderr
        assert (f"passguard: listen: cannot listen on 127.0.0.1:{port}: Address already in use"
                in res.stderr) and "Traceback" not in res.stderr
    finally:
        taken.close()
    (tmp_path / "a-file").write_text("")
    cfg.write_text(f"listen: 127.0.0.1:{free_port()}\nstate: {{path: a-file/s.db}}\n")
    res = subprocess.run([sys.executable, "-m", "passguard", "run", "-c", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    assert "passguard: state.path: cannot open" in res.stderr and "a-file" in res.stderr
    assert "Traceback" not in res.stderr
