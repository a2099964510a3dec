"""Long loops of the poller on the event loop: short slices, then a rest.

The gate answers on the same event loop the poller uses. A loop over 1,000
dataplanes that runs for 10 ms delays every gate request that arrives
meanwhile by up to 10 ms, and a request needs several turns of the loop (read,
handle, audit commit, write), so it pays once per turn. Counting items per
slice does not bound that: the same 200 dataplanes take 3 ms on one machine
and 6 ms on a busier one. A :class:`Budget` bounds the time instead, and,
while requests are being served (or were, 50 ms ago), then rests, so that the poller's bursts
(snapshot, ``/metrics`` render, state write) never take more than a third of
the loop from them: asyncio has no priorities, and this is the poller giving
the gate its own. With no request in flight it only yields one turn.

Use::

    budget = Budget()
    for item in items:
        if budget.spent():
            await budget.pause()
        work(item)

``spent()`` is a clock read; the coroutine of ``pause()`` is only created
when it is due, so the check costs ~100 ns per item.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

#: Longest run of poller work between two turns of the loop. With a gate
#: request taking ~3 turns, background work adds at most ~3 ms to it.
BUDGET_SECONDS = 0.001
#: How long the poller work then rests: it takes at most a third of the loop.
#: At 500 requests/s the gate alone keeps the loop ~55 % busy; background
#: work taking more than the rest in a burst (a 45 ms /metrics render, a 30 ms
#: snapshot build) makes a queue that every request in the burst waits in.
REST_SECONDS = 0.002


#: A gate that served a request this recently counts as busy: between two
#: requests at 500/s none is in flight a third of the time.
LINGER_SECONDS = 0.05


class Foreground:
    """The requests the process is serving (the web layer counts them):
    poller work rests while there are some, or were a moment ago, so an idle
    daemon builds its snapshot at full speed."""

    __slots__ = ("_clock", "active", "last")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.active = 0
        self.last = -math.inf

    def enter(self) -> None:
        self.active += 1
        self.last = self._clock()

    def leave(self) -> None:
        self.active -= 1
        self.last = self._clock()

    def busy(self) -> bool:
        return self.active > 0 or self._clock() - self.last < LINGER_SECONDS


FOREGROUND = Foreground()


class Budget:
    __slots__ = ("_deadline", "_foreground", "_rest", "_seconds")

    def __init__(self, seconds: float = BUDGET_SECONDS, rest: float = REST_SECONDS,
                 foreground: Foreground = FOREGROUND) -> None:
        self._seconds = seconds
        self._rest = rest
        self._foreground = foreground
        self._deadline = time.perf_counter() + seconds

    def spent(self) -> bool:
        return time.perf_counter() >= self._deadline

    async def pause(self) -> None:
        """A turn of the loop (a rest, while requests are being served) in
        which the loop serves everything else, then a new budget."""
        await asyncio.sleep(self._rest if self._foreground.busy() else 0)
        self._deadline = time.perf_counter() + self._seconds


__all__ = ["BUDGET_SECONDS", "FOREGROUND", "REST_SECONDS", "Budget", "Foreground"]
