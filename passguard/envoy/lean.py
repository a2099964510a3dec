"""A lean HTTP/1.1 keep-alive GET client for Envoy admin on ``http://`` and ``unix://``.

aiohttp's per-request machinery (URL objects, request and response objects,
stream readers, timers) was the largest cost of a scrape cycle
(``docs/performance.md``). A scrape is one GET of a few hundred bytes, so this
module does only that, on ``asyncio.Protocol`` and transports, with the same
bounds as ``passguard.envoy.admin.AdminClient``: a total timeout for the
whole exchange, ``max_response_bytes`` per answer, and the shared budget
(``scrape.max_buffered_bytes``) for what the answers in flight hold beyond
their first 64 KiB. Idle connections are kept per host:port or socket path
(a bounded pool); a reused connection found closed before any byte of its
answer (the proxy restarted) is retried once on a fresh one, nothing else is.

``ResponseParser`` is pure (bytes in; status, framing and body out): every
malformed answer is an ``AnswerError`` (a ``ScrapeError``), never another
exception, and it holds at most the header block limit plus ``max_body``.

``ScrapeClient`` is the facade the scraper uses: plain ``http://`` and
``unix://`` go to ``LeanClient``, TLS and anything unusual to ``AdminClient``,
and both charge one budget.
"""

from __future__ import annotations

import asyncio
import re
import time
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from ssl import SSLContext
from typing import Literal, Protocol
from urllib.parse import quote, urlsplit

from passguard.envoy.admin import FREE_BYTES, AdminClient
from passguard.errors import ScrapeError
from passguard.httpclient import (
    FIRST_BYTES,
    MAX_RESPONSE_KEY,
    announced_over,
    no_answer,
    sent_over,
)

#: The status line and headers of one answer (and its chunked trailers).
MAX_HEAD = 64 * 1024
#: One status, header, chunk-size or trailer line.
MAX_LINE = 8 * 1024
#: Idle connections kept, all hosts together; the oldest goes first.
DEFAULT_MAX_IDLE = 1024
#: An idle connection older than this is closed instead of reused.
DEFAULT_IDLE_SECONDS = 60.0

Kind = Literal["malformed", "truncated", "too_large", "announced", "status", "closed",
               "budget"]


class AnswerError(ScrapeError):
    """An answer that is not a usable 200: ``kind`` says how, ``message(path)`` says it."""

    def __init__(self, kind: Kind, detail: str, limit: int = 0, note: str = "") -> None:
        self.kind: Kind = kind
        self.detail = detail
        self.limit = limit
        self.note = note
        super().__init__(self.message("the admin"))

    def message(self, path: str) -> str:
        return _MESSAGES[self.kind].format(path=path, detail=self.detail, limit=self.limit,
                                           note=self.note)


# The wording of AdminClient's errors, so operators (and the faults suite) read
# the same reasons whichever client read the proxy.
_MESSAGES: dict[str, str] = {
    "malformed": "bad HTTP answer from {path}: {detail}",
    "truncated": "truncated or malformed body from {path}: {detail}",
    "too_large": sent_over("{path}", "{limit}", MAX_RESPONSE_KEY),
    "announced": announced_over("{path}", "{detail}", "{limit}", MAX_RESPONSE_KEY),
    "status": "HTTP {detail} from {path} ({note} not read)",
    "closed": "the proxy closed the connection without answering {path}",
    "budget": "{path}: the answers being read hold {detail} bytes already, the {limit}-byte "
              "budget (scrape.max_buffered_bytes)",
}

_STATUS = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: [\t\x20-\x7e\x80-\xff]*)?")
_HEADER = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([\t\x20-\x7e\x80-\xff]*?)[ \t]*")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[\t\x20-\x7e\x80-\xff]*)?")
_MAX_LENGTH_DIGITS = 18  # below 2**63: no header can make a huge int

# Parser states.
_HEAD, _LENGTH, _CHUNK_LINE, _CHUNK_DATA, _CHUNK_END, _TRAILER, _CLOSE, _DONE = range(8)


def _shown(value: bytes) -> str:
    """A header value in an error message: short, and escaped (never raw remote bytes)."""
    text = repr(value[:32])[2:-1]
    return text + ("..." if len(value) > 32 else "")


class ResponseParser:
    """One HTTP/1.x answer to a GET, fed bytes as they arrive.

    ``feed()`` returns True once the answer is complete; ``feed_eof()`` says the
    connection closed. Only a 200 is accepted: any other status raises (with
    the status and the announced size, never the body) as soon as the header
    block is read. Bodies: Content-Length, chunked (extensions and trailers
    read and dropped), or until the close when the answer has neither."""

    __slots__ = (
        "_body",
        "_buf",
        "_remaining",
        "_scan",
        "_state",
        "_trailer",
        "chunked",
        "content_length",
        "done",
        "encoding",
        "extra",
        "first",
        "keep_alive",
        "max_body",
        "max_head",
        "max_line",
        "received",
        "status",
    )

    def __init__(self, max_body: int, max_head: int = MAX_HEAD, max_line: int = MAX_LINE) -> None:
        self.max_body = max_body
        self.max_head = max_head
        self.max_line = max_line
        self.status = 0
        self.content_length: int | None = None
        self.chunked = False
        self.keep_alive = False
        self.encoding: str | None = None  # "gzip" | "deflate" (Content-Encoding)
        self.done = False
        self.extra = False  # bytes came after the answer: the connection is unusable
        self.received = 0  # bytes fed, head included
        self._state = _HEAD
        self._buf = bytearray()  # an incomplete header block or line
        # The start of the answer, kept for the log when it is not usable: what
        # answers may be any service a Dataplane object points at.
        self.first = bytearray()
        self._scan = 0  # where to resume looking for the end of it
        self._body = bytearray()
        self._remaining = 0  # of the Content-Length body or of the current chunk
        self._trailer = 0  # bytes of trailer lines read

    @property
    def held(self) -> int:
        """Body bytes held so far."""
        return len(self._body)

    def body(self) -> bytearray:
        return self._body

    # -- input

    def feed(self, data: bytes) -> bool:
        if not data:
            return self.done
        if len(self.first) < FIRST_BYTES:
            self.first += data[:FIRST_BYTES - len(self.first)]
        try:
            return self._feed(data)
        except AnswerError as exc:
            exc.answer = bytes(self.first)  # for the log only (ScrapeError.answer)
            raise

    def _feed(self, data: bytes) -> bool:
        self.received += len(data)
        if self.done:
            self.extra = True
            return True
        pos = 0
        if self._state == _HEAD:
            rest = self._feed_head(data)
            if rest is None:
                return False
            data, pos = rest
        if pos < len(data):
            self._feed_body(data, pos)
        return self.done

    def feed_eof(self) -> None:
        """The connection closed: the answer is complete now, or it never will be."""
        state = self._state
        if state == _DONE:
            return
        if state == _CLOSE:
            self._finish()
        elif state == _HEAD:
            if self.received == 0:
                raise AnswerError("closed", "")
            raise AnswerError("malformed", "the connection closed inside the header block")
        elif state == _LENGTH:
            raise AnswerError("truncated", f"{self._remaining} of {self.content_length} "
                                           "announced bytes never came")
        else:
            raise AnswerError("truncated", "the chunked body ended before its last chunk")

    # -- the header block

    def _feed_head(self, data: bytes) -> tuple[bytes, int] | None:
        buf = self._buf
        if buf:
            buf += data
            end = buf.find(b"\r\n\r\n", self._scan)
        else:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                buf += data
        if end < 0:
            if not buf.startswith(b"HTTP/"[:len(buf)]):
                raise AnswerError("malformed", "no HTTP/1.x status line")
            if len(buf) > self.max_head:
                raise AnswerError("malformed", f"header block over {self.max_head} bytes")
            self._scan = max(0, len(buf) - 3)
            return None
        if end + 4 > self.max_head:
            raise AnswerError("malformed", f"header block over {self.max_head} bytes")
        if buf:
            head, data, pos = bytes(buf[:end]), bytes(buf[end + 4:]), 0
            buf.clear()
        else:
            head, pos = data[:end], end + 4
        self._parse_head(head)
        return data, pos

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        if any(len(line) > self.max_line for line in lines):
            raise AnswerError("malformed", f"a header line over {self.max_line} bytes")
        m = _STATUS.fullmatch(lines[0])
        if m is None:
            raise AnswerError("malformed", "no HTTP/1.x status line")
        minor, status = m[1] == b"1", int(m[2])
        length: int | None = None
        coding: list[bytes] = []
        close = not minor  # HTTP/1.0: not reused
        encoding: bytes | None = None
        for n, line in enumerate(lines[1:], 2):
            h = _HEADER.fullmatch(line)
            if h is None:
                raise AnswerError("malformed", f"line {n} of the header block is not a header")
            name, value = h[1].lower(), h[2]
            if name == b"content-length":
                if not value.isdigit() or len(value) > _MAX_LENGTH_DIGITS:
                    raise AnswerError("malformed", f"Content-Length {_shown(value)!r} is not "
                                                   "a length it accepts")
                if length is not None and int(value) != length:
                    raise AnswerError("malformed", "two different Content-Length headers")
                length = int(value)
            elif name == b"transfer-encoding":
                coding += [c.strip().lower() for c in value.split(b",")]
            elif name == b"connection":
                close = close or b"close" in [c.strip().lower() for c in value.split(b",")]
            elif name == b"content-encoding":
                if encoding is not None:
                    raise AnswerError("malformed", "two Content-Encoding headers")
                encoding = value.lower()
        self.status = status
        self.content_length = length
        if coding:
            if coding != [b"chunked"]:
                raise AnswerError("malformed", "a Transfer-Encoding other than chunked: "
                                               f"{_shown(b','.join(coding))!r}")
            if length is not None:
                raise AnswerError("malformed", "both Transfer-Encoding and Content-Length")
            self.chunked = True
        if status != 200:
            size = (f"{length}-byte body" if length is not None
                    else "chunked body" if self.chunked else "body until close")
            raise AnswerError("status", str(status), note=size)
        if encoding in (None, b"identity"):
            self.encoding = None
        elif encoding in (b"gzip", b"x-gzip"):
            self.encoding = "gzip"
        elif encoding == b"deflate":
            self.encoding = "deflate"
        else:
            assert encoding is not None
            raise AnswerError("malformed", f"Content-Encoding {_shown(encoding)!r}, "
                                           "not asked for")
        self.keep_alive = not close
        if self.chunked:
            self._state = _CHUNK_LINE
        elif length is not None:
            if length > self.max_body:
                raise AnswerError("announced", f"{length} bytes", self.max_body)
            self._remaining = length
            self._state = _LENGTH
            if length == 0:
                self._finish()
        else:
            self.keep_alive = False
            self._state = _CLOSE

    # -- the body

    def _feed_body(self, data: bytes, pos: int) -> None:
        n = len(data)
        body = self._body
        while pos < n:
            state = self._state
            if state in (_LENGTH, _CHUNK_DATA):
                take = min(self._remaining, n - pos)
                body += data[pos:pos + take] if pos or take < n else data
                pos += take
                self._remaining -= take
                if not self._remaining:
                    if state == _LENGTH:
                        self._finish()
                    else:
                        self._state = _CHUNK_END
            elif state == _CLOSE:
                if len(body) + n - pos > self.max_body:
                    raise AnswerError("too_large", "", self.max_body)
                body += data[pos:] if pos else data
                pos = n
            elif state == _DONE:
                self.extra = True
                return
            else:
                line, pos = self._line(data, pos)
                if line is None:
                    return
                self._on_line(line)

    def _line(self, data: bytes, pos: int) -> tuple[bytes | None, int]:
        """The next CRLF-ended line (bounded), or None once ``data`` is used up."""
        buf = self._buf
        if buf:
            if buf[-1:] == b"\r" and data[pos:pos + 1] == b"\n":  # CR | LF across two reads
                line = bytes(buf[:-1])
                buf.clear()
                return line, pos + 1
            end = data.find(b"\r\n", pos, pos + self.max_line + 2)
            if end < 0:
                buf += data[pos:]
                if len(buf) > self.max_line + 1:
                    raise AnswerError("malformed", f"a chunk line over {self.max_line} bytes")
                return None, len(data)
            if len(buf) + end - pos > self.max_line:
                raise AnswerError("malformed", f"a chunk line over {self.max_line} bytes")
            line = bytes(buf) + data[pos:end]
            buf.clear()
            return line, end + 2
        end = data.find(b"\r\n", pos, pos + self.max_line + 2)
        if end < 0:
            if len(data) - pos > self.max_line + 1:
                raise AnswerError("malformed", f"a chunk line over {self.max_line} bytes")
            buf += data[pos:]
            return None, len(data)
        if end - pos > self.max_line:
            raise AnswerError("malformed", f"a chunk line over {self.max_line} bytes")
        return data[pos:end], end + 2

    def _on_line(self, line: bytes) -> None:
        state = self._state
        if state == _CHUNK_LINE:
            m = _CHUNK_SIZE.fullmatch(line)
            if m is None:
                raise AnswerError("truncated", "a chunk size that is not hexadecimal")
            size = int(m[1], 16)
            if size == 0:
                self._state = _TRAILER
            elif size > self.max_body - len(self._body):
                if self._body:
                    raise AnswerError("too_large", "", self.max_body)
                raise AnswerError("announced", f"a {size}-byte chunk", self.max_body)
            else:
                self._remaining = size
                self._state = _CHUNK_DATA
        elif state == _CHUNK_END:
            if line:
                raise AnswerError("truncated", "a chunk longer than its size")
            self._state = _CHUNK_LINE
        else:  # _TRAILER
            if not line:
                self._finish()
                return
            self._trailer += len(line) + 2
            if self._trailer > self.max_head:
                raise AnswerError("malformed", f"trailers over {self.max_head} bytes")
            if _HEADER.fullmatch(line) is None:
                raise AnswerError("malformed", "a trailer line that is not a header")

    def _finish(self) -> None:
        self._state = _DONE
        self.done = True


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
            if not _HEADER.fullmatch(f"{k}: {v}".encode("latin-1", "replace")):
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
