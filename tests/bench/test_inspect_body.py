"""The inspect-API path: a full, unfiltered ``/stats`` body of a big sidecar
(~20 MB, thousands of clusters, as the Kuma CP returns it) parsed by the same
StatsParser, checked against the fleet simulator's ground truth. Correctness
only: its speed is reported by bench/run.py (scan_mb_per_s)."""

from __future__ import annotations

import aiohttp

from bench.fleet import start_fleet
from passguard.envoy.names import DEFAULT_CLUSTERS_PATTERN
from passguard.envoy.stats import StatsParser

CLOCK = 1_800_000_000.0


async def test_twenty_megabyte_stats_body() -> None:
    fleet = await start_fleet(4, clusters=2800, seed=3, clock=lambda: CLOCK, workers=1,
                              patterns="steady=1.0")
    try:
        async with aiohttp.ClientSession() as s, s.get(fleet.base_url(1) + "/stats") as r:
            body = await r.text()
        assert len(body) > 20_000_000, len(body)
        reading = StatsParser(DEFAULT_CLUSTERS_PATTERN).parse(body)
        want = fleet.expected(1, CLOCK).reading()
        assert reading == want
        assert sum(c.cx_total for c in reading.families.values()) > 0, "a busy sidecar"
    finally:
        await fleet.stop()
