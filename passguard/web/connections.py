"""A cap on the HTTP connections passguard holds open (``limits.max_connections``).

aiohttp has no connection limit: every accepted socket gets a handler until
``keepalive_timeout`` closes it. Thousands of idle connections would take the
file descriptors the scraper needs for the proxies (one per scrape in
flight), and with them the evidence. :class:`ConnectionCap` does the
counting; the listener (:mod:`passguard.web.listener`) asks it at each
accept, and a connection it does not admit is answered ``503`` and closed
there and then, without reading anything.

A connection counts from its accept until it is lost, or until its start
fails (a TLS handshake that fails or times out), which the listener reports.
One that sends nothing within ``limits.first_byte_timeout`` of its start is
closed: idle sockets held their places for ``keepalive_timeout`` (75 s), and
four of them made a cap of four answer every probe with 503.

Probes get places of their own (``PROBE_RESERVE``): while the cap is full, a
new connection takes one of them, and may only ask ``GET /-/healthy`` or
``GET /-/ready``; it is answered here, from ``probe``, without aiohttp, and
closed. Anything else on such a place gets the 503 the cap gives. A reserved
place is held ``PROBE_DEADLINE`` at most, and when all are taken the oldest
that has said nothing yet makes room (it gets that 503 then), so silent
sockets cannot keep the probes out either. (Why reserved places and not a listener of their own:
docs/security.md, "Connections and probes".)
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

#: Places for probes beyond ``limit``; what a kubelet or systemd needs at once.
PROBE_RESERVE = 4
#: A reserved place is given back after this, TLS handshake included: a
#: probe's request comes within a round trip of its connect.
PROBE_DEADLINE = 2.0
PROBE_PATHS = frozenset({"/-/healthy", "/-/ready"})
#: A probe's request line is shorter than this; longer is not a probe.
_PROBE_LINE = 1024

Probe = Callable[[str], tuple[int, str]]


def _loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # driven by hand, outside a loop (unit tests)
        return None


def answer(status: int, body: str, head_only: bool = False) -> bytes:
    """A complete HTTP/1.1 response that closes the connection."""
    data = body.encode()
    reason = {200: "OK", 503: "Service Unavailable"}.get(status, "Unknown")
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode() + (
                b"" if head_only else data)


def refusal(limit: int) -> bytes:
    body = json.dumps({"error": "passguard holds as many open connections as its limit of "
                                f"{limit} (limits.max_connections); try again later"}).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\n"
            b"Content-Type: application/json\r\n"
            b"Retry-After: 1\r\n"
            b"Connection: close\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class _Counted(asyncio.Protocol):
    """aiohttp's handler (slotted, so not patchable), with its end reported."""

    __slots__ = ("_cap", "_inner", "_timer")

    def __init__(self, inner: Any, cap: ConnectionCap) -> None:
        self._inner = inner
        self._cap = cap
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._cap._made(self)
        self._inner.connection_made(transport)
        if (loop := _loop()) is not None:
            self._timer = loop.call_later(self._cap.first_byte_timeout, self._silent,
                                          transport)

    def _silent(self, transport: asyncio.BaseTransport) -> None:
        self._timer = None
        self._cap._on_silent()
        transport.close()

    def data_received(self, data: bytes) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        result: bool | None = self._inner.eof_received()
        return result

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._cap._lost(self)
        self._inner.connection_lost(exc)


class Reserved(asyncio.Protocol):
    """A connection on a probe's place: reads one request line, answers a
    probe from ``ConnectionCap.probe`` or refuses like the full cap, closes."""

    def __init__(self, cap: ConnectionCap) -> None:
        self._cap = cap
        self.since = time.monotonic()
        self.heard = False
        self._buffer = b""
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        if (loop := _loop()) is not None:
            left = max(0.0, PROBE_DEADLINE - (time.monotonic() - self.since))
            self._timer = loop.call_later(left, self.evict)

    @property
    def made(self) -> bool:
        return self._transport is not None

    def evict(self) -> None:
        """Give the place back now (deadline, or room for a newer probe),
        with the 503 a connection past the cap gets at accept."""
        if self._transport is not None and not self._transport.is_closing():
            self._reply(self._cap.answer, refused=True)

    def data_received(self, data: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        self.heard = True
        self._buffer += data
        line, found, _ = self._buffer.partition(b"\r\n")
        if not found:
            if len(self._buffer) > _PROBE_LINE:
                self._reply(self._cap.answer, refused=True)
            return
        parts = line.decode("latin-1").split(" ")
        path = parts[1].partition("?")[0] if len(parts) == 3 else ""
        if parts[0] in ("GET", "HEAD") and path in PROBE_PATHS and self._cap.probe is not None:
            status, body = self._cap.probe(path)
            self._reply(answer(status, body, head_only=parts[0] == "HEAD"), refused=False)
        else:
            self._reply(self._cap.answer, refused=True)

    def _reply(self, data: bytes, refused: bool) -> None:
        assert self._transport is not None
        if refused:
            self._cap._on_refused()
        self._transport.write(data)
        self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._cap._reserve_lost(self)


class ConnectionCap:
    """Counts open connections; admits new ones while under ``limit``, and
    probes on ``PROBE_RESERVE`` places beyond it."""

    def __init__(self, server: web.Server, limit: int,
                 on_refused: Callable[[], None] = lambda: None, *,
                 first_byte_timeout: float = 5.0, probe: Probe | None = None,
                 on_silent: Callable[[], None] = lambda: None) -> None:
        self._server = server
        self.limit = limit
        self._on_refused = on_refused
        self._on_silent = on_silent
        self.first_byte_timeout = first_byte_timeout
        #: ``path -> (status, body)`` for the probes; None: no reserved places.
        self.probe = probe
        self.answer = refusal(limit)
        self._open: set[_Counted] = set()
        self._pending: set[_Counted] = set()  # admitted, not yet made (TLS handshake)
        self._reserved: dict[Reserved, None] = {}  # oldest first

    def resize(self, limit: int, first_byte_timeout: float | None = None) -> None:
        """A reload: connections over a lowered limit stay until they close."""
        self.limit = limit
        self.answer = refusal(limit)
        if first_byte_timeout is not None:
            self.first_byte_timeout = first_byte_timeout

    @property
    def reserved(self) -> int:
        return len(self._reserved)

    @property
    def open(self) -> int:
        return len(self._open) + len(self._pending)

    def admit(self) -> asyncio.Protocol | None:
        """aiohttp's handler for a connection just accepted, counted from
        now; or None (and a refusal counted) when ``limit`` are open."""
        if self.open >= self.limit:
            if self.probe is not None and (reserved := self._reserve()) is not None:
                return reserved
            self._on_refused()
            return None
        proto = _Counted(self._server(), self)
        self._pending.add(proto)
        return proto

    def _reserve(self) -> Reserved | None:
        if len(self._reserved) >= PROBE_RESERVE:
            # The oldest that has said nothing makes room: a probe speaks
            # at once, so silent sockets cannot keep the places.
            # (Under TLS, one still in its handshake is left to the
            # handshake's own deadline: the listener holds its socket.)
            silent = next((r for r in self._reserved if r.made and not r.heard), None)
            if silent is None:
                return None
            silent.evict()
            self._reserved.pop(silent, None)
        proto = Reserved(self)
        self._reserved[proto] = None
        return proto

    def abandon(self, proto: asyncio.Protocol) -> None:
        """The connection of ``proto`` never started: its place is free."""
        if isinstance(proto, _Counted):
            self._lost(proto)
        elif isinstance(proto, Reserved):
            self._reserve_lost(proto)

    def _reserve_lost(self, proto: Reserved) -> None:
        self._reserved.pop(proto, None)

    def _made(self, proto: _Counted) -> None:
        self._pending.discard(proto)
        self._open.add(proto)

    def _lost(self, proto: _Counted) -> None:
        self._pending.discard(proto)
        self._open.discard(proto)


__all__ = ["PROBE_DEADLINE", "PROBE_PATHS", "PROBE_RESERVE", "ConnectionCap", "Reserved",
           "answer", "refusal"]
