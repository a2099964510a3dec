"""A lean HTTP/1.1 keep-alive GET client for Envoy admin on ``http://`` and ``unix://``.

It keeps ``AdminClient``'s bounds: a total timeout per exchange,
``max_response_bytes`` per answer, and one shared budget
(``scrape.max_buffered_bytes``) for what answers in flight hold beyond their
first 64 KiB.  Idle connections are pooled per host:port or socket path; a
reused one found closed before any byte of its answer is retried once on a
fresh one, nothing else is.  Answers are parsed by ``envoy.http1``.
``ScrapeClient`` routes plain ``http://``/``unix://`` here and TLS and the
rest to ``AdminClient``, both charging one budget.  Why: docs/performance.md.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from ssl import SSLContext
from typing import Protocol
from urllib.parse import quote, urlsplit

from passguard.envoy.admin import FREE_BYTES, AdminClient
from passguard.envoy.http1 import (
    HEADER,
    MAX_HEAD,
    MAX_LINE,
    AnswerError,
    ResponseParser,
)
from passguard.errors import ScrapeError
from passguard.httpclient import no_answer

#: Idle connections kept, all hosts together; the oldest goes first.
DEFAULT_MAX_IDLE = 1024
#: An idle connection older than this is closed instead of reused.
DEFAULT_IDLE_SECONDS = 60.0


# --------------------------------------------------------------------------- connections


class Budget(Protocol):
    """Who holds the shared count of bytes charged (``AdminClient`` does)."""

    buffered: int


class _Counter:
    buffered = 0


class _Closed(Exception):  # an internal signal, never leaves this module
    """The connection closed before any byte of the answer."""

    def __init__(self, exc: BaseException | None) -> None:
        super().__init__(str(exc) if exc else "closed")
        self.exc = exc


class _Conn(asyncio.Protocol):
    """One connection: at most one GET in flight, then idle in the pool."""

    def __init__(self, client: LeanClient, key: str) -> None:
        self.client = client
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser: ResponseParser | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.charged = 0  # this answer's share of the budget
        self.idle_since = 0.0

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        parser, waiter = self.parser, self.waiter
        if parser is None or waiter is None or waiter.done():
            # Bytes nobody asked for (or after a failure): never reuse this one.
            self.abort()
            return
        try:
            done = parser.feed(data)
            held = parser.held
            if held > FREE_BYTES:
                self.client._charge(self, held)
        except ScrapeError as exc:
            waiter.set_exception(exc)
            self.abort()
            return
        if done:
            waiter.set_result(None)

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost says the rest

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.client._lost(self)
        parser, waiter = self.parser, self.waiter
        if parser is None or waiter is None or waiter.done():
            return
        if parser.received == 0:
            waiter.set_exception(_Closed(exc))
            return
        try:
            parser.feed_eof()
        except ScrapeError as err:
            waiter.set_exception(err)
            return
        waiter.set_result(None)

    # -- use

    def send(self, request: bytes, parser: ResponseParser) -> asyncio.Future[None]:
        assert self.transport is not None
        self.parser = parser
        self.charged = 0
        self.waiter = waiter = asyncio.get_running_loop().create_future()
        if self.closed or self.transport.is_closing():
            # A write there would vanish without a word: say closed, as the read would.
            waiter.set_exception(_Closed(None))
        else:
            self.transport.write(request)
        return waiter

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class _Target:
    """A parsed admin base URL: where to connect, and what to send."""

    __slots__ = ("address", "host", "key", "port", "prefix", "unix")

    def __init__(self, key: str, unix: bool, address: str, port: int, host: str,
                 prefix: str) -> None:
        self.key = key  # the pool's key: one per host:port or socket path
        self.unix = unix
        self.address = address  # the host to connect to, or the socket path
        self.port = port
        self.host = host  # the Host header
        self.prefix = prefix  # the base URL's own path, before the request's


def serves(base: str) -> bool:
    """Whether ``LeanClient`` takes this base URL (plain http, unix, no credentials)."""
    if base.startswith("unix://"):
        return True
    if not base.startswith("http://"):
        return False
    netloc = base[7:].split("/", 1)[0]
    return "@" not in netloc and "?" not in base and "#" not in base


class LeanClient:
    """GETs on Envoy admin over plain HTTP/1.1 and Unix sockets, connections kept alive."""

    def __init__(self, max_bytes: int, max_buffered: int | None = None, *,
                 budget: Budget | None = None, max_idle: int = DEFAULT_MAX_IDLE,
                 idle_seconds: float = DEFAULT_IDLE_SECONDS, max_head: int = MAX_HEAD,
                 max_line: int = MAX_LINE) -> None:
        self._max_bytes = max_bytes
        self._max_buffered = max_buffered if max_buffered is not None else 4 * max_bytes
        self._budget: Budget = budget if budget is not None else _Counter()
        self._max_idle = max_idle
        self._idle_seconds = idle_seconds
        self._max_head = max_head
        self._max_line = max_line
        self._idle: dict[str, list[_Conn]] = {}
        self._lru: OrderedDict[_Conn, None] = OrderedDict()  # idle, oldest first
        self._open: set[_Conn] = set()
        self._targets: dict[str, _Target] = {}
        self._queries: dict[tuple[tuple[str, str], ...], str] = {}
        self._paths: dict[str, str] = {}
        self.opened = 0  # connections opened, ever
        self.retries = 0  # GETs sent again after a reused connection had closed

    @property
    def buffered(self) -> int:
        return self._budget.buffered

    @property
    def idle(self) -> int:
        return len(self._lru)

    # -- the request

    async def get(self, base: str, path: str, params: Mapping[str, str] | None = None,
                  timeout: float = 5.0, headers: Mapping[str, str] | None = None,
                  ssl: SSLContext | None = None) -> str:
        """GET ``base + path``; the text body, or ScrapeError saying what went wrong."""
        if ssl is not None:
            raise ScrapeError("the lean admin client does not do TLS")
        target = self._target(base)
        request = self._request(target, path, params, headers)
        conn: _Conn | None = None
        ok = False
        try:
            async with asyncio.timeout(timeout):
                conn, reused = await self._acquire(target)
                try:
                    parser = await self._exchange(conn, request)
                except _Closed:
                    if not reused:
                        raise
                    # Envoy restarted (or closed an idle connection) between two
                    # scrapes: once, on a fresh connection, inside the same timeout.
                    self.retries += 1
                    conn = await self._connect(target)
                    parser = await self._exchange(conn, request)
                body = parser.body()
                if parser.encoding is not None:
                    body = self._inflate(conn, body, parser.encoding)
                text = body.decode("utf-8", "replace")
            ok = True
            if parser.keep_alive and not parser.extra:
                self._release(conn)
            else:
                conn.abort()  # answered with close framing, or sent more than asked
            return text
        except TimeoutError:
            raise ScrapeError(no_answer(timeout, path)) from None
        except _Closed as exc:
            detail = f" ({exc.exc})" if exc.exc else ""
            raise ScrapeError("the proxy closed the connection without answering"
                              f"{detail}") from None
        except AnswerError as exc:
            raise ScrapeError(exc.message(path), exc.answer) from None
        except ScrapeError:
            raise
        except OSError as exc:
            raise ScrapeError(str(exc) or type(exc).__name__) from None
        finally:
            if conn is not None:
                self._budget.buffered -= conn.charged
                conn.charged = 0
                conn.parser = conn.waiter = None
                if not ok:
                    conn.abort()

    async def _exchange(self, conn: _Conn, request: bytes) -> ResponseParser:
        parser = ResponseParser(self._max_bytes, self._max_head, self._max_line)
        await conn.send(request, parser)
        return parser

    def _charge(self, conn: _Conn, held: int) -> None:
        """Charge what ``conn``'s answer holds beyond its first 64 KiB to the budget."""
        more = held - FREE_BYTES - conn.charged
        if more <= 0:
            return
        budget = self._budget
        if budget.buffered + more > self._max_buffered:
            raise AnswerError("budget", str(budget.buffered), self._max_buffered)
        budget.buffered += more
        conn.charged += more

    def _inflate(self, conn: _Conn, raw: bytearray, encoding: str) -> bytearray:
        """An answer sent compressed although not asked to: decoded, bounded like any body."""
        wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else (
            zlib.MAX_WBITS if raw[:1] and raw[0] & 0x0F == 8 else -zlib.MAX_WBITS)
        inflater = zlib.decompressobj(wbits)
        out = bytearray()
        data: bytes = bytes(raw)
        try:
            while data:
                out += inflater.decompress(data, 64 * 1024)
                data = inflater.unconsumed_tail
                if len(out) > self._max_bytes:
                    raise AnswerError("too_large", "", self._max_bytes)
                self._charge(conn, len(raw) + len(out))
            out += inflater.flush()  # at most a window (32 KiB) was still inside
            if len(out) > self._max_bytes:
                raise AnswerError("too_large", "", self._max_bytes)
            if not inflater.eof:
                raise AnswerError("truncated", f"the {encoding} stream ends early")
        except zlib.error as exc:
            raise AnswerError("truncated", f"bad {encoding} data: {exc}") from None
        return out

    def _target(self, base: str) -> _Target:
        target = self._targets.get(base)
        if target is not None:
            return target
        try:
            parts = urlsplit(base)
            port = parts.port
        except ValueError as exc:
            raise ScrapeError(f"bad admin URL {base!r}: {exc}") from None
        if parts.scheme == "unix":
            if not parts.path:
                raise ScrapeError(f"bad admin URL {base!r}: no socket path")
            # The host is never looked up on a Unix socket; Envoy ignores it.
            target = _Target("unix:" + parts.path, True, parts.path, 0, "localhost", "")
        elif parts.scheme == "http" and parts.hostname and serves(base):
            host = parts.hostname
            shown = f"[{host}]" if ":" in host else host
            if port is not None:
                shown += f":{port}"
            port = port or 80
            target = _Target(f"{host}:{port}", False, host, port, shown,
                             parts.path.rstrip("/"))
        else:
            raise ScrapeError(f"the lean admin client cannot read {base!r} "
                              "(plain http:// and unix:// only)")
        if len(self._targets) >= 100_000:
            self._targets.clear()
        self._targets[base] = target
        return target

    def _request(self, target: _Target, path: str, params: Mapping[str, str] | None,
                 headers: Mapping[str, str] | None) -> bytes:
        quoted = self._paths.get(path)
        if quoted is None:
            quoted = quote(path, safe="/:@!$&'()*+,;=-._~%?")
            if len(self._paths) < 1024:
                self._paths[path] = quoted
        target_path = target.prefix + quoted
        if params:
            items = tuple(params.items())
            query = self._queries.get(items)
            if query is None:
                query = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in items)
                if len(self._queries) < 1024:
                    self._queries[items] = query
            target_path += ("&" if "?" in target_path else "?") + query
        lines = [f"GET {target_path or '/'} HTTP/1.1"]
        given = {k.lower() for k in headers} if headers else set()
        if "host" not in given:
            lines.append(f"Host: {target.host}")
        if "accept" not in given:
            lines.append("Accept: */*")
        if "user-agent" not in given:
            lines.append("User-Agent: passguard")
        for k, v in (headers or {}).items():
            if not HEADER.fullmatch(f"{k}: {v}".encode("latin-1", "replace")):
                raise ScrapeError(f"request header {k!r} cannot be sent as it is")
            lines.append(f"{k}: {v}")
        try:
            return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        except UnicodeEncodeError:
            raise ScrapeError("a request header is not latin-1 text") from None

    # -- the pool

    async def _acquire(self, target: _Target) -> tuple[_Conn, bool]:
        idle = self._idle.get(target.key)
        if idle:
            now = time.monotonic()
            while idle:
                conn = idle.pop()  # the newest: the most likely still open
                del self._lru[conn]
                if not conn.closed and now - conn.idle_since < self._idle_seconds:
                    return conn, True
                conn.abort()
        return await self._connect(target), False

    async def _connect(self, target: _Target) -> _Conn:
        loop = asyncio.get_running_loop()
        key = target.key
        if target.unix:
            _, conn = await loop.create_unix_connection(lambda: _Conn(self, key),
                                                        target.address)
        else:
            _, conn = await loop.create_connection(lambda: _Conn(self, key), target.address,
                                                   target.port)
        self.opened += 1
        self._open.add(conn)
        return conn

    def _release(self, conn: _Conn) -> None:
        if conn.closed or self._max_idle <= 0:
            conn.abort()
            return
        while len(self._lru) >= self._max_idle:
            oldest, _ = self._lru.popitem(last=False)
            self._idle[oldest.key].remove(oldest)
            oldest.abort()
        conn.idle_since = time.monotonic()
        self._idle.setdefault(conn.key, []).append(conn)
        self._lru[conn] = None

    def _lost(self, conn: _Conn) -> None:
        self._open.discard(conn)
        if conn in self._lru:
            del self._lru[conn]
            self._idle[conn.key].remove(conn)
        idle = self._idle.get(conn.key)
        if idle is not None and not idle:
            del self._idle[conn.key]

    async def close(self) -> None:
        conns = list(self._open)
        self._idle.clear()
        self._lru.clear()
        for conn in conns:
            conn.abort()
        # Let the transports run connection_lost before the loop may close.
        await asyncio.sleep(0)


class ScrapeClient:
    """What the scraper reads Envoy admin with: plain ``http://`` and ``unix://`` on
    ``LeanClient``, TLS (``https://`` or an ``ssl`` context) and anything else on
    aiohttp's ``AdminClient``; both charge ``AdminClient.buffered``, one budget."""

    def __init__(self, concurrency: int, max_bytes: int, max_buffered: int | None = None,
                 max_idle: int | None = None) -> None:
        self.admin = AdminClient(concurrency, max_bytes, max_buffered)
        self.lean = LeanClient(max_bytes, max_buffered, budget=self.admin,
                               max_idle=max(concurrency, DEFAULT_MAX_IDLE) if max_idle is None
                               else max_idle)

    @property
    def buffered(self) -> int:
        return self.admin.buffered

    async def get(self, base: str, path: str, params: Mapping[str, str] | None = None,
                  timeout: float = 5.0, headers: Mapping[str, str] | None = None,
                  ssl: SSLContext | None = None) -> str:
        if ssl is None and serves(base):
            return await self.lean.get(base, path, params, timeout, headers)
        return await self.admin.get(base, path, params, timeout, headers, ssl)

    async def close(self) -> None:
        await self.lean.close()
        await self.admin.close()
