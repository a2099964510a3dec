"""The connection cap and the listener that applies it at accept, on real
loopback sockets: counted from accept to loss, refused connections answered
and closed inside the accept callback (so they never hold a descriptor past
it), a failed TLS handshake gives its place back at once, and accept running
out of descriptors pauses listening instead of spinning.
(The cap against a real daemon under a tight RLIMIT_NOFILE:
tests/e2e/test_hostile_http.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web

from passguard import config, startup
from passguard.web import connections as connections_mod
from passguard.web import listener as listener_mod
from passguard.web.connections import PROBE_RESERVE, ConnectionCap
from passguard.web.listener import Listener


class Handler(asyncio.Protocol):
    def __init__(self) -> None:
        self.events: list[str] = []

    def connection_made(self, transport: Any) -> None:
        self.events.append("made")

    def data_received(self, data: bytes) -> None:
        self.events.append(f"data {data!r}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")


def test_counts_from_admission_to_loss_and_refuses_past_the_limit() -> None:
    handlers: list[Handler] = []
    refused = 0

    def server() -> Handler:
        handlers.append(Handler())
        return handlers[-1]

    def count() -> None:
        nonlocal refused
        refused += 1

    cap = ConnectionCap(server, 2, on_refused=count)  # type: ignore[arg-type]
    a, handshaking = cap.admit(), cap.admit()
    assert a is not None and handshaking is not None
    assert cap.open == 2 and len(handlers) == 2
    a.connection_made(object())  # type: ignore[arg-type]
    a.data_received(b"GET /")
    # Full: no handler for the third, and the refusal is counted.
    assert cap.admit() is None and refused == 1 and len(handlers) == 2
    a.connection_lost(None)
    assert handlers[0].events == ["made", "data b'GET /'", "lost"]
    assert cap.open == 1
    assert cap.admit() is not None  # the freed place is taken again
    assert cap.open == 2 and len(handlers) == 3
    # The handshaking one fails: the listener gives its place back.
    cap.abandon(handshaking)
    assert cap.open == 1 and handlers[1].events == []
    # A lowered limit on reload: open connections stay, new ones are refused.
    cap.resize(1)
    assert cap.admit() is None and refused == 2
    assert b"its limit of 1 (limits.max_connections)" in cap.answer


def test_fd_budget_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config.Config()
    need = cfg.limits.max_connections + cfg.scrape.concurrency + startup.FD_SPARE
    monkeypatch.setattr(startup.resource, "getrlimit", lambda which: (need, need))
    assert startup.fd_budget_warning(cfg) is None
    monkeypatch.setattr(startup.resource, "getrlimit", lambda which: (need - 1, need))
    warning = startup.fd_budget_warning(cfg)
    assert warning is not None and f"open-file limit ({need - 1})" in warning
    monkeypatch.setattr(startup.resource, "getrlimit",
                        lambda which: (startup.resource.RLIM_INFINITY,) * 2)
    assert startup.fd_budget_warning(cfg) is None


async def _hello(request: web.BaseRequest) -> web.Response:
    return web.Response(text="hello")


@contextlib.asynccontextmanager
async def serving(limit: int, tls: ssl.SSLContext | None = None,
                  handshake_timeout: float = 10.0, **cap_options: Any
                  ) -> AsyncIterator[tuple[Listener, ConnectionCap, list[int]]]:
    server = web.Server(_hello)
    refused = [0]

    def count() -> None:
        refused[0] += 1

    cap = ConnectionCap(server, limit, on_refused=count, **cap_options)
    lst = await Listener.open(cap, "127.0.0.1", 0, backlog=100, tls=tls,
                              tls_handshake_timeout=handshake_timeout)
    try:
        yield lst, cap, refused
    finally:
        lst.close()
        await lst.wait_closed()
        await server.shutdown(1)


async def _settles(cap: ConnectionCap, count: int) -> None:
    for _ in range(250):  # bounded: 5 s
        if cap.open == count:
            return
        await asyncio.sleep(0.02)
    assert cap.open == count


async def _get(host: str, port: int, tls: ssl.SSLContext | None = None) -> bytes:
    reader, writer = await asyncio.open_connection(host, port, ssl=tls)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


def _server_sockets(port: int) -> int:
    """Descriptors of this process that are accepted sockets on ``port``
    (the clients are in this process too, so count by local port)."""
    inodes = set()
    for line in Path("/proc/self/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, inode = fields[1], fields[3], fields[9]
        if int(local.split(":")[1], 16) == port and state != "0A":  # 0A: LISTEN
            inodes.add(inode)
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:[") and target[8:-1] in inodes:
                count += 1
    return count


async def test_refused_connections_hold_no_descriptor_past_the_accept() -> None:
    """A burst of 200 connections against a cap of 3. The accept callback is
    watched: at each accept the server holds at most the 3 admitted sockets
    (with create_server, refused ones were closed two turns of the loop
    later, and a burst held up to three batches of 100)."""
    async with serving(3) as (lst, cap, refused):
        port = lst.sockets[0].getsockname()[1]
        peak = 0
        real_admit = cap.admit

        def watched() -> asyncio.Protocol | None:
            nonlocal peak
            # The socket being accepted is the one extra: at most limit + 1.
            peak = max(peak, _server_sockets(port))
            return real_admit()

        cap.admit = watched  # type: ignore[method-assign]
        # Connect without the event loop's help, so the burst is real: all 200
        # are in the backlog before the listener's callback runs.
        clients = []
        for _ in range(200):
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", port))
            clients.append(s)
        try:
            for _ in range(100):  # bounded: every refusal counted within 5 s
                await asyncio.sleep(0.05)
                if refused[0] == 197:
                    break
            assert refused[0] == 197 and cap.open == 3
            assert peak <= 4, peak
            assert _server_sockets(port) == 3
            answers = []
            for s in clients:
                s.setblocking(True)
                s.settimeout(0.2)
                try:
                    answers.append(s.recv(4096))
                except TimeoutError:
                    answers.append(None)  # admitted: waiting for a request
            assert answers.count(None) == 3
            assert all(a is not None and a.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
                       and b"Retry-After: 1" in a and b"limits.max_connections" in a
                       for a in answers if a is not None)
            # An admitted connection is served; when it closes its place is free.
            held = [s for s, a in zip(clients, answers, strict=True) if a is None]
            held[0].sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            reply = await asyncio.to_thread(held[0].recv, 4096)
            assert reply.startswith(b"HTTP/1.1 200 OK") and reply.endswith(b"hello")
            held[0].close()
            await _settles(cap, 2)
            assert (await _get("127.0.0.1", port)).endswith(b"hello")
        finally:
            for s in clients:
                s.close()


@pytest.fixture(scope="module")
def tls_pair() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


async def test_tls_refusal_and_failed_handshakes(
        tls_pair: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    """Under TLS a connection past the cap is closed without a handshake
    (nothing can be said before one, and a flood's handshakes cost CPU); a
    handshake that fails, or never comes, gives its place back."""
    server_ctx, client_ctx = tls_pair
    async with serving(1, tls=server_ctx, handshake_timeout=0.5) as (lst, cap, refused):
        port = lst.sockets[0].getsockname()[1]
        # A client that never starts its handshake holds the one place...
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(0.1)
        assert cap.open == 1
        # ... so a TLS client now is closed at once, unanswered.
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port, ssl=client_ctx), 5)
        assert refused[0] == 1
        # The handshake timeout (0.5 s) ends the silent one and frees its place.
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        await _settles(cap, 0)
        # A client speaking plain HTTP to the TLS port: the handshake fails.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(reader.read(), 5)
        writer.close()
        await _settles(cap, 0)
        # And a real TLS client is served.
        assert (await _get("127.0.0.1", port, client_ctx)).endswith(b"hello")


class _Exhausted:
    """A listening socket whose accept() finds no descriptor left."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.calls = 0

    def fileno(self) -> int:
        return self.fd

    def accept(self) -> tuple[socket.socket, Any]:
        self.calls += 1
        raise OSError(errno.EMFILE, "Too many open files")


async def test_out_of_descriptors_pauses_accepting(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """EMFILE at accept: listening stops for ACCEPT_RETRY_DELAY (a socket that
    stays readable would otherwise spin the loop), says why, then resumes."""
    monkeypatch.setattr(listener_mod, "ACCEPT_RETRY_DELAY", 0.2)
    async with serving(5) as (lst, _cap, _refused):
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        try:
            fake = _Exhausted(a.fileno())
            b.send(b"x")  # keeps a readable, as a full backlog would
            lst._resume(fake)  # type: ignore[arg-type]
            await asyncio.sleep(0.1)
            assert fake.calls == 1  # once, not once per turn of the loop
            assert "cannot accept connections: [Errno 24] Too many open files" in caplog.text
            await asyncio.sleep(0.25)
            assert fake.calls == 2  # tried again after the delay
            loop.remove_reader(a.fileno())
        finally:
            a.close()
            b.close()


async def test_listens_on_every_address_of_the_host() -> None:
    """``[::1]:port`` is IPv6 (IPv6-only, as create_server did); a name binds
    every address it resolves to."""
    server = web.Server(_hello)
    cap = ConnectionCap(server, 10)
    six = await Listener.open(cap, "::1", 0, backlog=100, tls=None)
    try:
        assert [s.family for s in six.sockets] == [socket.AF_INET6]
        port = six.sockets[0].getsockname()[1]
        assert (await _get("::1", port)).endswith(b"hello")
    finally:
        six.close()
        await six.wait_closed()
    named = await Listener.open(cap, "localhost", 0, backlog=100, tls=None)
    try:
        expected = {info[4][0] for info in socket.getaddrinfo(
            "localhost", 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)}
        assert {s.getsockname()[0] for s in named.sockets} == expected
    finally:
        named.close()
        await named.wait_closed()
        await server.shutdown(1)


# -- idle sockets and probes (issue 13, finding 10) -----------------------------------------


async def _send(port: int, request: bytes, tls: ssl.SSLContext | None = None) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
    try:
        writer.write(request)
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


def _probe(path: str) -> tuple[int, str]:
    return (200, "passguard is healthy\n") if path == "/-/healthy" else (503, "not ready\n")


async def test_a_connection_that_says_nothing_is_closed_after_first_byte_timeout() -> None:
    silent = [0]

    def count() -> None:
        silent[0] += 1

    async with serving(4, first_byte_timeout=0.3, on_silent=count) as (lst, cap, _):
        port = lst.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            await _settles(cap, 1)
            start = asyncio.get_running_loop().time()
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
            assert asyncio.get_running_loop().time() - start < 2
        finally:
            writer.close()
        await _settles(cap, 0)
        assert silent == [1]
        # One that speaks in time is served as before.
        assert (await _get("127.0.0.1", port)).endswith(b"hello")
        assert silent == [1]


async def test_probes_are_answered_while_idle_sockets_fill_the_cap() -> None:
    """The finding: with max_connections 4, four idle sockets made /-/ready
    answer 503 for keepalive_timeout. Now a probe gets a reserved place and
    its answer; anything else there gets the cap's 503."""
    async with serving(4, first_byte_timeout=30, probe=_probe) as (lst, cap, refused):
        port = lst.sockets[0].getsockname()[1]
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
        try:
            await _settles(cap, 4)
            healthy = await _send(port, b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n")
            assert healthy.startswith(b"HTTP/1.1 200 OK\r\n")
            assert healthy.endswith(b"\r\n\r\npassguard is healthy\n")
            assert b"Connection: close" in healthy
            ready = await _send(port, b"GET /-/ready?verbose=1 HTTP/1.1\r\nHost: x\r\n\r\n")
            assert ready.startswith(b"HTTP/1.1 503 ") and ready.endswith(b"not ready\n")
            head = await _send(port, b"HEAD /-/healthy HTTP/1.1\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK") and head.endswith(b"\r\n\r\n")
            assert refused[0] == 0
            other = await _send(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert other.startswith(b"HTTP/1.1 503") and b"limits.max_connections" in other
            assert refused[0] == 1
            # Silent sockets on the reserved places make room for a newer one.
            lurkers = [await asyncio.open_connection("127.0.0.1", port) for _ in range(6)]
            try:
                await asyncio.sleep(0.1)
                assert cap.reserved <= PROBE_RESERVE
                healthy = await _send(port, b"GET /-/healthy HTTP/1.1\r\n\r\n")
                assert healthy.startswith(b"HTTP/1.1 200 OK")
            finally:
                for _, w in lurkers:
                    w.close()
            await _settles(cap, 4)  # the cap's own places were never touched
        finally:
            for _, w in idle:
                w.close()
        await _settles(cap, 0)
        for _ in range(100):
            if cap.reserved == 0:
                break
            await asyncio.sleep(0.02)
        assert cap.reserved == 0


async def test_a_silent_reserved_place_is_given_back_at_its_deadline(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connections_mod, "PROBE_DEADLINE", 0.3)
    async with serving(1, first_byte_timeout=30, probe=_probe) as (lst, cap, _):
        port = lst.sockets[0].getsockname()[1]
        _, held = await asyncio.open_connection("127.0.0.1", port)
        try:
            await _settles(cap, 1)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            # Given back with the cap's 503, as a connection past it gets at accept.
            answer = await asyncio.wait_for(reader.read(), 5)
            assert answer.startswith(b"HTTP/1.1 503") and b"limits.max_connections" in answer
            writer.close()
            assert cap.reserved == 0
        finally:
            held.close()


async def test_probes_over_tls_while_the_cap_is_full(
        tls_pair: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_ctx, client_ctx = tls_pair
    async with serving(1, tls=server_ctx, first_byte_timeout=30, probe=_probe) as (
            lst, cap, _):
        port = lst.sockets[0].getsockname()[1]
        _, held = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
        try:
            await _settles(cap, 1)
            healthy = await _send(port, b"GET /-/healthy HTTP/1.1\r\n\r\n", client_ctx)
            assert healthy.startswith(b"HTTP/1.1 200 OK")
        finally:
            held.close()
