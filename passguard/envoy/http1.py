"""The pure HTTP/1.x answer parser of the lean admin client: bytes in; status,
framing and body out.

Only a 200 is accepted.  Every malformed answer is an ``AnswerError`` (a
``ScrapeError``, worded as ``AdminClient``'s errors are), never another
exception, and a parser holds at most ``max_head`` plus ``max_body`` bytes.
"""

from __future__ import annotations

import re
from typing import Literal

from passguard.errors import ScrapeError
from passguard.httpclient import FIRST_BYTES, MAX_RESPONSE_KEY, announced_over, sent_over

#: The status line and headers of one answer (and its chunked trailers).
MAX_HEAD = 64 * 1024
#: One status, header, chunk-size or trailer line.
MAX_LINE = 8 * 1024

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
#: One header line (the client checks the headers it sends with it too).
HEADER = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([\t\x20-\x7e\x80-\xff]*?)[ \t]*")
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
            h = HEADER.fullmatch(line)
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
            if HEADER.fullmatch(line) is None:
                raise AnswerError("malformed", "a trailer line that is not a header")

    def _finish(self) -> None:
        self._state = _DONE
        self.done = True

