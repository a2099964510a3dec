"""A cap on the HTTP connections passguard holds open (``limits.max_connections``).

aiohttp has no connection limit: every accepted socket gets a handler until
``keepalive_timeout`` closes it. Thousands of idle connections would take the
file descriptors the scraper needs for the proxies (one per scrape in
flight), and with them the evidence. :class:`ConnectionCap` is the protocol
factory given to ``loop.create_server``: while ``limit`` connections are open
it answers a new one with ``503`` and closes it, without reading anything.

A connection counts from its accept until it is lost. Under TLS the
handshake comes between the two; asyncio never reports a handshake that
fails, so a connection still handshaking after ``handshake_timeout`` (after
which asyncio has aborted it) stops counting.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

#: Past asyncio's own handshake timeout: by then the handshake ended one way or
#: the other.
_HANDSHAKE_SLACK = 1.0


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

    __slots__ = ("_cap", "_inner", "accepted")

    def __init__(self, inner: Any, cap: ConnectionCap) -> None:
        self._inner = inner
        self._cap = cap
        self.accepted = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._cap._made(self)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        result: bool | None = self._inner.eof_received()
        return result

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cap._lost(self)
        self._inner.connection_lost(exc)


class _Refused(asyncio.Protocol):
    def __init__(self, answer: bytes) -> None:
        self._answer = answer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(self._answer)
        transport.close()


class ConnectionCap:
    """Protocol factory: aiohttp's handler while under ``limit`` connections."""

    def __init__(self, server: web.Server, limit: int, handshake_timeout: float,
                 on_refused: Callable[[], None] = lambda: None) -> None:
        self._server = server
        self.limit = limit
        self._handshake = handshake_timeout + _HANDSHAKE_SLACK
        self._on_refused = on_refused
        self._answer = refusal(limit)
        self._open: set[_Counted] = set()
        self._pending: set[_Counted] = set()  # accepted, not yet made (TLS handshake)

    def resize(self, limit: int) -> None:
        """A reload: connections over a lowered limit stay until they close."""
        self.limit = limit
        self._answer = refusal(limit)

    @property
    def open(self) -> int:
        return len(self._open) + len(self._pending)

    def __call__(self) -> asyncio.BaseProtocol:
        if self.open >= self.limit and self._pending:
            oldest = time.monotonic() - self._handshake
            self._pending = {p for p in self._pending if p.accepted > oldest}
        if self.open >= self.limit:
            self._on_refused()
            return _Refused(self._answer)
        proto = _Counted(self._server(), self)
        self._pending.add(proto)
        return proto

    def _made(self, proto: _Counted) -> None:
        self._pending.discard(proto)
        self._open.add(proto)

    def _lost(self, proto: _Counted) -> None:
        self._pending.discard(proto)
        self._open.discard(proto)


__all__ = ["ConnectionCap", "refusal"]
