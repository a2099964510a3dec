"""A raw TCP server that answers like a broken Envoy admin, one way per path prefix.

``http://127.0.0.1:PORT/<mode>`` is the admin base URL of a "proxy" that
misbehaves as ``MODES[mode]`` says; passguard appends ``/stats`` (or
``/clusters``). It is raw asyncio, not aiohttp, so it can break HTTP itself:
announce more body than it sends, reset the connection, trickle bytes, send
no status line at all.

``/ctl/<name>`` is a *controlled* proxy: its counters and its behaviour are set
by the test (``proxies.control(name, cx_total=5)``,
``proxies.control(name, mode="status503")``), so one target can go from good
to broken and back.

Every handler is bounded in time (``MAX_SECONDS``) and bytes: a test that
forgets to stop the server cannot leave a stream running for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import struct
import time
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

MAX_SECONDS = 20.0
MAX_STREAM_BYTES = 256 * 1024 * 1024
CLUSTER = "outbound_passthrough_ipv4"


def envoy_stats(uptime: int, cx_total: int = 0, cx_active: int = 0,
                counter_text: str | None = None) -> bytes:
    """What Envoy answers to passguard's filtered ``/stats`` (sorted, one stat a line)."""
    total = counter_text if counter_text is not None else str(cx_total)
    return (f"cluster.{CLUSTER}.upstream_cx_active: {cx_active}\n"
            f"cluster.{CLUSTER}.upstream_cx_total: {total}\n"
            f"server.uptime: {uptime}\n").encode()


def _head(status: str, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def response(body: bytes, status: str = "200 OK", content_type: str = "text/plain",
             **extra: str) -> bytes:
    headers = {"Content-Type": content_type, "Content-Length": str(len(body)),
               "Connection": "close", **{k.replace("_", "-"): v for k, v in extra.items()}}
    return _head(status, headers) + body


@dataclass
class Controlled:
    """A proxy whose counters and behaviour the test sets."""

    cx_total: int = 0
    cx_active: int = 0
    # Envoy's server.uptime follows a monotonic clock: a wall-clock jump on
    # the host does not move it (tests/e2e/test_crash.py relies on that).
    booted: float = field(default_factory=time.monotonic)
    mode: str = "ok"  # any name of MODES, e.g. "status503" while it is "broken"

    def stats(self) -> bytes:
        return envoy_stats(int(time.monotonic() - self.booted), self.cx_total,
                           self.cx_active)


Handler = Callable[["HostileProxies", "Request"], Awaitable[None]]


@dataclass
class Request:
    mode: str
    path: str
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    controlled: Controlled | None = None

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def stats(self) -> bytes:
        if self.controlled is not None:
            return self.controlled.stats()
        return envoy_stats(uptime=3600)


# --------------------------------------------------------------------------- behaviours


async def _ok(srv: HostileProxies, req: Request) -> None:
    await req.send(response(req.stats()))


async def _hang(srv: HostileProxies, req: Request) -> None:
    # Reads the request, never answers; the connection stays open.
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        await req.reader.read(1)  # returns at EOF: the client gave up


async def _reset(srv: HostileProxies, req: Request) -> None:
    sock = req.writer.get_extra_info("socket")
    # SO_LINGER 0: close() sends a TCP RST instead of a FIN.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    req.writer.transport.abort()


async def _close(srv: HostileProxies, req: Request) -> None:
    req.writer.close()  # a FIN, no answer


async def _status503(srv: HostileProxies, req: Request) -> None:
    await req.send(response(b"upstream connect error or disconnect/reset before headers\n",
                            "503 Service Unavailable"))


async def _redirect(srv: HostileProxies, req: Request) -> None:
    await req.send(response(b"", "302 Found", Location="http://169.254.169.254/latest/"))


async def _truncated(srv: HostileProxies, req: Request) -> None:
    body = req.stats()
    head = _head("200 OK", {"Content-Type": "text/plain", "Content-Length": str(len(body) + 900)})
    await req.send(head + body)  # 900 bytes short, then a FIN


async def _truncated_chunked(srv: HostileProxies, req: Request) -> None:
    head = _head("200 OK", {"Content-Type": "text/plain", "Transfer-Encoding": "chunked"})
    body = req.stats()
    await req.send(head + f"{len(body):x}\r\n".encode() + body + b"\r\n")  # no last chunk


async def _stream(req: Request, chunked: bool, pause: float = 0.0) -> None:
    line = f"cluster.{CLUSTER}.upstream_cx_total: 1\n".encode() * 1024
    chunk = f"{len(line):x}\r\n".encode() + line + b"\r\n" if chunked else line
    headers = {"Content-Type": "text/plain"}
    headers.update({"Transfer-Encoding": "chunked"} if chunked else {"Connection": "close"})
    first = b"server.uptime: 5\n"
    if chunked:
        first = f"{len(first):x}\r\n".encode() + first + b"\r\n"
    await req.send(_head("200 OK", headers) + first)
    sent = 0
    deadline = time.monotonic() + MAX_SECONDS
    while sent < MAX_STREAM_BYTES and time.monotonic() < deadline:
        await req.send(chunk)
        sent += len(chunk)
        if pause:
            await asyncio.sleep(pause)


async def _endless_chunked(srv: HostileProxies, req: Request) -> None:
    await _stream(req, chunked=True)


async def _endless(srv: HostileProxies, req: Request) -> None:
    await _stream(req, chunked=False)  # no length: the body runs until the close


async def _endless_slow(srv: HostileProxies, req: Request) -> None:
    # ~2 MB/s: several of these are being read at the same time.
    await _stream(req, chunked=False, pause=0.02)


async def _huge_announced(srv: HostileProxies, req: Request) -> None:
    head = _head("200 OK", {"Content-Type": "text/plain", "Content-Length": str(10 * 1024**3)})
    await req.send(head + req.stats())
    await _hang(srv, req)


async def _slow(srv: HostileProxies, req: Request) -> None:
    # A complete, valid answer, one byte every 50 ms: ~6 s for the whole of it.
    data = response(req.stats())
    deadline = time.monotonic() + MAX_SECONDS
    for i in range(len(data)):
        if time.monotonic() > deadline:
            return
        await req.send(data[i:i + 1])
        await asyncio.sleep(0.05)


async def _slow_headers(srv: HostileProxies, req: Request) -> None:
    await req.send(b"HTTP/1.1 200 OK\r\n")
    deadline = time.monotonic() + MAX_SECONDS
    while time.monotonic() < deadline:
        await req.send(b"X")  # a header line that never ends
        await asyncio.sleep(0.05)


async def _garbage(srv: HostileProxies, req: Request) -> None:
    rnd = random.Random(6)  # reproducible garbage, not crypto
    await req.send(response(bytes(rnd.getrandbits(8) for _ in range(4096)),
                            content_type="application/octet-stream"))


async def _not_http(srv: HostileProxies, req: Request) -> None:
    rnd = random.Random(7)
    await req.send(b"SSH-2.0-OpenSSH_9.6\r\n" + bytes(rnd.getrandbits(8) for _ in range(512)))
    req.writer.close()


async def _bad_content_length(srv: HostileProxies, req: Request) -> None:
    body = req.stats()
    await req.send(_head("200 OK", {"Content-Length": "12abc"}) + body)


async def _html(srv: HostileProxies, req: Request) -> None:
    await req.send(response(b"<html><body><h1>It works!</h1></body></html>\n",
                            content_type="text/html"))


async def _json(srv: HostileProxies, req: Request) -> None:
    # Envoy's /stats?format=json, where passguard asked for text.
    doc = {"stats": [{"name": "server.uptime", "value": 3600},
                     {"name": f"cluster.{CLUSTER}.upstream_cx_total", "value": 0}]}
    await req.send(response(json.dumps(doc).encode(), content_type="application/json"))


async def _prometheus(srv: HostileProxies, req: Request) -> None:
    # Envoy's /stats/prometheus, where passguard expects Envoy's text format.
    body = (b"# TYPE envoy_server_uptime gauge\nenvoy_server_uptime{} 3600\n"
            b"# TYPE envoy_cluster_upstream_cx_total counter\n"
            b'envoy_cluster_upstream_cx_total{envoy_cluster_name="outbound_passthrough_ipv4"} 0\n')
    await req.send(response(body, content_type="text/plain; version=0.0.4"))


async def _empty(srv: HostileProxies, req: Request) -> None:
    await req.send(response(b""))


#: What an internal service (not a proxy) answers in the "internal_*" modes: a
#: secret, and control characters that could forge a log line or drive a terminal.
SECRET = b"INTERNAL-SECRET-7f3a9"
INTERNAL_BODY = b"root:x:0:0:" + SECRET + b"\x1b[2J\nFAKE 2024 WARNING forged line\n" + b"x" * 4096


async def _internal_200(srv: HostileProxies, req: Request) -> None:
    await req.send(response(INTERNAL_BODY))


async def _internal_503(srv: HostileProxies, req: Request) -> None:
    await req.send(response(INTERNAL_BODY, "503 Service Unavailable"))


async def _internal_banner(srv: HostileProxies, req: Request) -> None:
    # Not HTTP at all (SSH, Redis, SMTP greet first): aiohttp's parser quotes it.
    await req.send(SECRET + b" ESMTP ready\r\n" + INTERNAL_BODY)
    req.writer.close()


_BOMB: bytes | None = None


def gzip_bomb() -> bytes:
    """80 MiB of zeros, gzipped to about 80 KiB (computed once, 1 MiB at a time)."""
    global _BOMB
    if _BOMB is None:
        z = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # gzip framing
        zeros = b"\0" * (1024 * 1024)
        _BOMB = b"".join(z.compress(zeros) for _ in range(80)) + z.flush()
    return _BOMB


async def _gzip_bomb(srv: HostileProxies, req: Request) -> None:
    await req.send(response(gzip_bomb(), Content_Encoding="gzip"))


async def _counter_5000_digits(srv: HostileProxies, req: Request) -> None:
    # Over Python's 4,300-digit limit of int(str): int() raises ValueError.
    await req.send(response(envoy_stats(3600, counter_text="9" * 5000)))


async def _counter_400_digits(srv: HostileProxies, req: Request) -> None:
    # An int() that works but does not fit a float (Prometheus values are floats).
    await req.send(response(envoy_stats(3600, counter_text="9" * 400)))


async def _clusters_5000_digits(srv: HostileProxies, req: Request) -> None:
    # Good /stats; a /clusters host counter over int()'s 4,300-digit limit.
    if "/clusters" not in req.path:
        return await _ok(srv, req)
    body = (b"outbound:passthrough:ipv4::added_via_api::true\n"
            b"outbound:passthrough:ipv4::93.184.216.34:443::cx_total::" + b"9" * 5000 + b"\n")
    await req.send(response(body))


async def _clusters_json_inf(srv: HostileProxies, req: Request) -> None:
    # Good /stats; /clusters as JSON whose counter is 1e400 (infinity for json.loads).
    if "/clusters" not in req.path:
        return await _ok(srv, req)
    body = (b'{"cluster_statuses": [{"name": "outbound:passthrough:ipv4", "host_statuses": '
            b'[{"address": {"socket_address": {"address": "93.184.216.34", "port_value": 443}},'
            b' "stats": [{"name": "cx_total", "value": 1e400}]}]}]}')
    await req.send(response(body, content_type="application/json"))


MODES: dict[str, Handler] = {
    "ok": _ok,
    "hang": _hang,
    "reset": _reset,
    "close": _close,
    "status503": _status503,
    "redirect": _redirect,
    "truncated": _truncated,
    "truncated_chunked": _truncated_chunked,
    "endless": _endless,
    "endless_chunked": _endless_chunked,
    "endless_slow": _endless_slow,
    "huge_announced": _huge_announced,
    "slow": _slow,
    "slow_headers": _slow_headers,
    "garbage": _garbage,
    "not_http": _not_http,
    "bad_content_length": _bad_content_length,
    "html": _html,
    "json": _json,
    "prometheus": _prometheus,
    "empty": _empty,
    "gzip_bomb": _gzip_bomb,
    "counter_5000_digits": _counter_5000_digits,
    "counter_400_digits": _counter_400_digits,
    "clusters_5000_digits": _clusters_5000_digits,
    "clusters_json_inf": _clusters_json_inf,
    "internal_200": _internal_200,
    "internal_503": _internal_503,
    "internal_banner": _internal_banner,
}


# --------------------------------------------------------------------------- the server


class HostileProxies:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.hits: Counter[str] = Counter()
        self.open: Counter[str] = Counter()  # connections open now, per mode
        self.controlled: dict[str, Controlled] = {}
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    def url(self, mode: str) -> str:
        if mode not in MODES:
            raise KeyError(mode)
        return f"http://{self.host}:{self.port}/{mode}"

    def control(self, name: str, **changes: object) -> Controlled:
        """``/ctl/<name>``: create it, or change its counters / ``mode``."""
        c = self.controlled.setdefault(name, Controlled())
        for key, value in changes.items():
            if not hasattr(c, key):
                raise AttributeError(key)
            setattr(c, key, value)
        if c.mode not in MODES:
            raise KeyError(c.mode)
        return c

    def ctl_url(self, name: str) -> str:
        self.control(name)
        return f"http://{self.host}:{self.port}/ctl/{name}"

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        """Listen (again on the same port after ``stop()``: a proxy that comes back)."""
        if self._server is not None:
            return
        # Built before serving: compressing 80 MiB in the event loop would stall
        # the daemon under test, which shares this loop.
        await asyncio.to_thread(gzip_bomb)
        self._server = await asyncio.start_server(self._serve, self.host, self.port,
                                                  reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Down: the port refuses connections and open ones are cut."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for w in list(self._writers):
            w.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        mode = "?"
        try:
            async with asyncio.timeout(MAX_SECONDS + 5):
                head = await reader.readuntil(b"\r\n\r\n")
                target = head.split(b"\r\n", 1)[0].split(b" ")[1].decode("latin-1")
                parts = target.split("?", 1)[0].split("/")
                controlled = None
                if len(parts) > 2 and parts[1] == "ctl":
                    controlled = self.control(parts[2])
                    mode = controlled.mode
                else:
                    mode = parts[1] if len(parts) > 1 else "?"
                self.hits[mode] += 1
                self.open[mode] += 1
                try:
                    handler = MODES.get(mode)
                    if handler is None:
                        await Request(mode, target, reader, writer).send(
                            response(b"no such mode\n", "404 Not Found"))
                    else:
                        await handler(self, Request(mode, target, reader, writer, controlled))
                finally:
                    self.open[mode] -= 1
            # A graceful close: what was written is delivered before the FIN.
            writer.close()
            async with asyncio.timeout(2):
                await writer.wait_closed()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError, IndexError):
            pass
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.transport.abort()  # no-op when already closed
