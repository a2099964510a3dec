"""One scrape cycle: every target's filtered ``/stats``, concurrently and bounded.

A failed probe is a result, not an exception (the blackbox_exporter rule): the
cycle always returns one result per target, and one slow proxy costs at most
``scrape.timeout`` of its own slot while the others go on.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from passguard.config import Config
from passguard.envoy.admin import AdminClient
from passguard.envoy.names import stats_filter
from passguard.envoy.stats import StatsParser, StatsReading
from passguard.errors import ScrapeError
from passguard.targets import Target


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
        self.client = AdminClient(cfg.scrape.concurrency, cfg.scrape.max_response_bytes)
        self.parser = StatsParser(cfg.passthrough_clusters)
        self.params = {"filter": stats_filter(cfg.passthrough_clusters)}
        self._slots = asyncio.Semaphore(cfg.scrape.concurrency)

    async def scrape(self, target: Target) -> ScrapeResult:
        async with self._slots:
            start = time.monotonic()
            try:
                text = await self.client.get(target.url, "/stats", self.params, self.timeout)
                reading: StatsReading | None = self.parser.parse(text)
                error = None
            except ScrapeError as exc:
                reading, error = None, str(exc)
            duration = time.monotonic() - start
            return ScrapeResult(target, time.time(), duration, reading, error)

    async def cycle(self, targets: list[Target]) -> list[ScrapeResult]:
        return list(await asyncio.gather(*(self.scrape(t) for t in targets if not t.offline)))

    async def close(self) -> None:
        await self.client.close()
