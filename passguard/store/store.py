"""The evidence store: one History per dataplane, fed by scrape results.

Only the poller writes here (one cycle at a time); it publishes an immutable
Snapshot that every reader uses. Persistence is done off the event loop.

Each dataplane's evidence is computed when its scrape result is recorded, so
that work is spread over the cycle like the scrapes; publishing a snapshot
then only assembles what is done. Evidence computed at a scrape's time sees a
window starting up to one cycle earlier than the snapshot's: it can count a
little more traffic, never less (docs/architecture.md, "Evidence as results
arrive").
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator

from passguard.envoy.clusters import Destination as EnvoyDestination
from passguard.scraper import ScrapeResult
from passguard.store.destinations import Destination, DestinationBook, DestinationView, HostReading
from passguard.store.persistence import StateDB
from passguard.store.snapshot import DataplaneEvidence, Snapshot, State
from passguard.store.window import History, Segment
from passguard.targets import Target

log = logging.getLogger(__name__)
#: Dataplanes assembled per piece of a paced assembly.
ASSEMBLE_SLICE = 250


class Store:
    def __init__(self, window: float, stale_after: float, db: StateDB | None = None,
                 since_start: bool = False) -> None:
        self.window = window
        self.stale_after = stale_after
        self.db = db
        # Standalone `passguard check -c`: one scrape, counters since proxy start.
        self.since_start = since_start
        self.targets: dict[str, Target] = {}
        self.histories: dict[str, History] = {}
        self.book = DestinationBook()
        self._removed: set[str] = set()
        # Segments not yet in the database (a failed write keeps them here).
        self._unsaved: dict[str, tuple[History, list[Segment]]] = {}
        self._unsaved_dests: dict[tuple[str, str], tuple[str, Destination]] = {}
        # Per dataplane, the /stats sample (time, passthrough totals) current
        # when its last successful /clusters read started.
        self._clusters_marks: dict[str, tuple[float, tuple[int, int]]] = {}
        self.restored = False
        self.cycles = 0
        self.extra: tuple[DataplaneEvidence, ...] = ()
        self.snapshot = Snapshot(0.0, None if since_start else window, stale_after, ())
        # Evidence computed as results were recorded, with the assembly
        # (generation) it is for: one recorded before the last assembly is
        # computed again at the next, so none lags more than a cycle.
        self._evidence_of: dict[str, tuple[int, DataplaneEvidence]] = {}
        self._generation = 0
        #: Called with each dataplane's evidence as it is computed (the
        #: /metrics lines are rendered then, spread over the cycle).
        self.on_evidence: Callable[[DataplaneEvidence], None] | None = None
        #: Gives each state write its ``pause()`` (the daemon's: rest while
        #: the gate is busy, ``Foreground.pace_thread``); None writes at once.
        self.write_pacer: Callable[[], Callable[[], None]] | None = None

    def configure(self, window: float, stale_after: float) -> None:
        """A reload's window and stale threshold. Evidence computed under the
        old ones is not assembled again: a longer window must not be judged
        on what a shorter one counted."""
        self.window, self.stale_after = window, stale_after
        self._generation += 1

    def restore(self) -> int:
        """Load the persisted window; return how many dataplanes it held."""
        if self.db is None:
            return 0
        self.histories = self.db.load()
        self.db.load_destinations(self.book)
        self.restored = bool(self.histories)
        return len(self.histories)

    def set_targets(self, targets: Iterable[Target], drop_missing: bool = True) -> None:
        """The targets to scrape now. With ``drop_missing`` false (a control plane
        has not answered yet) evidence of absent dataplanes is kept, not deleted."""
        new = {t.key: t for t in targets}
        for key in set(self.histories) - set(new):
            if not drop_missing:
                continue
            del self.histories[key]
            self._removed.add(key)
        self.book.drop(self._removed)
        for key in self._removed:
            self._clusters_marks.pop(key, None)
            self._evidence_of.pop(key, None)
        self.targets = new
        for key in new:
            self.histories.setdefault(key, History())
            self._removed.discard(key)

    def record(self, results: Iterable[ScrapeResult]) -> None:
        """A whole cycle's results at once (the one-shot CLI check)."""
        for r in results:
            self.record_one(r)
        self.finish_cycle()

    def record_one(self, r: ScrapeResult) -> bool:
        """One scrape result, as soon as it is in: the daemon records each when
        its scrape ends, so a cycle's bookkeeping is spread like its scrapes.
        False: its target was removed while the scrape was in flight."""
        h = self.histories.get(r.target.key)
        if h is None:
            return False
        h.last_duration = r.duration
        if r.reading is not None:
            added = h.add(r.t, r.reading, self.stale_after)
        else:
            h.fail(r.t, r.error or "unknown error")
            added = []
        h.prune(self.prune_before(r.t))
        key = r.target.key
        if self.db is not None:
            self._unsaved.setdefault(key, (h, []))[1].extend(added)
        target = self.targets.get(key)
        if target is not None and not self.since_start:
            ev = self._evidence(key, target, r.t)
            self._evidence_of[key] = (self._generation, ev)
            if self.on_evidence is not None:
                self.on_evidence(ev)
        return True

    def finish_cycle(self) -> None:
        self.cycles += 1

    def clusters_mark(self, key: str) -> tuple[float, tuple[int, int]] | None:
        """The latest /stats sample of a dataplane: its time and passthrough
        (connections opened, open now), summed over the families."""
        h = self.histories.get(key)
        if h is None or h.last is None:
            return None
        fams = h.last.families.values()
        return h.last.t, (sum(c.cx_total for c in fams), sum(c.cx_active for c in fams))

    def set_clusters_mark(self, key: str, mark: tuple[float, tuple[int, int]] | None) -> None:
        """After a /clusters read of ``key`` (None: it failed, read it next time)."""
        if mark is None or key not in self.targets:
            self._clusters_marks.pop(key, None)
        else:
            self._clusters_marks[key] = mark

    def quiet_since_clusters_read(self, key: str) -> bool:
        """No passthrough connection opened, and none open, from the start of
        the last successful /clusters read to the latest /stats sample: its
        passthrough hosts cannot have changed, and reading them again (a body
        of 300 KB for 100 clusters, tens of MB on a big mesh) is skipped.
        Not quiet when the proxy is failing or has no sample newer than the
        read: the counters must prove it."""
        mark = self._clusters_marks.get(key)
        h = self.histories.get(key)
        now = self.clusters_mark(key)
        if mark is None or now is None or h is None or h.last_error is not None:
            return False
        (mark_t, mark_totals), (now_t, now_totals) = mark, now
        return now_t > mark_t and now_totals == mark_totals and now_totals[1] == 0

    async def clusters_due(self, pause: Callable[[], Awaitable[None]]) -> tuple[list[Target], int]:
        """The targets a /clusters pass reads (those not ``quiet_since_clusters_read``)
        and how many it skips, ``pause()`` every ASSEMBLE_SLICE targets."""
        due: list[Target] = []
        listed = list(self.targets.items())
        for n, (key, t) in enumerate(listed):
            if n and not n % ASSEMBLE_SLICE:
                await pause()
            if not self.quiet_since_clusters_read(key):
                due.append(t)
        return due, len(listed) - len(due)

    def record_destinations(self, reads: Iterable[tuple[Target, float, list[EnvoyDestination]]]
                            ) -> list[tuple[str, Destination]]:
        changed: list[tuple[str, Destination]] = []
        for read in reads:
            changed.extend(self._record_destinations(*read))
        return changed

    def _record_destinations(self, target: Target, t: float, dests: list[EnvoyDestination]
                             ) -> list[tuple[str, Destination]]:
        if target.key not in self.targets:
            return []
        hosts = {d.address: HostReading(d.cx_total, d.cx_active, d.family, d.routes)
                 for d in dests}
        changed = [(target.key, d) for d in self.book.update(
            target.key, target.mesh, target.dataplane, target.service, t, hosts)]
        self.book.views_of(target.key, self._window_start(t))  # computed now, while spread
        return changed

    async def persist_destinations(self, changed: list[tuple[str, Destination]],
                                   now: float) -> None:
        """Write what changed, plus what an earlier failed write left behind:
        a pass only reports what changed in it, so without the backlog a
        destination seen while the disk was full would never reach it."""
        self.book.prune(self.prune_before(now))
        if self.db is None:
            return
        for key, d in changed:
            self._unsaved_dests[(key, d.address)] = (key, d)
        # The objects are the live ones: each is written in its latest state.
        batch = [(key, d) for (key, _), (_, d) in self._unsaved_dests.items()
                 if key in self.book.items]
        self._unsaved_dests.clear()
        if not batch:
            return
        try:
            await asyncio.to_thread(self.db.save_destinations, batch, (),
                                    self._write_pause())
        except BaseException:
            for key, d in batch:
                self._unsaved_dests.setdefault((key, d.address), (key, d))
            raise

    def _write_pause(self) -> Callable[[], None] | None:
        return self.write_pacer() if self.write_pacer is not None else None

    def prune_before(self, now: float) -> float:
        # One extra stale threshold: a segment straddling the window start
        # must still be there to be judged.
        return now - self.window - self.stale_after

    async def persist(self, now: float) -> None:
        """Write what was recorded since the last write, plus whatever an
        earlier failed write left behind: evidence seen while the disk was
        full must reach it once it is not. The rows are built in the writing
        thread: the loop only hands the backlog over."""
        if self.db is None:
            self._removed.clear()
            return
        for key in self._removed:
            self._unsaved.pop(key, None)
        pending, self._unsaved = self._unsaved, {}
        removed = list(self._removed)
        try:
            await asyncio.to_thread(self._save, pending, self.prune_before(now), removed)
        except BaseException:
            for key, (h, segs) in pending.items():
                if key in self.histories:  # kept before anything recorded since
                    later = self._unsaved.get(key, (h, []))[1]
                    self._unsaved[key] = (h, segs + later)
            raise
        self._removed.clear()

    def _save(self, pending: dict[str, tuple[History, list[Segment]]], before: float,
              removed: list[str]) -> None:
        assert self.db is not None
        # Pruned here: a long outage must not grow the backlog past the window.
        self.db.save([(key, h, [s for s in segs if s.end > before])
                      for key, (h, segs) in pending.items() if key in self.histories],
                     before, removed, self._write_pause())

    def build_snapshot(self, now: float,
                       extra: Iterable[DataplaneEvidence] | None = None) -> Snapshot:
        """Assemble and publish the snapshot at ``now``. ``extra``: evidence
        computed elsewhere (the Prometheus source), kept from the last call
        when None; a dataplane passguard scrapes itself takes precedence."""
        snap = self.assemble(now, extra)
        self.snapshot = snap
        return snap

    def assemble(self, now: float, extra: Iterable[DataplaneEvidence] | None = None
                 ) -> Snapshot:
        """The snapshot at ``now``, from the evidence computed as results were
        recorded in this cycle; only dataplanes without such evidence (new,
        changed target, no result since the last assembly) are computed here."""
        out: list[DataplaneEvidence] = []
        for _ in self._gather(now, out):
            pass
        return self._assemble(now, out, extra)

    async def assemble_paced(self, now: float, extra: Iterable[DataplaneEvidence] | None,
                             pause: Callable[[], Awaitable[None]]) -> Snapshot:
        """``assemble``, ``pause()`` every ASSEMBLE_SLICE dataplanes (10,000 at
        once held the loop 24-29 ms). Only this cycle records evidence, and it
        has ended: nothing the slices read changes between them."""
        out: list[DataplaneEvidence] = []
        for _ in self._gather(now, out):
            await pause()
        return self._assemble(now, out, extra)

    def _gather(self, now: float, out: list[DataplaneEvidence]) -> Iterator[None]:
        known = self._evidence_of
        gen = self._generation
        for n, (key, target) in enumerate(self.targets.items()):
            if n and not n % ASSEMBLE_SLICE:
                yield
            got = known.get(key)
            # Identity first: the target recorded is the one listed (a Target
            # compares its tags dict field by field, 20 ms over 10,000).
            if got is None or got[0] != gen or (got[1].target is not target
                                                and got[1].target != target):
                ev = self._evidence(key, target, now)
                known[key] = (gen, ev)
            else:
                ev = got[1].at(now, self.stale_after)
            out.append(ev)
        self._generation += 1

    async def publish(self, snap: Snapshot,
                      prepare: Callable[[Snapshot], Awaitable[None]] | None = None) -> Snapshot:
        """Publish ``snap`` once ``prepare(snap)`` is done (the gate computes the
        judgement every request about each mesh starts from): otherwise the
        first requests after the switch, all arriving at once, would."""
        if prepare is not None:
            await prepare(snap)
        self.snapshot = snap
        return snap

    def _evidence(self, key: str, target: Target, now: float) -> DataplaneEvidence:
        h = self.histories[key]
        res = h.since_start() if self.since_start else h.window(now - self.window,
                                                                 self.stale_after)
        state: State
        if target.offline:
            state = "offline"
        elif h.last_error is not None:
            # add() clears last_error: no clock comparison, so a wall-clock
            # step backwards cannot make a failing proxy look fresh.
            state = "failed"
        elif h.last_success is None or now - h.last_success > self.stale_after:
            state = "stale"
        else:
            state = "fresh"
        last = h.last
        return DataplaneEvidence(
            target=target, state=state, covered=res.covered, gap_reason=res.gap_reason,
            window=res.connections, active_connections=h.active(),
            # The sample's own dict, not a copy (neither is ever changed):
            # a copy per dataplane per assembly was ~10 MB at 50,000.
            latest=last.families if last else {},
            uptime=last.uptime if last else None, last_success=h.last_success,
            last_attempt=h.last_attempt, error=h.last_error, scrape_duration=h.last_duration,
        )

    def _window_start(self, now: float) -> float:
        return float("-inf") if self.since_start else now - self.window

    def _assemble(self, now: float, out: list[DataplaneEvidence],
                  extra: Iterable[DataplaneEvidence] | None) -> Snapshot:
        if extra is not None:
            self.extra = tuple(extra)
        out.extend(d for d in self.extra if d.target.key not in self.targets)
        return Snapshot(now, None if self.since_start else self.window, self.stale_after,
                        tuple(out), ready=self.cycles > 0 or self.restored,
                        destinations=self.views(now))

    def views(self, now: float) -> tuple[DestinationView, ...]:
        """The destinations as seen at ``now`` (each dataplane's computed when
        its /clusters read was recorded, unless the window has moved past it)."""
        return self.book.views(self._window_start(now))
