"""The destination inventory: which external ``ip:port`` each dataplane reached.

Envoy's ``/clusters`` lists the hosts of an ORIGINAL_DST passthrough cluster
with per-host counters, but removes a host once it has been idle for the
cluster's cleanup interval (5 s by default) and creates it again on the next
connection, counters from zero. So a reading is a *sample*: passguard records
every increase it sees, attributes it to the time it saw it, and keeps, per
dataplane, how many window connections its observed destinations explain. What
the inventory did not see is reported as unexplained, never assumed harmless.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from passguard.envoy.clusters import MAX_ROUTES
from passguard.envoy.names import Family


class HostReading(NamedTuple):
    """One destination's counters from one ``/clusters`` read (summed over host lines)."""

    cx_total: int
    cx_active: int
    family: Family
    routes: tuple[str, ...] = ()  # the meshpassthrough_* clusters that carried it


@dataclass(slots=True)
class Destination:
    mesh: str
    dataplane: str
    service: str
    address: str
    family: Family
    first_seen: float
    last_seen: float
    connections: int = 0
    last_cx_total: int = 0
    last_active: int = 0
    # (time, increase) of every non-zero increase, pruned with the window.
    events: deque[tuple[float, int]] = field(default_factory=deque)
    # meshpassthrough_* clusters seen carrying it (bounded, newest kept).
    routes: tuple[str, ...] = ()

    def in_window(self, window_start: float) -> int:
        return sum(n for t, n in self.events if t >= window_start)

    def active_since(self, window_start: float) -> bool:
        return self.last_active > 0 or any(t >= window_start for t, _ in self.events)


@dataclass(frozen=True, slots=True)
class DestinationView:
    mesh: str
    dataplane: str
    service: str
    address: str
    family: Family
    first_seen: float
    last_seen: float
    connections: int
    window_connections: int
    active: int
    routes: tuple[str, ...] = ()

    @property
    def ip(self) -> str:
        host = self.address.rsplit(":", 1)[0]
        return host[1:-1] if host.startswith("[") else host

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])


class DestinationBook:
    def __init__(self) -> None:
        # dataplane key → address → Destination
        self.items: dict[str, dict[str, Destination]] = {}
        self.last_read: dict[str, float] = {}
        # dataplane key → its views, kept until a read changes them or the
        # window start passes one of their events (_KeyViews.valid_for).
        self._views: dict[str, _KeyViews] = {}
        # Every view of the book, while no dataplane's views were dropped: a
        # cycle's end asks for them all (10,000 dataplanes: ~12 ms of sorting
        # and lookups in one piece) and most cycles read no /clusters.
        self._version = 0
        self._all: tuple[int, float, float, tuple[DestinationView, ...]] | None = None

    def add(self, key: str, address: str, d: Destination) -> None:
        """A destination restored from the state database."""
        self.items.setdefault(key, {})[address] = d
        self._forget(key)

    def _forget(self, key: str) -> None:
        self._views.pop(key, None)
        self._version += 1

    def update(self, key: str, mesh: str, dataplane: str, service: str, t: float,
               hosts: Mapping[str, HostReading]) -> list[Destination]:
        """Record one ``/clusters`` read of a dataplane; return what changed."""
        changed = []
        self.last_read[key] = t
        self._forget(key)
        book = self.items.setdefault(key, {})
        for address, h in hosts.items():
            d = book.get(address)
            if d is None:
                d = book[address] = Destination(mesh, dataplane, service, address, h.family, t, t)
                inc = h.cx_total
            elif h.cx_total >= d.last_cx_total:
                inc = h.cx_total - d.last_cx_total
            else:
                # The host was cleaned up while idle and created again.
                inc = h.cx_total
            d.last_seen, d.last_cx_total, d.last_active = t, h.cx_total, h.cx_active
            d.service = service
            if h.routes and not set(h.routes) <= set(d.routes):
                d.routes = tuple(dict.fromkeys((*h.routes, *d.routes)))[:MAX_ROUTES]
            if inc:
                d.connections += inc
                d.events.append((t, inc))
            changed.append(d)
        for address, d in book.items():
            if address not in hosts and (d.last_cx_total or d.last_active):
                # Envoy removed the idle host: nothing is open, and a new host
                # for this address will count from zero.
                d.last_cx_total = d.last_active = 0
                changed.append(d)
        return changed

    def drop(self, keys: Iterable[str]) -> None:
        for key in keys:
            self.items.pop(key, None)
            self.last_read.pop(key, None)
            self._forget(key)

    def prune(self, before: float) -> None:
        for key, book in self.items.items():
            for d in book.values():
                if d.events and d.events[0][0] < before:
                    self._forget(key)
                while d.events and d.events[0][0] < before:
                    d.events.popleft()

    def all(self) -> Iterable[tuple[str, Destination]]:
        for key, book in self.items.items():
            for d in book.values():
                yield key, d

    def views(self, window_start: float) -> tuple[DestinationView, ...]:
        """Every destination as seen from ``window_start``, by dataplane then
        address. A dataplane's views are computed once after each read of it
        (the daemon asks right after recording it, so that work is spread over
        the pass) and reused while no event of theirs leaves the window."""
        memo = self._all
        if memo is not None and memo[0] == self._version and memo[1] <= window_start <= memo[2]:
            return memo[3]
        out: list[DestinationView] = []
        until = math.inf
        for key in sorted(self.items):
            out.extend(self.views_of(key, window_start))
            until = min(until, self._views[key].until)
        views = tuple(out)
        self._all = (self._version, window_start, until, views)
        return views

    def views_of(self, key: str, window_start: float) -> tuple[DestinationView, ...]:
        cached = self._views.get(key)
        if cached is not None and cached.valid_for(window_start):
            return cached.views
        book = self.items.get(key, {})
        views = tuple(_view(book[a], window_start) for a in sorted(book))
        # The earliest event still counted: once the window start passes it,
        # a count changes and the views must be computed again.
        until = min((t for d in book.values() for t, _ in d.events if t >= window_start),
                    default=math.inf)
        self._views[key] = _KeyViews(window_start, until, views)
        return views


@dataclass(frozen=True, slots=True)
class _KeyViews:
    start: float
    until: float
    views: tuple[DestinationView, ...]

    def valid_for(self, window_start: float) -> bool:
        # Counts are of events at or after the window start: the same for
        # every start in [start, until].
        return self.start <= window_start <= self.until


def _view(d: Destination, window_start: float) -> DestinationView:
    return DestinationView(d.mesh, d.dataplane, d.service, d.address, d.family, d.first_seen,
                           d.last_seen, d.connections, d.in_window(window_start), d.last_active,
                           d.routes)
