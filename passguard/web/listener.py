"""passguard's listening sockets, with the connection cap applied at accept.

``loop.create_server`` accepts up to its backlog (100) connections per turn
of the loop and hands each to the protocol factory only on a later turn;
a refused connection is written to and closed one or two turns after that.
Under a flood that kept up to three batches (300 descriptors) open beyond
the cap, and a daemon near its ``RLIMIT_NOFILE`` hit ``EMFILE``, after which
asyncio stops accepting for a whole second — the very starvation the cap is
there to prevent (a clean-clone CI run saw it: 150 of 300 flood connections
were taken, then nothing for a second).

Here the accept callback decides: a connection past the cap is answered and
closed before the callback returns, so refused connections never hold a
descriptor, and an admitted one is counted from that moment (before its
protocol exists), so no batch can overshoot the cap. Admitted connections go
to ``loop.connect_accepted_socket``; its failure (a TLS handshake that fails
or times out) is seen here and the place is given back at once. A connection
on one of the probes' reserved places (``connections.Reserved``) is handled
the same way, with a shorter handshake deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl as ssl_mod
import time

from passguard.errors import PassguardError
from passguard.web.connections import PROBE_DEADLINE, ConnectionCap, Reserved

log = logging.getLogger(__name__)

#: What asyncio does when accept() runs out of descriptors or memory: stop
#: listening for a moment instead of spinning on a socket that stays readable.
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
ACCEPT_RETRY_DELAY = 1.0
#: The refusal's log line at most this often (a flood refuses thousands).
_LOG_EVERY = 10.0


def _refuse(conn: socket.socket, answer: bytes | None) -> None:
    """Answer (plain HTTP only) and close, all before the accept callback
    returns. The answer fits in the empty send buffer of a new socket."""
    with contextlib.suppress(OSError):
        conn.setblocking(False)
        if answer is not None:
            conn.send(answer)
            conn.shutdown(socket.SHUT_WR)
            # What the client already sent: unread data at close() turns the
            # FIN into a RST, which can destroy the 503 before it is read.
            conn.recv(65536)
    conn.close()


class Listener:
    """Listening sockets for ``host:port`` whose accepts go through ``cap``."""

    def __init__(self, cap: ConnectionCap, sockets: list[socket.socket], *, backlog: int,
                 tls: ssl_mod.SSLContext | None, tls_handshake_timeout: float) -> None:
        self._cap = cap
        self.sockets = sockets
        self._batch = backlog
        self._tls = tls
        self._handshake_timeout = tls_handshake_timeout
        self._loop = asyncio.get_running_loop()
        self._starting: set[asyncio.Task[None]] = set()
        self._closed = False
        self._last_log = 0.0
        for sock in sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    @classmethod
    async def open(cls, cap: ConnectionCap, host: str, port: int, *, backlog: int,
                   tls: ssl_mod.SSLContext | None = None,
                   tls_handshake_timeout: float = 10.0) -> Listener:
        """Bind every address ``host`` resolves to (as ``create_server``
        does: IPv6 sockets IPv6-only, so ``localhost`` takes both families)."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        sockets: list[socket.socket] = []
        try:
            for family, kind, proto, _name, address in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind(address)
                except OSError as exc:
                    where = f"[{address[0]}]" if family == socket.AF_INET6 else address[0]
                    raise PassguardError(f"listen: cannot listen on {where}:{port}: "
                                         f"{exc.strerror}") from None
                sock.listen(backlog)
                sock.setblocking(False)
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        return cls(cap, sockets, backlog=backlog, tls=tls,
                   tls_handshake_timeout=tls_handshake_timeout)

    def set_tls(self, tls: ssl_mod.SSLContext) -> None:
        """Handshakes from now on use ``tls`` (a reloaded certificate);
        connections already open keep the context they started with."""
        self._tls = tls

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(self._batch):
            try:
                conn, _address = sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    log.error("cannot accept connections: %s; trying again in %.0f s",
                              exc, ACCEPT_RETRY_DELAY)
                    self._loop.remove_reader(sock.fileno())
                    self._loop.call_later(ACCEPT_RETRY_DELAY, self._resume, sock)
                else:
                    log.warning("accept failed: %s", exc)
                return
            proto = self._cap.admit()
            if proto is None:
                # Under TLS nothing can be said before a handshake, and
                # handshakes for a flood would cost the CPU the scrapes need.
                _refuse(conn, None if self._tls is not None else self._cap.answer)
                self._log_refusals()
                continue
            conn.setblocking(False)
            task = self._loop.create_task(self._start(conn, proto))
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)

    async def _start(self, conn: socket.socket, proto: asyncio.Protocol) -> None:
        try:
            if self._tls is None:
                await self._loop.connect_accepted_socket(lambda: proto, conn)
            else:
                # A probe's place is held PROBE_DEADLINE at most, handshake included.
                timeout = min(self._handshake_timeout, PROBE_DEADLINE) \
                    if isinstance(proto, Reserved) else self._handshake_timeout
                await self._loop.connect_accepted_socket(
                    lambda: proto, conn, ssl=self._tls, ssl_handshake_timeout=timeout)
        except (Exception, asyncio.CancelledError) as exc:
            # A failed or timed-out handshake, or shutdown: the protocol never
            # saw the connection, so its place is given back here.
            self._cap.abandon(proto)
            conn.close()
            if isinstance(exc, asyncio.CancelledError):
                raise
            log.debug("connection not started: %r", exc)

    def _resume(self, sock: socket.socket) -> None:
        if not self._closed and sock.fileno() != -1:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _log_refusals(self) -> None:
        now = time.monotonic()
        if now - self._last_log >= _LOG_EVERY:
            self._last_log = now
            log.warning("refusing connections: %d open, the limit "
                        "(limits.max_connections)", self._cap.open)

    def close(self) -> None:
        """No new connections; those handshaking are cancelled, open ones stay
        (the web runner's cleanup ends them)."""
        if self._closed:
            return
        self._closed = True
        for sock in self.sockets:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(sock.fileno())
            sock.close()
        for task in self._starting:
            task.cancel()

    async def wait_closed(self) -> None:
        await asyncio.gather(*self._starting, return_exceptions=True)


__all__ = ["ACCEPT_RETRY_DELAY", "Listener"]
