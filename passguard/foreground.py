"""The gate comes first: the requests in flight, and the daemon's bulk work
giving way to them.

asyncio has no priorities. The web layer counts the requests it is serving
(a middleware); work that runs in pieces on the same loop (one mesh's gate
summary, a slice of a /metrics render) paces itself: after each piece it
rests twice as long as the piece took while requests are in flight (or were,
LINGER_SECONDS ago), so it keeps at most a third of the loop from a busy
gate, and takes one turn of the loop otherwise, so it runs at full speed when
the gate is idle. A thread's bulk work (the state write) rests
the same way (``pace_thread``). Owned by the daemon, found by the routes on
their backend.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable

#: Bulk work rests this many times as long as its piece took while the gate
#: is busy (it keeps a third of the loop), at least REST_SECONDS, at most
#: MAX_REST_SECONDS (a piece that long is a bug to fix, not to wait out).
REST_FACTOR = 2.0
REST_SECONDS = 0.002
MAX_REST_SECONDS = 0.05
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

    def pace(self) -> Callable[[], Awaitable[None]]:
        """A ``give_way()`` for one run of bulk work, to await after each of
        its pieces: it rests REST_FACTOR times the piece's time while the gate
        is busy, and takes one turn of the loop otherwise."""
        since = self._clock()

        async def give_way() -> None:
            nonlocal since
            await asyncio.sleep(_rest(self._clock() - since) if self.busy() else 0)
            since = self._clock()

        return give_way

    def pace_thread(self) -> Callable[[], None]:
        """``pace`` for bulk work in a thread (the state write): ``time.sleep``
        instead of the loop's. A thread cannot be given a lower priority for
        the GIL; resting hands it to the loop for whole milliseconds, where a
        thread left running took it back every switch interval and halved the
        loop's share while the gate was queueing (a cycle's write: ~130 ms
        of requests over 10 ms at 500/s)."""
        since = self._clock()

        def give_way() -> None:
            nonlocal since
            if self.busy():
                time.sleep(_rest(self._clock() - since))
            since = self._clock()

        return give_way


def _rest(piece: float) -> float:
    """How long bulk work rests after a piece of ``piece`` seconds while the gate is busy."""
    return min(MAX_REST_SECONDS, max(REST_SECONDS, REST_FACTOR * piece))


__all__ = ["LINGER_SECONDS", "MAX_REST_SECONDS", "REST_FACTOR", "REST_SECONDS", "Foreground"]
