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
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from aiohttp import web


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

    __slots__ = ("_cap", "_inner")

    def __init__(self, inner: Any, cap: ConnectionCap) -> None:
        self._inner = inner
        self._cap = cap

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


class ConnectionCap:
    """Counts open connections; admits new ones while under ``limit``."""

    def __init__(self, server: web.Server, limit: int,
                 on_refused: Callable[[], None] = lambda: None) -> None:
        self._server = server
        self.limit = limit
        self._on_refused = on_refused
        self.answer = refusal(limit)
        self._open: set[_Counted] = set()
        self._pending: set[_Counted] = set()  # admitted, not yet made (TLS handshake)

    def resize(self, limit: int) -> None:
        """A reload: connections over a lowered limit stay until they close."""
        self.limit = limit
        self.answer = refusal(limit)

    @property
    def open(self) -> int:
        return len(self._open) + len(self._pending)

    def admit(self) -> asyncio.Protocol | None:
        """aiohttp's handler for a connection just accepted, counted from
        now; or None (and a refusal counted) when ``limit`` are open."""
        if self.open >= self.limit:
            self._on_refused()
            return None
        proto = _Counted(self._server(), self)
        self._pending.add(proto)
        return proto

    def abandon(self, proto: asyncio.Protocol) -> None:
        """The connection of ``proto`` never started: its place is free."""
        if isinstance(proto, _Counted):
            self._lost(proto)

    def _made(self, proto: _Counted) -> None:
        self._pending.discard(proto)
        self._open.add(proto)

    def _lost(self, proto: _Counted) -> None:
        self._pending.discard(proto)
        self._open.discard(proto)


__all__ = ["ConnectionCap", "refusal"]
