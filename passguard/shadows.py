"""The daemon's shadow policies: registered over HTTP, evaluated after every
destinations pass, persisted, exported.

Why after the destinations pass and not the scrape cycle: a shadow is judged
per destination (which ``ip:port``, over which transport), and only the
``/clusters`` reads of that pass attribute new connections to destinations
(``Destination.events``). A scrape cycle only moves per-dataplane counters,
which cannot tell a destination a ``Matched`` shadow keeps from one it cuts.

The pure work is ``passguard.gate.shadow``; this module holds the state, the
database (``passguard.store.shadows``) and the Prometheus collector. The
in-memory counters change only after the database has committed them, so
``/metrics`` never shows a count a crash would take back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from passguard.errors import InputError
from passguard.gate.shadow import (
    MAX_SHADOWS,
    PlanCache,
    Shadow,
    Tally,
    check_name,
    evaluate,
    increments,
    parse_shadow,
)
from passguard.policy.effective import Effective
from passguard.policy.model import MeshState
from passguard.store.destinations import Destination
from passguard.store.shadows import (
    DestDelta,
    DestRow,
    ShadowDB,
    ShadowExists,
    ShadowRow,
    TooManyShadows,
)
from passguard.targets import Target

log = logging.getLogger(__name__)
#: Destination rows kept per shadow: past it, connections still count in the
#: per-dataplane counters, but new destinations are not itemised.
MAX_DESTINATIONS = 10_000
#: Hourly refusal buckets are kept this long (``shadow show --days`` at most).
MAX_DAYS = 31
#: Rows listed per kind in ``GET /v1/shadows/{name}``, worst first.
MAX_LISTED = 100
#: Parsing a stored shadow at start-up: it was validated against the limits
#: of its day; a lowered ``limits.max_matches`` must not make it vanish.
RESTORE_MAX_MATCHES = 1_000_000
OTHER = "other"


class Conflict(Exception):
    """A 409: the name is taken, or the maximum number of shadows is reached."""


def rfc3339(t: float | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


Key = tuple[str, str, str]  # (mesh, dataplane, address)


class Shadows:
    def __init__(self, db: ShadowDB) -> None:
        self.db = db
        self.items: dict[str, Shadow] = {}
        #: (shadow, mesh, dataplane) → [refused, unproven, allowed], as committed.
        self.counters: dict[tuple[str, str, str], list[int]] = {}
        #: shadow → (mesh, dataplane, address) → last refusal / last unproven.
        self.last_cut: dict[str, dict[Key, float]] = {}
        self.last_unproven: dict[str, dict[Key, float]] = {}
        self.known: dict[str, set[Key]] = {}
        self.cache = PlanCache()
        self._lock = asyncio.Lock()
        self.failures = 0

    # -- start -----------------------------------------------------------------------

    def restore(self) -> int:
        """Load every shadow and its counters (blocking: run in a thread)."""
        for row in self.db.shadows():
            try:
                changes, _ = parse_shadow(row.documents, RESTORE_MAX_MATCHES)
            except InputError as exc:
                log.error("shadow %s: its stored documents no longer parse (%s): not "
                          "evaluated; `passguard shadow rm %s` removes it", row.name, exc, row.name)
                continue
            self.items[row.name] = Shadow(row.name, row.created, row.requester,
                                          tuple(row.documents), changes, row.evaluated_until)
        for shadow, mesh, dp, refused, unproven, allowed in self.db.dataplanes():
            self.counters[(shadow, mesh, dp)] = [refused, unproven, allowed]
        for shadow, d in self.db.destinations():
            self._remember(shadow, (d.mesh, d.dataplane, d.address), d.last_refused,
                           d.last_unproven)
        return len(self.items)

    def _remember(self, shadow: str, key: Key, cut: float | None,
                  unproven: float | None) -> None:
        self.known.setdefault(shadow, set()).add(key)
        if cut is not None:
            book = self.last_cut.setdefault(shadow, {})
            book[key] = max(cut, book.get(key, cut))
        if unproven is not None:
            book = self.last_unproven.setdefault(shadow, {})
            book[key] = max(unproven, book.get(key, unproven))

    # -- registry --------------------------------------------------------------------

    async def add(self, name: str, docs: list[Any], requester: str, now: float,
                  max_matches: int) -> tuple[Shadow, list[str]]:
        check_name(name)
        changes, warnings = parse_shadow(docs, max_matches)
        shadow = Shadow(name, now, requester, tuple(docs), changes, now)
        async with self._lock:
            try:
                await asyncio.to_thread(self.db.add, ShadowRow(name, now, requester, docs, now),
                                        MAX_SHADOWS)
            except ShadowExists:
                raise Conflict(f"shadow {name!r} exists: remove it first "
                               f"(passguard shadow rm {name})") from None
            except TooManyShadows:
                raise Conflict(f"at most {MAX_SHADOWS} shadows: remove one first "
                               "(passguard shadow rm NAME)") from None
            self._forget(name)
            self.items[name] = shadow
        return shadow, warnings

    async def remove(self, name: str) -> bool:
        async with self._lock:
            gone = await asyncio.to_thread(self.db.remove, name)
            self.items.pop(name, None)
            self._forget(name)
            return bool(gone)

    def _forget(self, name: str) -> None:
        for k in [k for k in self.counters if k[0] == name]:
            del self.counters[k]
        for book in (self.last_cut, self.last_unproven, self.known):
            book.pop(name, None)
        self.cache.forget(n for n in self.items if n != name)

    # -- evaluation ------------------------------------------------------------------

    async def evaluate(self, book: Iterable[tuple[str, Destination]],
                       targets: Iterable[Target], states: Mapping[str, MeshState],
                       now: float) -> int:
        """Evaluate every shadow on the increments since its cursor, write the
        result, then show it. Returns the connections judged. Raises when the
        write fails: the cursors did not move, the next pass retries."""
        async with self._lock:
            if not self.items:
                return 0
            shadows = list(self.items.values())
            # ~140 ms for 1,000 dataplanes and 20 shadows (docs/performance.md):
            # in a thread, so the event loop takes the GIL back every
            # switch interval (0.5 ms) and the gate keeps answering. The book
            # is not written meanwhile: the caller holds the cycle lock.
            tallies = await asyncio.to_thread(self._tallies, shadows, list(book),
                                              list(targets), dict(states), now)
            cursors, dps, dests, hours = self._rows(tallies)
            await asyncio.to_thread(self.db.apply, cursors, dps, dests, hours,
                                    int((now - MAX_DAYS * 86400) // 3600))
            self._commit(tallies)
            return sum(d.refused + d.unproven + d.allowed
                       for t in tallies for d in t.destinations.values())

    def _tallies(self, shadows: list[Shadow], book: list[tuple[str, Destination]],
                 targets: list[Target], states: dict[str, MeshState], now: float
                 ) -> list[Tally]:
        since = min(max(s.evaluated_until, s.created) for s in shadows)
        incs = increments(book, since)
        by_mesh: dict[str, list[Target]] = {}
        for t in sorted(targets, key=lambda t: t.key):
            by_mesh.setdefault(t.mesh, []).append(t)
        tallies: list[Tally] = []
        for s in shadows:
            after: dict[str, Effective] = {}
            for mesh in s.meshes:
                after.update(self.cache.get(s, mesh, states.get(mesh), by_mesh.get(mesh, [])))
            tallies.append(evaluate(s, after, incs, now) if after else Tally(s.name, now))
        return tallies

    def _rows(self, tallies: list[Tally]) -> tuple[
            list[tuple[str, float]], list[tuple[str, str, str, int, int, int]],
            list[DestDelta], list[tuple[str, str, str, str, int, int, int]]]:
        cursors: list[tuple[str, float]] = []
        dps: list[tuple[str, str, str, int, int, int]] = []
        dests: list[DestDelta] = []
        hours: list[tuple[str, str, str, str, int, int, int]] = []
        for t in tallies:
            cursors.append((t.shadow, t.until))
            known = self.known.get(t.shadow, set())
            room = MAX_DESTINATIONS - len(known)
            for (mesh, dp), (r, u, a) in t.dataplanes().items():
                dps.append((t.shadow, mesh, dp, r, u, a))
            for key, d in list(t.destinations.items()):
                if key not in known:
                    if room <= 0:
                        del t.destinations[key]  # counted per dataplane, not itemised
                        continue
                    room -= 1
                dests.append((t.shadow, *key, d.transport, d.refused, d.unproven, d.allowed,
                              d.first_refused, d.last_refused, d.first_unproven,
                              d.last_unproven))
            for (mesh, dp, addr, hour), (r, u) in t.hours.items():
                if (mesh, dp, addr) in t.destinations:
                    hours.append((t.shadow, mesh, dp, addr, hour, r, u))
        return cursors, dps, dests, hours

    def _commit(self, tallies: list[Tally]) -> None:
        for t in tallies:
            s = self.items.get(t.shadow)
            if s is None:
                continue  # removed meanwhile: its rows were not written either
            self.items[t.shadow] = Shadow(s.name, s.created, s.requester, s.documents,
                                          s.changes, t.until)
            for (mesh, dp), (r, u, a) in t.dataplanes().items():
                c = self.counters.setdefault((t.shadow, mesh, dp), [0, 0, 0])
                c[0] += r
                c[1] += u
                c[2] += a
            for key, d in t.destinations.items():
                self._remember(t.shadow, key, d.last_refused, d.last_unproven)

    # -- reading ---------------------------------------------------------------------

    def cutting(self, name: str, since: float) -> dict[str, set[str]]:
        """mesh → the addresses the shadow would have refused since ``since``."""
        out: dict[str, set[str]] = {}
        for (mesh, _, addr), t in self.last_cut.get(name, {}).items():
            if t >= since:
                out.setdefault(mesh, set()).add(addr)
        return out

    def summary(self, s: Shadow, window: float, now: float,
                blocks_unproven: Callable[[str], bool]) -> dict[str, Any]:
        totals = [0, 0, 0]
        for (name, _, _), c in self.counters.items():
            if name == s.name:
                totals = [x + y for x, y in zip(totals, c, strict=True)]
        clean_since = self._clean_since(s, blocks_unproven)
        return {
            "name": s.name, "created": rfc3339(s.created), "requester": s.requester,
            "meshes": list(s.meshes), "documents": s.summary(),
            "evaluated_until": rfc3339(s.evaluated_until),
            "would_block_connections": totals[0], "unproven_connections": totals[1],
            "allowed_connections": totals[2],
            "destinations_cut_in_window": sum(len(a) for a in
                                              self.cutting(s.name, now - window).values()),
            "clean_since": rfc3339(clean_since),
            "clean_for_seconds": max(0.0, round(now - clean_since, 3)),
        }

    def _clean_since(self, s: Shadow, blocks_unproven: Callable[[str], bool]) -> float:
        last = s.created
        for t in self.last_cut.get(s.name, {}).values():
            last = max(last, t)
        for (mesh, _, _), t in self.last_unproven.get(s.name, {}).items():
            if blocks_unproven(mesh):
                last = max(last, t)
        return last

    def report(self, name: str, since: float, window: float, now: float,
               blocks_unproven: Callable[[str], bool]) -> dict[str, Any] | None:
        """``GET /v1/shadows/{name}``: what it would have cut since ``since``
        (blocking: reads the database; run in a thread)."""
        s = self.items.get(name)
        if s is None:
            return None
        body = self.summary(s, window, now, blocks_unproven)
        counts = self.db.hours(name, int(since // 3600))
        refused, unproven = [], []
        for _, d in self.db.destinations(name):
            key = (d.mesh, d.dataplane, d.address)
            r, u = counts.get(key, (0, 0))
            if d.last_refused is not None and d.last_refused >= since:
                refused.append(_dest_json(d, r, d.first_refused, d.last_refused))
            if d.last_unproven is not None and d.last_unproven >= since:
                unproven.append(_dest_json(d, u, d.first_unproven, d.last_unproven))
        rows = sorted(((m, dp, c) for (n, m, dp), c in self.counters.items() if n == name),
                      key=lambda x: (-x[2][0], x[0], x[1]))
        dps = [{"mesh": m, "dataplane": dp, "would_block_connections": c[0],
                "unproven_connections": c[1], "allowed_connections": c[2]} for m, dp, c in rows]
        body.update({
            "since": rfc3339(since), "window_seconds": window,
            "refused": _worst(refused), "unproven": _worst(unproven),
            "unproven_blocks": {m: blocks_unproven(m) for m in s.meshes},
            "dataplanes": dps[:MAX_LISTED],
            "clean": not refused and not any(blocks_unproven(x["mesh"]) for x in unproven),
            "source": list(s.documents),
        })
        if len(dps) > MAX_LISTED:
            body["dataplanes_omitted"] = len(dps) - MAX_LISTED
        return body

    def collector(self, known_meshes: Callable[[], set[str]],
                  window: Callable[[], float]) -> Collector:
        return ShadowCollector(self, known_meshes, window)

    def close(self) -> None:
        self.db.close()


def _dest_json(d: DestRow, count: int, first: float | None, last: float | None
               ) -> dict[str, Any]:
    return {"mesh": d.mesh, "dataplane": d.dataplane, "address": d.address,
            "transport": d.transport, "connections": count,
            "first_seen": rfc3339(first), "last_seen": rfc3339(last)}


def _worst(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    items.sort(key=lambda x: (-int(x["connections"]), x["mesh"], x["dataplane"], x["address"]))
    return items[:MAX_LISTED]


class ShadowCollector(Collector):
    """``passguard_shadow_*``: read from the committed in-memory counters, no I/O.
    Destinations are never labels; mesh labels are meshes passguard watches
    (a shadow's document may name any: those are ``other``)."""

    def __init__(self, shadows: Shadows, known_meshes: Callable[[], set[str]],
                 window: Callable[[], float]) -> None:
        self._shadows = shadows
        self._known = known_meshes
        self._window = window

    def collect(self) -> Iterator[Metric]:
        s = self._shadows
        blocked = CounterMetricFamily(
            "passguard_shadow_would_block_connections",
            "Connections observed since the shadow was added that its policies would have "
            "refused", labels=["shadow", "mesh", "dataplane"])
        for (name, mesh, dp), c in sorted(s.counters.items()):
            blocked.add_metric([name, mesh, dp], c[0])
        dests = GaugeMetricFamily(
            "passguard_shadow_destinations",
            "Destinations the shadow would have refused within the evidence window",
            labels=["shadow", "mesh"])
        known = self._known()
        since = time.time() - self._window()
        for name, shadow in sorted(s.items.items()):
            cut = s.cutting(name, since)
            per_mesh: dict[str, int] = {}
            for mesh in shadow.meshes:
                label = mesh if mesh in known else OTHER
                per_mesh[label] = per_mesh.get(label, 0) + len(cut.get(mesh, ()))
            for label, n in sorted(per_mesh.items()):
                dests.add_metric([name, label], n)
        yield blocked
        yield dests
