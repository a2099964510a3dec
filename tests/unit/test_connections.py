"""The connection cap's bookkeeping: counted from accept to loss; a TLS
handshake that never completes stops counting after the handshake timeout.
(The cap against a real daemon: tests/e2e/test_hostile_http.py.)"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from passguard import app, config
from passguard.web import connections
from passguard.web.connections import ConnectionCap


class Handler(asyncio.Protocol):
    def __init__(self) -> None:
        self.events: list[str] = []

    def connection_made(self, transport: Any) -> None:
        self.events.append("made")

    def data_received(self, data: bytes) -> None:
        self.events.append(f"data {data!r}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")


class Transport(asyncio.WriteTransport):
    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.closed = False

    def write(self, data: Any) -> None:
        self.written += bytes(data)

    def close(self) -> None:
        self.closed = True


def test_counts_from_accept_to_loss_and_refuses_past_the_limit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(connections.time, "monotonic", lambda: clock[0])
    handlers: list[Handler] = []
    refused = 0

    def server() -> Handler:
        handlers.append(Handler())
        return handlers[-1]

    def count() -> None:
        nonlocal refused
        refused += 1

    cap = ConnectionCap(server, 2, handshake_timeout=10.0, on_refused=count)  # type: ignore[arg-type]
    a, _stalled = cap(), cap()
    assert cap.open == 2 and len(handlers) == 2
    a.connection_made(Transport())
    a.data_received(b"GET /")
    # Full: the third is answered 503 and closed, and aiohttp never sees it.
    t = Transport()
    cap().connection_made(t)
    assert t.closed and t.written.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"limits.max_connections" in t.written and refused == 1 and len(handlers) == 2
    a.connection_lost(None)
    assert handlers[0].events == ["made", "data b'GET /'", "lost"]
    assert cap.open == 1
    cap()  # the freed place is taken again
    assert cap.open == 2 and len(handlers) == 3
    # _stalled never completes its TLS handshake: asyncio aborts it after the timeout
    # without telling the protocol. Past timeout + slack it stops counting.
    clock[0] += 10.5
    cap()
    assert refused == 2
    clock[0] += 1.0
    cap()
    assert refused == 2 and len(handlers) == 4
    assert handlers[1].events == []
    # A lowered limit on reload: open connections stay, new ones are refused.
    cap.resize(1)
    t = Transport()
    cap().connection_made(t)
    assert refused == 3 and b"its limit of 1 (limits.max_connections)" in t.written


def test_fd_budget_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config.Config()
    need = (cfg.limits.max_connections + cfg.scrape.concurrency + app.LISTEN_BACKLOG
            + app.FD_SPARE)
    monkeypatch.setattr(app.resource, "getrlimit", lambda which: (need, need))
    assert app.fd_budget_warning(cfg) is None
    monkeypatch.setattr(app.resource, "getrlimit", lambda which: (need - 1, need))
    warning = app.fd_budget_warning(cfg)
    assert warning is not None and f"open-file limit ({need - 1})" in warning
    monkeypatch.setattr(app.resource, "getrlimit",
                        lambda which: (app.resource.RLIM_INFINITY,) * 2)
    assert app.fd_budget_warning(cfg) is None
