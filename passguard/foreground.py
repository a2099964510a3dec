"""The gate comes first: the requests in flight, and the daemon's bulk work
giving way to them.

asyncio has no priorities. The web layer counts the requests it is serving
(a middleware); work that runs in pieces on the same loop, after each piece,
rests a moment while requests are in flight (or were, LINGER_SECONDS ago)
and takes only one turn of the loop otherwise. That keeps a piece of bulk
work (one mesh's gate summary, a slice of a /metrics render) to at most a
third of the loop while the gate is busy, and lets it run at full speed when
it is idle. Owned by the daemon, found by the routes on their backend.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

#: How long bulk work rests after a piece while the gate is busy.
REST_SECONDS = 0.002
#: A gate that served a request this recently counts as busy: between two
#: requests at 500/s none is in flight a third of the time.
LINGER_SECONDS = 0.05


class Foreground:
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

    async def give_way(self) -> None:
        """Between two pieces of bulk work: a rest while the gate is busy, a
        turn of the loop otherwise."""
        await asyncio.sleep(REST_SECONDS if self.busy() else 0)


__all__ = ["LINGER_SECONDS", "REST_SECONDS", "Foreground"]
