"""``passguard run`` speaks the systemd notify protocol to a real socket.

The test plays systemd: it binds the AF_UNIX datagram socket a ``Type=notify``
service is given (a file path, or an ``@abstract`` name), starts the real
daemon with ``NOTIFY_SOCKET`` and ``WATCHDOG_USEC`` set (as systemd does for
``WatchdogSec=1s``), scrapes a real Envoy, and checks every message the daemon
sends, in order, and that each comes from the daemon's own PID (systemd's
``NotifyAccess=main`` drops the others):

READY=1 once it listens and a first cycle is done → WATCHDOG=1 every 0.5 s →
SIGHUP: RELOADING=1 + MONOTONIC_USEC, then READY=1 (also when the new file is
refused) → SIGTERM: STOPPING=1 last, exit code 0.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import queue
import signal
import socket
import statistics
import struct
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from passguard.demo.sidecar import EnvoyProcess

from .conftest import EnvoyFactory
from .procs import Passguard, envoy_target, passguard_config, wait_until

pytestmark = pytest.mark.e2e

WATCHDOG_USEC = 1_000_000  # WatchdogSec=1s → a ping every 0.5 s
WAIT = 20.0  # bound for any one expected message


@dataclass(frozen=True)
class Message:
    at: float  # time.monotonic() when received
    fields: dict[str, str]
    pid: int  # sender, from SCM_CREDENTIALS
    raw: str

    def __str__(self) -> str:
        return f"{self.raw!r} from pid {self.pid}"


class NotifySocket:
    """The service manager's end: a bound datagram socket and a reader thread."""

    def __init__(self, address: str) -> None:
        self.address = address  # the NOTIFY_SOCKET value
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        # Like systemd: ask the kernel who sent each datagram.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(b"\0" + address[1:].encode() if address.startswith("@") else address)
        self.sock.settimeout(0.2)
        self.received: list[Message] = []
        self._queue: queue.Queue[Message] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        space = socket.CMSG_SPACE(struct.calcsize("3i"))
        while not self._stop.is_set():
            try:
                data, ancdata, _, _ = self.sock.recvmsg(4096, space)
            except TimeoutError:
                continue
            except OSError:
                return
            pid = -1
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", payload[:struct.calcsize("3i")])[0]
            raw = data.decode()
            fields = dict(line.split("=", 1) for line in raw.splitlines() if "=" in line)
            msg = Message(time.monotonic(), fields, pid, raw)
            self.received.append(msg)
            self._queue.put(msg)

    def next(self, timeout: float = WAIT) -> Message:
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no notification within {timeout:g}s; so far: "
                                 f"{[m.raw for m in self.received]}") from None

    def expect(self, key: str, timeout: float = WAIT) -> tuple[Message, list[Message]]:
        """The next message with ``key``, and the messages before it."""
        deadline = time.monotonic() + timeout
        skipped: list[Message] = []
        while True:
            msg = self.next(max(0.01, deadline - time.monotonic()))
            if key in msg.fields:
                return msg, skipped
            skipped.append(msg)

    def drain(self, quiet: float = 0.3) -> list[Message]:
        """Everything still arriving until ``quiet`` seconds pass without a message."""
        out = []
        while True:
            try:
                out.append(self._queue.get(timeout=quiet))
            except queue.Empty:
                return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NotifySocket]:
    if request.param == "abstract":
        address = f"@passguard-test-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        folder = None
    else:
        # sun_path holds 108 bytes: fall back to a short folder if tmp_path is long.
        folder = tmp_path if len(str(tmp_path)) < 90 else Path(tempfile.mkdtemp(prefix="pg-"))
        address = str(folder / "notify.sock")
    listener = NotifySocket(address)
    try:
        yield listener
    finally:
        listener.close()
        if folder is not None:
            Path(address).unlink(missing_ok=True)


def daemon_env(address: str) -> dict[str, str]:
    """The environment systemd gives a Type=notify service with WatchdogSec=1s."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS")
           and not k.lower().endswith("_proxy")}
    # WATCHDOG_PID stays unset: systemd sets it only when the PID is not known.
    return {**env, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": str(WATCHDOG_USEC)}


def only_watchdogs(messages: list[Message], where: str) -> None:
    others = [m.raw for m in messages if m.fields != {"WATCHDOG": "1"}]
    assert not others, f"unexpected notifications {where}: {others}"


async def test_notify_sequence(notify_socket: NotifySocket, envoy_factory: EnvoyFactory,
                               tmp_path: Path) -> None:
    envoy: EnvoyProcess = await envoy_factory("unified")
    cfg = passguard_config(tmp_path, [envoy_target(envoy.admin_url, "default", "web-1")],
                           interval="500ms", timeout="400ms", window="1m")
    pg = Passguard(cfg, tmp_path)
    sock = notify_socket
    try:
        await asyncio.to_thread(pg.start, env=daemon_env(sock.address), wait_ready=False)

        # READY=1: only once the daemon listens and finished a first cycle.
        ready, before = await asyncio.to_thread(sock.expect, "READY")
        only_watchdogs(before, "before READY=1")
        assert ready.fields == {"READY": "1"}, ready
        assert await asyncio.to_thread(pg.ready), "READY=1 sent but GET /-/ready is not 200"
        meshes = await asyncio.to_thread(pg.get, "/v1/meshes")
        assert meshes["meshes"][0]["dataplanes"]["fresh"] == 1, meshes

        # WATCHDOG=1 every WATCHDOG_USEC / 2: several, never a gap systemd would punish.
        await asyncio.sleep(2.6)
        pings = await asyncio.to_thread(sock.drain, 0.01)
        only_watchdogs(pings, "while running")
        assert len(pings) >= 4, [m.raw for m in pings]
        pg_watch = [m.at for m in sock.received if "WATCHDOG" in m.fields]
        gaps = [b - a for a, b in itertools.pairwise(pg_watch)]
        assert max(gaps) < WATCHDOG_USEC / 1e6, f"watchdog gaps {gaps}"
        assert 0.3 < statistics.median(gaps) < 0.75, f"watchdog gaps {gaps}"

        # SIGHUP with a changed file: RELOADING=1 + MONOTONIC_USEC, then READY=1
        # once the new configuration is in effect.
        pg.write({**cfg, "window": "2m"})
        sent = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        pg.send_signal(signal.SIGHUP)
        reloading, before = await asyncio.to_thread(sock.expect, "RELOADING")
        only_watchdogs(before, "before RELOADING=1")
        assert reloading.fields["RELOADING"] == "1", reloading
        assert set(reloading.fields) == {"RELOADING", "MONOTONIC_USEC"}, reloading
        received = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        # CLOCK_MONOTONIC is system-wide: the stamp lies between signal and receipt.
        assert sent <= int(reloading.fields["MONOTONIC_USEC"]) <= received, reloading
        ready, before = await asyncio.to_thread(sock.expect, "READY")
        only_watchdogs(before, "between RELOADING=1 and READY=1")
        assert ready.fields == {"READY": "1"}, ready
        metrics = await asyncio.to_thread(pg.get, "/metrics")
        assert 'passguard_config_reloads_total{outcome="success"} 1.0' in metrics
        # The snapshot (and so /v1/meshes) takes the new window at the next cycle.
        await asyncio.to_thread(wait_until, lambda: pg.get("/v1/meshes")["window_seconds"]
                                == 120, 5, "the reloaded window in /v1/meshes")

        # A refused file: the same pair, and the old configuration keeps running.
        pg.path.write_text("window: forever\n")
        pg.send_signal(signal.SIGHUP)
        _, before = await asyncio.to_thread(sock.expect, "RELOADING")
        only_watchdogs(before, "before the second RELOADING=1")
        ready, before = await asyncio.to_thread(sock.expect, "READY")
        only_watchdogs(before, "between the second RELOADING=1 and READY=1")
        metrics = await asyncio.to_thread(pg.get, "/metrics")
        assert 'passguard_config_reloads_total{outcome="failure"} 1.0' in metrics
        assert 'passguard_config_reloads_total{outcome="success"} 1.0' in metrics

        # SIGTERM: STOPPING=1, a clean exit, and nothing after STOPPING=1.
        pg.send_signal(signal.SIGTERM)
        stopping, before = await asyncio.to_thread(sock.expect, "STOPPING")
        only_watchdogs(before, "before STOPPING=1")
        assert stopping.fields == {"STOPPING": "1"}, stopping
        assert await asyncio.to_thread(pg.wait, 20) == 0, pg.log_tail()
        after = await asyncio.to_thread(sock.drain)
        assert not after, f"notifications after STOPPING=1: {[m.raw for m in after]}"

        # Every message came from the daemon's main PID (NotifyAccess=main).
        senders = {m.pid for m in sock.received}
        assert senders == {pg.pid}, (senders, pg.pid)
        assert "Traceback" not in pg.log.read_text()
    finally:
        await asyncio.to_thread(pg.close)
