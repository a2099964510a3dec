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
import functools
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")
#: A ``give_way()`` for each run of work in pieces, awaited after each piece
#: (the daemon's: ``passguard.foreground.Foreground.pace``).
Pace = Callable[[], Callable[[], Awaitable[None]]]


async def turn() -> None:
    """One turn of the event loop: the ``give_way()`` of work with no gate to yield to."""
    await asyncio.sleep(0)


def one_turn() -> Callable[[], Awaitable[None]]:
    """The default ``Pace``: a turn of the loop between pieces, no rest."""
    return turn

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


#: Runs started in one turn of the event loop when the pass is behind its pace.
START_BURST = 100


async def paced(items: Sequence[T], spread: float,
                run: Callable[[T], Awaitable[R]], limit: int | None = None) -> list[R]:
    """``run(item)`` for every item, started evenly over ``spread`` seconds.

    With ``limit``, at most that many runs exist at once: a run due while
    ``limit`` are running starts when one ends (the scraper passes its
    concurrency, which its semaphore would impose anyway).

    Results come back in the order of ``items``. The first run that raises
    (or is cancelled) ends the pass with that error, as ``asyncio.gather``
    would; cancelling this cancels the runs already started (a stop
    mid-cycle leaves nothing behind).

    Each run reports its end through a callback attached when it starts, so
    the ends are as spread as the starts. ``gather`` over the 1,000 tasks at
    the end attached 1,000 callbacks at once; the ~990 tasks already done
    queued theirs together, and that one turn of the loop took ~2.5 ms of
    every gate request's time.
    """
    if not items:
        return []
    loop = asyncio.get_running_loop()
    start = loop.time()
    step = spread / len(items)
    results: list[Any] = [None] * len(items)
    remaining = len(items)
    finished: asyncio.Future[None] = loop.create_future()
    tasks: list[asyncio.Future[R]] = []
    running = 0
    slot: asyncio.Future[None] | None = None

    def ended(i: int, task: asyncio.Future[R]) -> None:
        nonlocal remaining, running
        running -= 1
        if slot is not None and not slot.done():
            slot.set_result(None)
        if finished.done():
            return
        if task.cancelled():
            finished.cancel()
        elif (exc := task.exception()) is not None:
            finished.set_exception(exc)
        else:
            results[i] = task.result()
            remaining -= 1
            if remaining == 0:
                finished.set_result(None)

    try:
        for i, item in enumerate(items):
            delay = start + i * step - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif i % START_BURST == START_BURST - 1:
                # Behind schedule (or no spread): starting 10,000 runs in one
                # callback held the loop ~110 ms; a turn every START_BURST.
                await asyncio.sleep(0)
            while limit is not None and running >= limit and not finished.done():
                # At most ``limit`` runs exist at once: 50,000 started at once
                # (spread 0) waited on the scraper's semaphore as 50,000
                # tasks, ~150 MB.
                slot = loop.create_future()
                await asyncio.wait((slot, finished), return_when=asyncio.FIRST_COMPLETED)
            if finished.done():
                break  # a run failed: start no more
            running += 1
            task = asyncio.ensure_future(run(item))
            task.add_done_callback(functools.partial(ended, i))
            tasks.append(task)
        await finished
        return results
    except BaseException:
        for started in tasks:
            started.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
