"""Spreading a pass over many targets in time, as Prometheus offsets its targets.

Starting 1,000 scrapes at once makes their answers arrive together, and the
event loop then parses them in one run of callbacks while every gate request
waits (measured: stalls of 50–90 ms per scrape cycle and up to 600 ms per
``/clusters`` pass with 1,000 targets, ``docs/reliability.md`` §5). Started
evenly over a *spread*, the same work comes as many small pieces the loop
interleaves with requests.

``auto`` (the default) starts at most ``rate`` requests a second, and never
spreads over more than half the interval (nor past ``interval - timeout``),
so a cycle still ends inside its interval. A small fleet is thus read at once
(10 targets: 50 ms), a large one evenly (1,000 targets: 5 s of a 15 s scrape
interval).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

#: Scrape starts per second in ``auto``: a filtered /stats read costs the loop
#: ~0.4 ms, so 200 a second is ~8 % of one core.
AUTO_SCRAPE_RATE = 200.0
#: /clusters reads per second in ``auto``: a body of 100 clusters takes ~1.6 ms
#: to parse and a 200 KB body to read, so 25 a second (a 60 s interval:
#: 1,000 sidecars over 30 s) keeps a pass from crowding the gate.
AUTO_CLUSTERS_RATE = 25.0


def spread_for(count: int, configured: float | None, interval: float, timeout: float,
               rate: float) -> float:
    """Seconds over which ``count`` starts are spread (``configured`` None = auto)."""
    if configured is not None:
        return configured
    ceiling = max(0.0, min(interval / 2, interval - timeout))
    return min(count / rate, ceiling)


async def paced(items: Sequence[T], spread: float,
                run: Callable[[T], Awaitable[R]]) -> list[R]:
    """``run(item)`` for every item, started evenly over ``spread`` seconds.

    Results come back in the order of ``items``. Cancelling this cancels the
    runs already started (a stop mid-cycle leaves nothing behind).
    """
    if not items:
        return []
    loop = asyncio.get_running_loop()
    start = loop.time()
    step = spread / len(items)
    tasks: list[asyncio.Future[R]] = []
    try:
        for i, item in enumerate(items):
            delay = start + i * step - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(run(item)))
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
