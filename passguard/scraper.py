"""One scrape cycle: every target's filtered ``/stats``, concurrently and bounded.

A failed probe is a result, not an exception (the blackbox_exporter rule): the
cycle always returns one result per target, and one slow proxy costs at most
``scrape.timeout`` of its own slot while the others go on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from ssl import SSLContext

from passguard.config import Config
from passguard.envoy.admin import AdminClient
from passguard.envoy.clusters import ClustersParser, Destination
from passguard.envoy.names import stats_filter
from passguard.envoy.promtext import PromStatsParser
from passguard.envoy.stats import StatsParser, StatsReading
from passguard.errors import ScrapeError
from passguard.pacing import paced
from passguard.targets import Target


@dataclass(frozen=True, slots=True)
class Request:
    """How to read a target that is not a plain Envoy admin (see sources.kuma)."""

    base: str
    path: str
    headers: Mapping[str, str]
    format: str  # "envoy" | "prometheus"
    clusters_path: str | None
    ssl: SSLContext | None = None


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
        self.client = AdminClient(cfg.scrape.concurrency, cfg.scrape.max_response_bytes,
                                  cfg.scrape.max_buffered_bytes)
        self.parser = StatsParser(cfg.passthrough_clusters, cfg.outbound_port)
        self.params = {"filter": stats_filter(cfg.passthrough_clusters, cfg.outbound_port)}
        self.clusters = ClustersParser(cfg.passthrough_clusters)
        self.prom_parser = PromStatsParser(cfg.passthrough_clusters, cfg.outbound_port)
        self._slots = asyncio.Semaphore(cfg.scrape.concurrency)

    async def scrape(self, target: Target, req: Request | None = None) -> ScrapeResult:
        async with self._slots:
            start = time.monotonic()
            try:
                if req is None:
                    # Direct Envoy admin: the server-side filter keeps it tiny.
                    text = await self.client.get(target.url, "/stats", self.params, self.timeout)
                    reading: StatsReading | None = self.parser.parse(text)
                else:
                    # Through the Kuma CP (no filter there) or kuma-dp's metrics.
                    text = await self.client.get(req.base, req.path, None, self.timeout,
                                                 req.headers, req.ssl)
                    parser = self.prom_parser if req.format == "prometheus" else self.parser
                    reading = parser.parse(text)
                error = None
            except ScrapeError as exc:
                reading, error = None, str(exc)
            duration = time.monotonic() - start
            return ScrapeResult(target, time.time(), duration, reading, error)

    async def read_clusters(self, target: Target, req: Request | None = None
                            ) -> tuple[Target, float, list[Destination] | None, str | None]:
        """One ``/clusters`` read: the destinations of the passthrough clusters."""
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
                return target, time.time(), None, str(exc)

    async def cycle(self, targets: list[Target],
                    request_for: Callable[[Target], Request | None] | None = None,
                    spread: float = 0.0,
                    on_result: Callable[[ScrapeResult], None] | None = None
                    ) -> list[ScrapeResult]:
        """Scrape every online target, the starts spread over ``spread`` seconds;
        ``on_result`` sees each result as soon as its scrape ends."""

        async def one(t: Target) -> ScrapeResult:
            result = await self.scrape(t, request_for(t) if request_for else None)
            if on_result is not None:
                on_result(result)
            return result

        online = [t for t in targets if not t.offline]
        return await paced(online, spread, one)

    async def clusters_pass(self, targets: list[Target],
                            request_for: Callable[[Target], Request | None],
                            spread: float = 0.0,
                            on_start: Callable[[Target], None] | None = None
                            ) -> list[tuple[Target, float, list[Destination] | None, str | None]]:
        """Every online target's ``/clusters``, the starts spread over ``spread``
        seconds; ``on_start`` sees each target as its read starts."""

        def one(t: Target) -> Awaitable[tuple[Target, float, list[Destination] | None,
                                              str | None]]:
            if on_start is not None:
                on_start(t)
            return self.read_clusters(t, request_for(t))

        online = [t for t in targets if not t.offline]
        return await paced(online, spread, one)

    async def close(self) -> None:
        await self.client.close()
