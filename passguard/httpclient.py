"""The one HTTP client layer: what the Envoy admin, Kuma CP and Prometheus
clients share.

Every exchange is bounded in time (the whole of it, not only connect) and in
size (the announced length and what really arrives); TLS trust comes from
``ca_file`` and is rebuilt when that file changes; credentials are read from
their files at each use; and every failure is one ``HttpProblem`` worded
here. Invariant: a message quotes no answer's bytes except, cut and escaped,
the error a configured server (the CP, Prometheus) wrote for its caller.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import ssl
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import TYPE_CHECKING, Any

from passguard.envoy.excerpt import for_log
from passguard.errors import PassguardError
from passguard.secretfile import read_secret

if TYPE_CHECKING:  # imported where used: a scrape worker reading plain http:// and
    # unix:// admin never loads aiohttp (~24 MB)
    import aiohttp

#: What one read of an answer takes at a time.
CHUNK = 64 * 1024
#: Bytes of an unusable answer kept for the log (never shown by the API).
FIRST_BYTES = 200
#: The setting that bounds an Envoy admin answer (AdminClient, LeanClient).
MAX_RESPONSE_KEY = "scrape.max_response_bytes"
#: Characters of a configured server's own error text quoted in a message.
DETAIL_CHARS = 160


class HttpProblem(PassguardError):
    """A server could not be asked, refused, or answered too much: the message
    says what; ``status`` is the HTTP status when there was one."""

    def __init__(self, message: str, status: int | None = None,
                 answer: str | bytes | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.answer = answer  # what the failure quoted: for the log only


# --------------------------------------------------------------------------- wording


def announced_over(who: str, size: int | str, limit: int | str,
                   setting: str | None = None) -> str:
    """``who`` (a path, "the CP") announced more than ``limit`` allows;
    ``size`` a byte count, or words ("a 9000-byte chunk")."""
    size = f"{size} bytes" if isinstance(size, int) else size
    return f"{who} announced {size}, over the {limit}-byte limit{_key(setting)}"


def sent_over(who: str, limit: int | str, setting: str | None = None) -> str:
    return f"{who} sent more than {limit} bytes{_key(setting)}"


def no_answer(timeout: float, server: str | None = None) -> str:
    return f"no complete answer{f' from {server}' if server else ''} within {timeout:g}s"


def _key(setting: str | None) -> str:
    return f" ({setting})" if setting else ""


# The leading words of a parser's message ("Bad status line", "Invalid
# character in Content-Length"): aiohttp's messages go on to quote the bytes
# they choked on, which belong to the answer, not to the reason.
_WORDS = re.compile(r"[A-Za-z][A-Za-z0-9 ,\-]*")


def words(message: str) -> str:
    m = _WORDS.match(message.strip())
    return m.group(0).strip(" ,-") if m else "unreadable"


INVALID_URL = "the target URL is not valid"


def describe(exc: BaseException, server: str | None, origin: str) -> str:
    """An aiohttp or socket failure of an exchange with ``origin``."""
    to = f"{server} at {origin}" if server else origin
    # An aiohttp failure needs aiohttp loaded; the lean client's never do.
    aiohttp = sys.modules.get("aiohttp")
    if aiohttp is None:
        if isinstance(exc, ValueError):
            return f"{INVALID_URL}: {words(str(exc))}"
        return f"{type(exc).__name__}: {exc}"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return (f"the TLS certificate of {to} is not trusted "
                f"({exc.certificate_error}); set ca_file to the CA that signed it")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {to}: {exc.os_error.strerror or exc.os_error}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return f"{origin} closed the connection without answering"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"bad HTTP answer{f' from {server}' if server else ''}: {words(exc.message)}"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return f"truncated or malformed body: {words(str(exc))}"
    if isinstance(exc, aiohttp.InvalidURL | ValueError):
        return f"{INVALID_URL}: {words(str(exc))}"
    return f"{type(exc).__name__}: {exc}"


def error_detail(body: bytes) -> str:
    """What a configured server says went wrong, cut and escaped: its JSON
    error (Kuma's ``title``/``detail``/``details``, Prometheus's
    ``errorType``/``error``), else the start of the body."""
    detail = ""
    with suppress(ValueError, AttributeError):
        doc = json.loads(body)
        if doc.get("status") == "error":
            detail = f"{doc.get('errorType') or 'error'}: {doc.get('error')}"
        else:
            parts = [doc.get(k) for k in ("title", "detail", "details")]
            detail = ": ".join(str(p) for p in parts if isinstance(p, str) and p)
    if not detail:
        detail = body[:DETAIL_CHARS].decode("utf-8", "replace").strip()
    return for_log(detail, DETAIL_CHARS)


_REASONS = {401: "Unauthorized", 403: "Forbidden"}


def http_problem(what: str, status: int, body: bytes, server: str | None = None,
                 hint: str | None = None) -> str:
    """``{what}: HTTP {status}[ reason][ (hint) | from server][: detail]``: the
    hint (how to fix a 401, what a 403 means) already names the server."""
    head = f"HTTP {status}" + (f" {_REASONS[status]}" if status in _REASONS else "")
    if hint:
        head += f" ({hint})"
    elif server:
        head += f" from {server}"
    detail = error_detail(body)
    return f"{what}: {head}{': ' + detail if detail else ''}"


# --------------------------------------------------------------------------- reading


async def read_at_most(content: aiohttp.StreamReader, announced: int | None, limit: int,
                       too_large: Callable[[int, bool], BaseException],
                       hold: Callable[[int], None] | None = None) -> bytes:
    """A body (an answer's or a request's) of at most ``limit`` bytes: over it,
    announced or sent, ``too_large(size, announced)`` is raised. ``hold`` is
    told how many bytes are held after each chunk (a shared budget may refuse)."""
    if announced is not None and announced > limit:
        raise too_large(announced, True)
    buf = bytearray()
    async for chunk in content.iter_chunked(CHUNK):
        buf += chunk
        if len(buf) > limit:
            raise too_large(len(buf), False)
        if hold is not None:
            hold(len(buf))
    return bytes(buf)


async def read_bounded(resp: aiohttp.ClientResponse, limit: int, who: str,
                       setting: str | None = None,
                       hold: Callable[[int], None] | None = None) -> bytes:
    """An answer's body, at most ``limit`` bytes; HttpProblem over it, naming
    ``who`` sent it and the ``setting`` that bounds it."""
    def over(size: int, announced: bool) -> HttpProblem:
        return HttpProblem(announced_over(who, size, limit, setting) if announced
                           else sent_over(who, limit, setting))

    return await read_at_most(resp.content, resp.content_length, limit, over, hold)


@asynccontextmanager
async def exchange(session: aiohttp.ClientSession, method: str, url: str, *, timeout: float,
                   origin: str, server: str | None = None, what: str | None = None,
                   grace: float = 0.0, **kwargs: Any) -> AsyncIterator[aiohttp.ClientResponse]:
    """One request, redirects not followed, bounded by ``timeout`` (plus
    ``grace``, for a server told the timeout itself) in all, reading the body
    inside the block included. Failures become an HttpProblem prefixed with
    ``what``; the block's own errors pass."""
    import aiohttp  # a session is passed: it is loaded

    prefix = f"{what}: " if what else ""
    try:
        async with asyncio.timeout(timeout + grace):
            async with session.request(method, url, allow_redirects=False, **kwargs) as resp:
                yield resp
    except TimeoutError:
        raise HttpProblem(prefix + no_answer(timeout, server)) from None
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        # ValueError: yarl refuses the URL itself ("http://[127.0.0.1:1/x#]").
        quoted = exc.message if isinstance(exc, aiohttp.ClientResponseError) else str(exc)
        raise HttpProblem(prefix + describe(exc, server, origin), answer=quoted) from None


# --------------------------------------------------------------------------- TLS and auth


def client_ssl_context(ca_file: str | None, insecure_skip_verify: bool) -> ssl.SSLContext:
    """System roots, or ``ca_file`` alone (a private CA), or no verification
    at all when ``insecure_skip_verify`` says so on purpose. HttpProblem
    naming the file when ``ca_file`` cannot be used."""
    if insecure_skip_verify:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    try:
        return ssl.create_default_context(cafile=ca_file)
    except FileNotFoundError:
        raise HttpProblem(f"ca_file {ca_file}: no such file") from None
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise HttpProblem(f"ca_file {ca_file}: not a usable PEM CA bundle ({exc})") from None


class ClientTLS:
    """The TLS client context of one server, rebuilt when ``ca_file`` changes
    (its modification time or size), so a rotated CA needs no reload."""

    def __init__(self, ca_file: str | None, insecure_skip_verify: bool) -> None:
        self.ca_file = ca_file
        self.insecure = insecure_skip_verify
        self._ctx: ssl.SSLContext | None = None
        self._stamp: tuple[float, int] | None = None

    def context(self) -> ssl.SSLContext | bool:
        """The context to pass as aiohttp's ``ssl=``: True (aiohttp's default,
        the system roots) when neither ``ca_file`` nor ``insecure_skip_verify``
        is set."""
        if not self.ca_file and not self.insecure:
            return True
        stamp: tuple[float, int] | None = None
        if self.ca_file and not self.insecure:
            try:
                st = os.stat(self.ca_file)
            except OSError as exc:
                raise HttpProblem(f"cannot read ca_file {self.ca_file}: "
                                  f"{exc.strerror or exc}") from None
            stamp = (st.st_mtime, st.st_size)
        if self._ctx is None or stamp != self._stamp:
            self._ctx = client_ssl_context(self.ca_file, self.insecure)
            self._stamp = stamp
        return self._ctx


def secret(path: str, key: str) -> str:
    """A token or password read from its file now (rotation needs no reload)."""
    try:
        return read_secret(path, key)
    except ValueError as exc:
        raise HttpProblem(str(exc)) from None


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def auth_headers(token_file: str | None, username: str | None = None,
                 password_file: str | None = None) -> dict[str, str]:
    """``Authorization`` from a bearer token file, else basic auth; the files
    are read at each call."""
    if token_file:
        return bearer(secret(token_file, "token_file"))
    if username and password_file:
        pair = f"{username}:{secret(password_file, 'password_file')}".encode()
        return {"Authorization": "Basic " + base64.b64encode(pair).decode("ascii")}
    return {}
