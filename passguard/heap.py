"""What the garbage collector may skip: the daemon freezes its heap after each cycle.

A full collection walks every tracked object while holding the GIL. With a
full evidence window (1,000 dataplanes, 15 minutes: ~120,000 objects, most of
them segments and their counters) one took 25-50 ms, every 20-60 s at 500
gate requests/s, and every request in flight waited (per-callback timer,
docs/reliability.md §5). Yet those passes found nothing: the evidence holds no
reference cycles and is freed by reference counting (measured: 0 cyclic
garbage objects in 30 cycles with gate and /metrics requests).

So after each cycle, once the new snapshot is published, everything alive
is frozen (``gc.freeze()``: moved out of the collector's generations, O(1)).
Frozen objects are still freed by reference counting as before; only a
reference cycle that becomes garbage after being frozen would stay (6
objects in 30 cycles, measured). Once an hour the heap is thawed and
collected in one full pass, so such cycles cannot accumulate.

Between two freezes the collector's own full passes are turned off too
(``take_over``: the third threshold out of reach); the young generations
are still collected as usual. What a cycle allocates (an evidence, a
segment, a ``/metrics`` section per dataplane, the snapshot, the gate's
summaries) is not frozen until the cycle ends, and at 10,000 dataplanes
that made the automatic full passes 40-85 ms each, 24 of them in 150 s at
500 gate requests/s, every one finding nothing (``collected=0``) and each
the longest stall a request met (docs/performance.md, "The scrape worker").
A reference cycle that outlives two young collections now waits for the
hourly pass, as a frozen one already did.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

#: How often frozen objects are collected once.
THAW_SECONDS = 3600.0
#: The collector's third threshold while the heap is owned: never reached.
NO_FULL_PASSES = 1 << 30
#: Young collections before the middle generation is collected (Python's
#: default: 10). Each object is walked once there whatever this is; what it
#: sets is how many are walked at once. With 10, a middle pass over ~11,000
#: objects cost 10-15 ms of CPU (measured with the thread's CPU clock) at
#: 10,000 dataplanes, once a second: the longest stall a request met.
MIDDLE_THRESHOLD = 1


class Freezer:
    def __init__(self, thaw_every: float = THAW_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._thaw_every = thaw_every
        self._clock = clock
        self._thawed = clock()
        self.enabled = False  # `passguard run` only: tests run many daemons per process

    def take_over(self) -> None:
        """What `passguard run` sets once started: the heap collected once and
        frozen, and no automatic full pass until the next thaw."""
        gc.collect()  # first, so no garbage is frozen
        gc.freeze()
        young, _, _ = gc.get_threshold()
        gc.set_threshold(young, MIDDLE_THRESHOLD, NO_FULL_PASSES)
        self.enabled = True

    def after_cycle(self) -> None:
        if not self.enabled:
            return
        now = self._clock()
        if now - self._thawed >= self._thaw_every:
            self._thawed = now
            frozen = gc.get_freeze_count()
            gc.unfreeze()
            found = gc.collect()
            log.debug("heap: %d frozen objects collected once, %d were garbage", frozen, found)
        gc.freeze()


__all__ = ["NO_FULL_PASSES", "THAW_SECONDS", "Freezer"]
