"""The reset-aware evidence window of one dataplane.

Successive samples of Envoy's cumulative counters are turned into *segments*:
``(start, end, increase)`` — what the proxy did between two moments. Summing
the segments that fall in the window gives Prometheus ``increase()`` without
its extrapolation, and the segments also answer the harder question: does
passguard's evidence *cover* the window (DESIGN §3 "Coverage")?

- A counter that goes down, or an uptime that did not advance with the clock,
  is a proxy restart: the increase is the new value (all since the restart).
- The first sample of a proxy contributes a segment from the proxy's start
  (``server.uptime``) to the sample. If the proxy started inside the window,
  all of it counts; if it read zero, nothing happened; otherwise its traffic
  may predate the window, and the evidence is incomplete until one window has
  passed.
- A segment that straddles the window start is counted whole when it is short
  (a normal scrape interval: counting a few seconds early errs on the safe
  side), and makes the evidence incomplete when it is long and not zero.
- A restart inside a long gap loses what the old incarnation did after the
  last sample: that stretch is incomplete.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from passguard.envoy.names import Family
from passguard.envoy.stats import ZERO, Counters, StatsReading

NEG_INF = -math.inf
# Envoy refreshes server.uptime when it flushes stats (every 5 s by default),
# so an uptime may lag the clock by that much plus scrape latency.
UPTIME_SLACK_SECONDS = 10.0


class Segment(NamedTuple):
    start: float
    end: float
    increase: dict[Family, Counters]
    complete: bool = True

    @property
    def connections(self) -> int:
        return sum(c.cx_total for c in self.increase.values())

    @property
    def empty(self) -> bool:
        return self.complete and not any(any(c) for c in self.increase.values())


class Sample(NamedTuple):
    t: float
    uptime: float | None
    families: dict[Family, Counters]


@dataclass(slots=True)
class WindowResult:
    connections: dict[Family, Counters]
    covered: bool
    # Why not covered, for a person: "watched 2m of 15m", "restart in a gap".
    gap_reason: str | None

    @property
    def total_connections(self) -> int:
        return sum(c.cx_total for c in self.connections.values())

    @property
    def blocked(self) -> int:
        return sum(c.no_route for c in self.connections.values())


def _delta(a: Counters, b: Counters) -> Counters:
    # cx_active is a gauge: an increase of it means nothing, keep it at 0.
    return Counters(
        b.cx_total - a.cx_total, 0, b.tx_bytes - a.tx_bytes, b.rx_bytes - a.rx_bytes,
        b.connect_fail - a.connect_fail, b.overflow - a.overflow, b.no_route - a.no_route,
    )


def _as_increase(c: Counters) -> Counters:
    return c._replace(cx_active=0)


def restarted(a: Sample, b: Sample) -> bool:
    """Did the proxy restart between two samples?"""
    for fam, cb in b.families.items():
        ca = a.families.get(fam)
        # Every field but cx_active (a gauge) is a counter: one going down
        # means the proxy started counting again.
        if ca is not None and any(
            y < x for i, (x, y) in enumerate(zip(ca, cb, strict=True)) if i != 1
        ):
            return True
    if a.uptime is not None and b.uptime is not None:
        if b.uptime < a.uptime:
            return True
        # The uptime did not advance with the clock: the proxy is younger than
        # the gap since the last sample, so it restarted inside the gap.
        if b.uptime + UPTIME_SLACK_SECONDS < a.uptime + (b.t - a.t):
            return True
    return False


class History:
    """Segments of one dataplane plus what the status page and metrics need."""

    __slots__ = ("_window", "last", "last_attempt", "last_duration", "last_error",
                 "last_success", "pruned_until", "segments")

    def __init__(self) -> None:
        # A list, not a deque: an empty deque is ~600 bytes (one block), 25 MB
        # over 50,000 dataplanes, and pruning drops a few from the front.
        self.segments: list[Segment] = []
        self.last: Sample | None = None
        self.last_success: float | None = None
        self.last_attempt: float | None = None
        self.last_error: str | None = None
        self.last_duration: float | None = None
        # Segments ending at or before this were pruned with traffic (or
        # incomplete) in them: a window reaching back before it is uncovered.
        self.pruned_until: float = NEG_INF
        # The last window() answer: (start, short, valid before, result). It
        # holds for any later start before the next segment boundary, which
        # is how an idle dataplane's evidence costs nothing to recompute.
        self._window: tuple[float, float, float, WindowResult] | None = None

    def add(self, t: float, reading: StatsReading, stale_gap: float) -> list[Segment]:
        """Record a successful scrape; return the segments it added (to persist)."""
        b = Sample(t, reading.uptime, reading.families)
        a = self.last
        added: list[Segment] = []
        if a is None:
            start = t - reading.uptime if reading.uptime is not None else NEG_INF
            inc = {f: _as_increase(c) for f, c in b.families.items()}
            added.append(Segment(start, t, inc))
        elif restarted(a, b):
            inc = {f: _as_increase(c) for f, c in b.families.items()}
            if t - a.t <= stale_gap:
                # A regular cadence: what the old proxy did after sample `a`
                # is at most one interval's worth, accepted as Prometheus does.
                added.append(Segment(a.t, t, inc))
            elif b.uptime is not None:
                restart_at = max(a.t, t - b.uptime)
                added.append(Segment(a.t, restart_at, {}, complete=False))
                added.append(Segment(restart_at, t, inc))
            else:
                added.append(Segment(a.t, t, inc, complete=False))
        else:
            inc = {}
            for fam, cb in b.families.items():
                ca = a.families.get(fam)
                inc[fam] = _as_increase(cb) if ca is None else _delta(ca, cb)
            added.append(Segment(a.t, t, inc))
        # A complete segment in which nothing at all happened changes no window
        # sum and uncovers nothing: not storing it keeps an idle fleet's memory
        # and per-cycle work flat (most sidecars are idle most of the time).
        added = [s for s in added if not s.empty]
        if added or a is None:
            self._window = None
        self.segments.extend(added)
        self.last = b
        self.last_success = t
        self.last_attempt = t
        self.last_error = None
        return added

    def fail(self, t: float, error: str) -> None:
        self.last_attempt = t
        self.last_error = error

    def prune(self, before: float) -> None:
        """Forget segments that ended before ``before`` (older than any window asked)."""
        segs = self.segments
        gone = 0
        while gone < len(segs) and segs[gone].end <= before:
            seg = segs[gone]
            if seg.connections or not seg.complete:
                self.pruned_until = max(self.pruned_until, seg.end)
            gone += 1
        if gone:
            self._window = None
            del segs[:gone]

    def window(self, window_start: float, short: float) -> WindowResult:
        """Increase inside ``[window_start, last sample]`` and whether it is complete."""
        cached = self._window
        if cached is not None and cached[1] == short and cached[0] <= window_start < cached[2]:
            return cached[3]
        # Plain lists, one Counters at the end: this runs for every dataplane
        # every cycle, and NamedTuple arithmetic dominated it.
        acc: dict[Family, list[int]] = {}
        covered = True
        reason: str | None = None
        if self.last is None:
            return WindowResult({}, False, "never scraped successfully")
        # The answer changes only when the start passes a segment's end (it
        # leaves), a long segment's start (it stops counting whole) or the
        # pruning mark: the earliest of those above the start bounds reuse.
        valid_before = math.inf
        for seg in reversed(self.segments):
            if seg.end <= window_start:
                break
            valid_before = min(valid_before, seg.end)
            if not seg.complete:
                covered = False
                reason = "the proxy restarted during a gap in scraping"
            inside, long = seg.start >= window_start, seg.end - seg.start > short
            if inside and long:
                valid_before = min(valid_before, seg.start)
            if inside or not long:  # counted whole
                for fam, c in seg.increase.items():
                    row = acc.get(fam)
                    if row is None:
                        acc[fam] = list(c)
                    else:
                        for i, v in enumerate(c):
                            row[i] += v
            elif seg.connections:
                covered = False
                reason = reason or "its counters include traffic from before passguard watched it"
        if self.pruned_until > window_start:
            covered = False
            reason = reason or "older samples were already pruned"
            valid_before = min(valid_before, self.pruned_until)
        result = WindowResult({f: Counters(*v) for f, v in acc.items()}, covered, reason)
        self._window = (window_start, short, valid_before, result)
        return result

    def since_start(self) -> WindowResult:
        """Everything the proxy counted since it started: the standalone check."""
        if self.last is None:
            return WindowResult({}, False, "never scraped successfully")
        return WindowResult({f: _as_increase(c) for f, c in self.last.families.items()},
                            True, None)

    def active(self) -> int:
        return sum(c.cx_active for c in self.last.families.values()) if self.last else 0


__all__ = ["NEG_INF", "ZERO", "History", "Sample", "Segment", "WindowResult", "restarted"]
