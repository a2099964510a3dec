"""Envoy admin HTTP client: TCP base URLs and Unix sockets, one pooled session each.

Every request is bounded in time (the whole exchange, not only connect) and in
size, so a proxy that hangs, trickles bytes or sends an endless body costs one
timeout and is reported, never a stuck cycle or an exhausted memory. The
answers being read at once share one budget (``scrape.max_buffered_bytes``)
for what they hold beyond their first 64 KiB: ``concurrency`` proxies each
sending up to ``max_response_bytes`` would otherwise be 256 x 64 MiB.
"""

from __future__ import annotations

from collections.abc import Mapping
from ssl import SSLContext
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from passguard.errors import ScrapeError
from passguard.httpclient import (
    FIRST_BYTES,
    INVALID_URL,
    MAX_RESPONSE_KEY,
    HttpProblem,
    exchange,
    read_bounded,
    words,
)

if TYPE_CHECKING:  # loaded at the first read aiohttp serves (TLS, https, credentials):
    # a scrape worker reading plain http:// and unix:// admin never loads it
    import aiohttp

#: The first bytes of every answer are outside the shared budget: a filtered
#: /stats (a few KiB) is never refused because big answers filled it, and
#: those bytes are bounded by concurrency x 64 KiB (16 MiB) anyway.
FREE_BYTES = 64 * 1024


class AdminClient:
    def __init__(self, concurrency: int, max_bytes: int,
                 max_buffered: int | None = None) -> None:
        self._max_bytes = max_bytes
        self._max_buffered = max_buffered if max_buffered is not None else 4 * max_bytes
        self.buffered = 0  # bytes held by the reads in flight
        self._concurrency = concurrency
        self._tcp: aiohttp.ClientSession | None = None
        self._unix: dict[str, aiohttp.ClientSession] = {}

    def _session_for(self, base: str) -> tuple[aiohttp.ClientSession, str]:
        import aiohttp

        parts = urlsplit(base)
        if parts.scheme == "unix":
            session = self._unix.get(parts.path)
            if session is None:
                session = aiohttp.ClientSession(
                    connector=aiohttp.UnixConnector(path=parts.path), trust_env=False)
                self._unix[parts.path] = session
            # The host is never looked up on a Unix socket; Envoy ignores it.
            return session, "http://localhost"
        if self._tcp is None:
            self._tcp = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._concurrency, limit_per_host=0,
                                               ttl_dns_cache=300),
                trust_env=False)
        return self._tcp, base

    async def get(self, base: str, path: str, params: Mapping[str, str] | None = None,
                  timeout: float = 5.0, headers: Mapping[str, str] | None = None,
                  ssl: SSLContext | None = None) -> str:
        """GET ``base + path``; the text body, or ScrapeError saying what went wrong."""
        try:
            session, prefix = self._session_for(base)
        except ValueError as exc:  # urlsplit: "http://[::1" (an unclosed IPv6 literal)
            raise ScrapeError(f"{INVALID_URL}: {words(str(exc))}") from None
        charged = 0  # what this read holds of the shared budget

        def hold(held: int) -> None:
            nonlocal charged
            more = max(0, held - FREE_BYTES) - charged
            if more and self.buffered + more > self._max_buffered:
                raise ScrapeError(f"{path}: the answers being read hold {self.buffered} bytes "
                                  f"already, the {self._max_buffered}-byte budget "
                                  "(scrape.max_buffered_bytes)")
            self.buffered += more
            charged += more

        try:
            async with exchange(session, "GET", prefix + path, timeout=timeout, origin=base,
                                server=path, params=params, headers=headers,
                                ssl=ssl if ssl is not None else True) as resp:
                if resp.status != 200:
                    # The body goes to the log only: what answers here may
                    # be any service a Dataplane object points at.
                    head = await resp.content.read(FIRST_BYTES)
                    moved = " (redirects are not followed)" if 300 <= resp.status < 400 else ""
                    raise ScrapeError(f"HTTP {resp.status} from {path}{moved}", head)
                try:
                    body = await read_bounded(resp, self._max_bytes, path,
                                              MAX_RESPONSE_KEY, hold)
                finally:
                    self.buffered -= charged
                return body.decode("utf-8", "replace")
        except HttpProblem as exc:
            raise ScrapeError(str(exc), exc.answer) from None

    async def close(self) -> None:
        sessions = [s for s in (self._tcp, *self._unix.values()) if s is not None]
        self._tcp, self._unix = None, {}
        for s in sessions:
            await s.close()

