"""The immutable view every reader gets: evidence per dataplane, summaries per mesh.

The poller builds a Snapshot after each scrape cycle; the gate, the metrics
collector, the status page and the JSON API only read it. Nothing here does I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from passguard.envoy.names import Family
from passguard.envoy.stats import Counters
from passguard.store.destinations import DestinationView
from passguard.targets import Target

State = Literal["fresh", "stale", "failed", "offline"]
STATES: tuple[State, ...] = ("fresh", "stale", "failed", "offline")


@dataclass(frozen=True, slots=True)
class DataplaneEvidence:
    target: Target
    state: State
    covered: bool
    gap_reason: str | None
    # Increases inside the window (or since the proxy started, standalone).
    window: Mapping[Family, Counters]
    active_connections: int
    # Latest cumulative counters, exported as Prometheus counters.
    latest: Mapping[Family, Counters]
    uptime: float | None
    last_success: float | None
    last_attempt: float | None
    error: str | None
    scrape_duration: float | None
    # "scrape": passguard read this proxy itself; "prometheus": from PromQL
    # (its series already live in that Prometheus, and it has no /clusters).
    origin: str = "scrape"
    # Stale threshold of the source when it differs (a Prometheus scraping
    # less often than passguard); None: the snapshot's.
    stale_after: float | None = None
    # Totals over all families, derived once: every gate request reads them
    # for each dataplane of the mesh it decides on.
    _connections: int = field(init=False, repr=False, compare=False)
    _active: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_connections", sum(c.cx_total for c in self.window.values()))
        object.__setattr__(self, "_active", sum(c.cx_active for c in self.latest.values()))

    @property
    def connections(self) -> int:
        return self._connections

    @property
    def blocked_connections(self) -> int:
        return sum(c.no_route for c in self.window.values())

    @property
    def has_traffic(self) -> bool:
        return self.connections > 0 or self.active_connections > 0

    @property
    def unknown(self) -> bool:
        """Evidence cannot vouch for this dataplane (offline ones are only listed)."""
        if self.state == "offline":
            return False
        return self.state in ("stale", "failed") or not self.covered

    def unknown_reason(self) -> str:
        if self.state == "failed":
            return f"failed: {self.error}" if self.error else "failed"
        if self.state == "stale":
            return "stale"
        return self.gap_reason or "evidence does not cover the window"

    def at(self, now: float, stale_after: float) -> DataplaneEvidence:
        """This evidence as seen at ``now``: fresh turns stale once its last
        success is older than its source's threshold (``stale_after`` when it
        has none of its own)."""
        limit = self.stale_after or stale_after
        if self.state == "fresh" and (self.last_success is None
                                      or now - self.last_success > limit):
            return replace(self, state="stale")
        return self

    def connections_in(self, families: frozenset[Family]) -> int:
        if not self._connections or families.issuperset(self.window):
            return self._connections
        return sum(c.cx_total for f, c in self.window.items() if f in families)

    def active_in(self, families: frozenset[Family]) -> int:
        if not self._active or families.issuperset(self.latest):
            return self._active
        return sum(c.cx_active for f, c in self.latest.items() if f in families)


@dataclass(frozen=True, slots=True)
class Snapshot:
    time: float
    # None: evidence is "since each proxy started" (one standalone scrape).
    window_seconds: float | None
    stale_after: float
    dataplanes: tuple[DataplaneEvidence, ...]
    ready: bool = False
    destinations: tuple[DestinationView, ...] = ()
    # Derived once per snapshot (every gate request reads them): the
    # dataplanes per mesh, and the moment the first fresh one turns stale.
    _by_mesh: dict[str, tuple[DataplaneEvidence, ...]] = field(
        init=False, repr=False, compare=False)
    _fresh_until: float = field(init=False, repr=False, compare=False)
    _dests_by_mesh: dict[str, tuple[DestinationView, ...]] = field(
        init=False, repr=False, compare=False)
    # The gate's per-mesh evidence summaries (passguard.gate.decide.summarize):
    # computed once per snapshot, shared by the requests until the next one.
    memo: dict[Any, Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        dests: dict[str, list[DestinationView]] = {}
        for dest in self.destinations:
            dests.setdefault(dest.mesh, []).append(dest)
        object.__setattr__(self, "_dests_by_mesh", {m: tuple(v) for m, v in dests.items()})
        by_mesh: dict[str, list[DataplaneEvidence]] = {}
        until = math.inf
        for d in self.dataplanes:
            by_mesh.setdefault(d.target.mesh, []).append(d)
            if d.state == "fresh":
                limit = d.stale_after or self.stale_after
                until = min(until, (d.last_success or -math.inf) + limit)
        object.__setattr__(self, "_by_mesh", {m: tuple(v) for m, v in by_mesh.items()})
        object.__setattr__(self, "_fresh_until", until)
        object.__setattr__(self, "memo", {})

    def meshes(self) -> list[str]:
        return sorted(self._by_mesh)

    def for_mesh(self, mesh: str) -> tuple[DataplaneEvidence, ...]:
        return self._by_mesh.get(mesh, ())

    def destinations_of(self, mesh: str) -> tuple[DestinationView, ...]:
        return self._dests_by_mesh.get(mesh, ())

    def with_destinations(self, destinations: tuple[DestinationView, ...]) -> Snapshot:
        """This snapshot with new destination views. The evidence, and each
        mesh's destinations that did not change, are the same tuples as here,
        so the gate's judgements of the meshes whose destinations did not
        change (memo entries keyed by those tuples) carry over."""
        new = replace(self, destinations=destinations)
        object.__setattr__(new, "_by_mesh", self._by_mesh)
        dests = dict(new._dests_by_mesh)
        for mesh, views in new._dests_by_mesh.items():
            old = self._dests_by_mesh.get(mesh)
            if old is not None and old == views:
                dests[mesh] = old
        object.__setattr__(new, "_dests_by_mesh", dests)

        def same(key: Any) -> bool:
            # A judgement's key names its mesh, then its tuples by identity.
            return (isinstance(key, tuple) and len(key) > 2 and isinstance(key[0], str)
                    and key[1] == id(self._by_mesh.get(key[0]))
                    and key[2] == id(dests.get(key[0], ())))

        new.memo.update((k, v) for k, v in self.memo.items() if same(k))
        return new

    def at(self, now: float) -> Snapshot:
        """The snapshot as seen at ``now``: a dataplane whose last success is older
        than the stale threshold is stale even if the poller itself has stalled."""
        if now - self.time <= 0 or now <= self._fresh_until:
            return self  # no fresh dataplane has gone stale since: nothing to redo
        return replace(self, dataplanes=tuple(d.at(now, self.stale_after)
                                              for d in self.dataplanes))


def mesh_summary(mesh: str, dps: tuple[DataplaneEvidence, ...]) -> dict[str, Any]:
    """The per-mesh numbers of ``GET /v1/meshes`` (without the verdict)."""
    counts = {s: 0 for s in ("fresh", "stale", "failed", "offline")}
    for d in dps:
        counts[d.state] += 1
    return {
        "mesh": mesh,
        "dataplanes": {
            "total": len(dps),
            **counts,
            "with_traffic": sum(1 for d in dps if d.has_traffic),
            "unknown": sum(1 for d in dps if d.unknown),
        },
        "connections": sum(d.connections for d in dps),
        "active_connections": sum(d.active_connections for d in dps),
        "blocked_connections": sum(d.blocked_connections for d in dps),
    }
