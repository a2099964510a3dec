"""One scrape cycle: every target's filtered ``/stats``, concurrently and bounded.

A failed probe is a result, not an exception (the blackbox_exporter rule): the
cycle always returns one result per target, and one slow proxy costs at most
``scrape.timeout`` of its own slot while the others go on. That holds for any
exception, not only the expected ScrapeError: one target's bad address (a
Dataplane object is data from the control plane) or a parser bug fails that
target with the reason, and the cycle goes on.

A result's ``error`` is shown by the API, the status page and the gate's
reasons, so it says what failed and never carries the answer's bytes; those
go to the log, cut and escaped (``passguard.envoy.excerpt``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from ssl import SSLContext

from passguard.config_types import Config
from passguard.envoy.clusters import ClustersParser, Destination
from passguard.envoy.excerpt import for_log
from passguard.envoy.lean import ScrapeClient
from passguard.envoy.names import stats_filter
from passguard.envoy.promtext import PromStatsParser
from passguard.envoy.stats import StatsParser, StatsReading
from passguard.errors import ScrapeError
from passguard.pacing import paced
from passguard.targets import Target

#: One ``/clusters`` read: the target, when, what it listed (None: failed), the error.
ClustersRead = tuple[Target, float, list[Destination] | None, str | None]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Request:
    """How to read a target that is not a plain Envoy admin (see sources.kuma)."""

    base: str
    path: str
    headers: Mapping[str, str]
    format: str  # "envoy" | "prometheus"
    clusters_path: str | None
    ssl: SSLContext | None = None
    # Why this target must not be read at all (a kuma-dp address that is not
    # an allowed IP literal): the target fails with it, and nothing is sent.
    invalid: str | None = None


@dataclass(frozen=True, slots=True)
class ScrapeResult:
    target: Target
    t: float
    duration: float
    reading: StatsReading | None
    error: str | None


class Scraper:
    def __init__(self, cfg: Config) -> None:
        self.timeout = cfg.scrape.timeout
        # The lean keep-alive client for http:// and unix:// admin URLs (a
        # third of aiohttp's CPU per scrape), aiohttp for TLS: envoy/lean.py.
        self.client = ScrapeClient(cfg.scrape.concurrency, cfg.scrape.max_response_bytes,
                                   cfg.scrape.max_buffered_bytes)
        self.parser = StatsParser(cfg.passthrough_clusters, cfg.outbound_port)
        self.params = {"filter": stats_filter(cfg.passthrough_clusters, cfg.outbound_port)}
        self.clusters = ClustersParser(cfg.passthrough_clusters)
        self.prom_parser = PromStatsParser(cfg.passthrough_clusters, cfg.outbound_port)
        self.concurrency = cfg.scrape.concurrency
        self._slots = asyncio.Semaphore(cfg.scrape.concurrency)
        # Target key -> its last logged failure (see _note).
        self._failing: dict[str, str] = {}

    async def scrape(self, target: Target, req: Request | None = None) -> ScrapeResult:
        if req is not None and req.invalid is not None:
            self._note(target, req.invalid)
            return ScrapeResult(target, time.time(), 0.0, None, req.invalid)
        async with self._slots:
            start = time.monotonic()
            reading: StatsReading | None = None
            try:
                if req is None:
                    # Direct Envoy admin: the server-side filter keeps it tiny.
                    text = await self.client.get(target.url, "/stats", self.params, self.timeout)
                    reading = self.parser.parse(text)
                else:
                    # Through the Kuma CP (no filter there) or kuma-dp's metrics.
                    text = await self.client.get(req.base, req.path, None, self.timeout,
                                                 req.headers, req.ssl)
                    parser = self.prom_parser if req.format == "prometheus" else self.parser
                    reading = parser.parse(text)
                error = None
            except ScrapeError as exc:
                error = str(exc)
                self._note(target, error, exc.answer)
            except Exception as exc:  # isolation is the point
                error = internal_error(exc)
                log_unexpected(f"scrape of {target.key}", exc)
            else:
                self._failing.pop(target.key, None)
            duration = time.monotonic() - start
            return ScrapeResult(target, time.time(), duration, reading, error)

    def _note(self, target: Target, error: str, answer: str | bytes | None = None) -> None:
        """Log a target's failure: at WARNING when it is new or changed (with
        the start of the answer, escaped), at DEBUG while it repeats, so a
        proxy that stays broken does not fill the journal."""
        level = logging.DEBUG if self._failing.get(target.key) == error else logging.WARNING
        self._failing[target.key] = error
        if answer is not None and len(answer):
            log.log(level, "scrape of %s failed: %s; the answer starts: %s", target.key,
                    error, for_log(answer))
        else:
            log.log(level, "scrape of %s failed: %s", target.key, error)

    async def read_clusters(self, target: Target, req: Request | None = None) -> ClustersRead:
        """One ``/clusters`` read: the destinations of the passthrough clusters."""
        if req is not None and req.invalid is not None:
            return target, time.time(), None, req.invalid
        async with self._slots:
            try:
                if req is None:
                    text = await self.client.get(target.url, "/clusters", None, self.timeout)
                elif req.clusters_path is None:
                    return target, time.time(), None, "this stats mode has no /clusters"
                else:
                    text = await self.client.get(req.base, req.clusters_path, None, self.timeout,
                                                 req.headers, req.ssl)
                return target, time.time(), self.clusters.parse(text), None
            except ScrapeError as exc:
                if exc.answer is not None and len(exc.answer):
                    log.debug("/clusters of %s: %s; the answer starts: %s", target.key, exc,
                              for_log(exc.answer))
                return target, time.time(), None, str(exc)
            except Exception as exc:  # one target, never the pass
                log_unexpected(f"/clusters of {target.key}", exc)
                return target, time.time(), None, internal_error(exc)

    async def cycle(self, targets: list[Target],
                    request_for: Callable[[Target], Request | None] | None = None,
                    spread: float = 0.0,
                    on_result: Callable[[ScrapeResult], object] | None = None
                    ) -> list[ScrapeResult]:
        """Scrape every online target, the starts spread over ``spread`` seconds;
        ``on_result`` sees each result as soon as its scrape ends."""

        async def one(t: Target) -> ScrapeResult:
            try:
                req = request_for(t) if request_for else None
            except Exception as exc:  # one target, never the cycle
                log_unexpected(f"reading {t.key}", exc)
                req = Request("", "", {}, "envoy", None, invalid=internal_error(exc))
            result = await self.scrape(t, req)
            if on_result is not None:
                on_result(result)
            return result

        online = [t for t in targets if not t.offline]
        keys = {t.key for t in online}
        # Targets gone from the list are forgotten, so the memory is bounded.
        self._failing = {k: v for k, v in self._failing.items() if k in keys}
        return await paced(online, spread, one, self.concurrency)

    async def clusters_pass(self, targets: list[Target],
                            request_for: Callable[[Target], Request | None],
                            spread: float = 0.0,
                            on_start: Callable[[Target], None] | None = None,
                            on_done: Callable[[ClustersRead], None] | None = None
                            ) -> list[ClustersRead]:
        """Every online target's ``/clusters``, the starts spread over ``spread``
        seconds; ``on_start`` sees each target as its read starts, ``on_done``
        each read as it ends."""

        async def one(t: Target) -> ClustersRead:
            if on_start is not None:
                on_start(t)
            try:
                req = request_for(t)
            except Exception as exc:  # one target, never the pass
                log_unexpected(f"reading {t.key}", exc)
                req = Request("", "", {}, "envoy", None, invalid=internal_error(exc))
            read = await self.read_clusters(t, req)
            if on_done is not None:
                on_done(read)
            return read

        online = [t for t in targets if not t.offline]
        return await paced(online, spread, one, self.concurrency)

    async def close(self) -> None:
        await self.client.close()


def internal_error(exc: BaseException) -> str:
    """The reason shown for an unexpected exception: its kind only. Its text
    may quote what the target sent (a parser's ValueError), so the details
    are in the log line that goes with it."""
    return f"internal error while reading this target ({type(exc).__name__}; details in the log)"


def log_unexpected(what: str, exc: BaseException) -> None:
    # The message escaped and cut like an answer (it may quote one); the
    # traceback, which repeats it raw, only for someone debugging.
    log.error("%s failed unexpectedly: %s", what, for_log(f"{type(exc).__name__}: {exc}"))
    log.debug("%s: traceback", what, exc_info=exc)
