"""Store persistence backlogs: what a failed write could not save is saved by
the next one, even when nothing about it changed in between."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from passguard.envoy.clusters import Destination as Seen
from passguard.gate import service
from passguard.store.persistence import StateDB
from passguard.store.snapshot import Snapshot
from passguard.store.store import Store
from passguard.targets import Target
from passguard.verdicts import GateConfig


def saved(path: Path) -> dict[str, int]:
    db = sqlite3.connect(path)
    try:
        return dict(db.execute("SELECT address, connections FROM destinations").fetchall())
    finally:
        db.close()


def fail_saves_while(monkeypatch: pytest.MonkeyPatch, failing: Callable[[], bool]) -> None:
    """save_destinations raises a full-disk error while ``failing()`` says so."""
    real = StateDB.save_destinations

    def flaky(self: StateDB, changed: object, removed: object = (),
              pause: object = None) -> None:
        if failing():
            raise sqlite3.OperationalError("database or disk is full")
        real(self, changed, removed, pause)  # type: ignore[arg-type]

    monkeypatch.setattr(StateDB, "save_destinations", flaky)


async def _turn() -> None:
    await asyncio.sleep(0)


def two_dataplanes(tmp_path: Path) -> tuple[StateDB, Store, Target, Target]:
    db = StateDB(tmp_path / "state.db")
    store = Store(900.0, 45.0, db)
    a, b = Target("http://a", "m", "dp-a"), Target("http://b", "m", "dp-b")
    store.set_targets([a, b])
    return db, store, a, b


def test_destinations_of_a_failed_write_reach_the_disk_with_the_next_pass(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db, store, a, b = two_dataplanes(tmp_path)
    calls = 0

    def first_call() -> bool:
        nonlocal calls
        calls += 1
        return calls == 1

    fail_saves_while(monkeypatch, first_call)

    async def main() -> None:
        first = store.record_destinations([
            (a, 100.0, [Seen("93.184.216.34:443", "ipv4", 5, 1)]),
            (b, 100.0, [Seen("10.9.9.9:5432", "ipv4", 2, 0)])])
        with pytest.raises(sqlite3.OperationalError):
            await store.persist_destinations(first, 100.0)
        # The next pass reads dp-a only (dp-b's /clusters failed): dp-b's
        # destination is in no pass's changes, and dp-a's count must be the
        # newest, not the one of the failed write.
        second = store.record_destinations([
            (a, 160.0, [Seen("93.184.216.34:443", "ipv4", 8, 0)])])
        await store.persist_destinations(second, 160.0)

    asyncio.run(main())
    db.close()
    assert saved(tmp_path / "state.db") == {"93.184.216.34:443": 8, "10.9.9.9:5432": 2}


def test_a_removed_dataplane_leaves_nothing_in_the_backlog(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db, store, a, b = two_dataplanes(tmp_path)
    fail = True
    fail_saves_while(monkeypatch, lambda: fail)

    async def main() -> None:
        nonlocal fail
        first = store.record_destinations([
            (a, 100.0, [Seen("93.184.216.34:443", "ipv4", 5, 0)]),
            (b, 100.0, [Seen("10.9.9.9:5432", "ipv4", 2, 0)])])
        with pytest.raises(sqlite3.OperationalError):
            await store.persist_destinations(first, 100.0)
        store.set_targets([a])  # dp-b is gone
        fail = False
        await store.persist_destinations([], 160.0)

    asyncio.run(main())
    db.close()
    assert saved(tmp_path / "state.db") == {"93.184.216.34:443": 5}


def test_a_dataplane_is_quiet_only_when_its_counters_prove_it() -> None:
    """The /clusters read of a dataplane is skipped only when a /stats sample
    newer than the start of its last successful read shows the same
    passthrough totals and nothing open."""
    from passguard.envoy.stats import Counters, StatsReading
    from passguard.scraper import ScrapeResult

    store = Store(900.0, 45.0)
    t = Target("http://a", "m", "dp-a")
    store.set_targets([t])

    def scrape(at: float, total: int, active: int = 0, error: str | None = None) -> None:
        reading = StatsReading(at, {"ipv4": Counters(cx_total=total, cx_active=active)})
        store.record_one(ScrapeResult(t, at, 0.01, None if error else reading, error))

    assert not store.quiet_since_clusters_read(t.key)  # never read
    scrape(100.0, 5)
    store.set_clusters_mark(t.key, store.clusters_mark(t.key))  # a read at 100
    assert not store.quiet_since_clusters_read(t.key)  # no sample after it yet
    scrape(115.0, 5)
    assert store.quiet_since_clusters_read(t.key)
    scrape(130.0, 6)  # one more connection: its host may be new
    assert not store.quiet_since_clusters_read(t.key)
    store.set_clusters_mark(t.key, store.clusters_mark(t.key))
    scrape(145.0, 6, active=1)  # open now
    assert not store.quiet_since_clusters_read(t.key)
    scrape(160.0, 6)
    assert store.quiet_since_clusters_read(t.key)
    scrape(175.0, 6, error="connection refused")  # counters no longer prove anything
    assert not store.quiet_since_clusters_read(t.key)
    scrape(190.0, 6)
    assert store.quiet_since_clusters_read(t.key)
    store.set_clusters_mark(t.key, None)  # the last read failed
    assert not store.quiet_since_clusters_read(t.key)
    store.set_clusters_mark(t.key, store.clusters_mark(t.key))
    store.set_targets([])  # removed: its mark goes with it
    store.set_targets([t])
    scrape(205.0, 6)
    assert not store.quiet_since_clusters_read(t.key)


def test_a_snapshot_is_published_with_its_common_summaries_ready(tmp_path: Path) -> None:
    """The gate's summaries for "passthrough off for the whole mesh" are in a
    snapshot's memo before anyone can read it, from a cycle and from a
    destinations pass alike; a request asking exactly that finds them there
    (nothing computed on its path) and answers as without them."""
    db, store, _, _ = two_dataplanes(tmp_path)
    mesh_off = [{"type": "Mesh", "name": "m", "networking": {"outbound": {"passthrough": False}}}]
    mp_none = [{"type": "MeshPassthrough", "name": "mp", "mesh": "m",
                "spec": {"targetRef": {"kind": "Mesh"}, "default": {"passthroughMode": "None"}}}]
    seen: list[tuple[int, int]] = []

    async def prepare(snap: Snapshot) -> None:
        assert store.snapshot is not snap  # not published yet
        await service.prepare_all(snap, None, _turn)
        seen.append((id(snap), len(snap.memo)))

    async def main() -> None:
        snap = await store.publish(store.assemble(1000.0), prepare)
        assert store.snapshot is snap and len(snap.memo) == 1
        for docs, entries in ((mesh_off, 1), (mp_none, 2)):
            body, _ = service.check(docs, None, snap, GateConfig())
            cold = snap.memo.copy()
            # Mesh off was answered from the memo; the policy is a new question.
            assert len(snap.memo) == entries
            snap.memo.clear()
            assert service.check(docs, None, snap, GateConfig())[0] == body
            snap.memo.update(cold)
        views = store.book.views(0.0)
        again = await store.publish(replace(snap, destinations=views), prepare)
        assert again is not snap and store.snapshot is again and len(again.memo) == 1

    asyncio.run(main())
    assert [n for _, n in seen] == [1, 1]
    db.close()


def test_segments_of_a_failed_write_reach_the_disk_with_the_next_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Results are queued for the disk as they are recorded; a write that
    fails keeps them, ahead of what is recorded meanwhile, and the next write
    saves both: a restart then restores every segment."""
    from passguard.envoy.stats import Counters, StatsReading
    from passguard.scraper import ScrapeResult

    db, store, a, b = two_dataplanes(tmp_path)
    failing = [True]
    real = StateDB.save

    def flaky(self: StateDB, *args: object) -> None:
        if failing[0]:
            raise sqlite3.OperationalError("database or disk is full")
        real(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(StateDB, "save", flaky)

    def cycle(t: float, total: int) -> None:
        for tg in (a, b):
            store.record_one(ScrapeResult(tg, t, 0.01, StatsReading(
                3600.0 + t, {"ipv4": Counters(cx_total=total)}), None))

    cycle(1000.0, 0)
    cycle(1015.0, 5)
    with pytest.raises(sqlite3.OperationalError):
        asyncio.run(store.persist(1015.0))
    cycle(1030.0, 9)  # recorded while the backlog waits
    failing[0] = False
    asyncio.run(store.persist(1030.0))
    db.close()
    restored = Store(900.0, 45.0, StateDB(tmp_path / "state.db"))
    assert restored.restore() == 2
    for tg in (a, b):
        h = restored.histories[tg.key]
        assert [s.connections for s in h.segments] == [5, 4]
        assert h.last is not None and h.last.t == 1030.0
    assert restored.db is not None
    restored.db.close()


def test_the_questions_a_snapshot_was_asked_are_ready_in_the_next(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the gate was asked about the published snapshot is judged for the
    next one before it is published (from its own evidence: the answer is
    the one a cold memo gives), within the per-mesh and overall bounds."""
    db, store, a, _ = two_dataplanes(tmp_path)
    store.set_targets([a, Target("http://c", "n", "dp-c")])
    mp_none = [{"type": "MeshPassthrough", "name": "mp", "mesh": "m",
                "spec": {"targetRef": {"kind": "Mesh"}, "default": {"passthroughMode": "None"}}}]
    mp_all = [{"type": "MeshPassthrough", "name": "mp", "mesh": "m",
               "spec": {"targetRef": {"kind": "Mesh"}, "default": {"passthroughMode": "All"}}}]
    other = [{**mp_none[0], "mesh": "n"}]

    async def main() -> None:
        first = await store.publish(store.assemble(1000.0))
        for docs in (mp_none, mp_all, other):
            service.check(docs, None, first, GateConfig())
        assert len(first.memo) == 3

        async def prepare(snap: Snapshot) -> None:
            await service.prepare_all(snap, None, _turn, store.snapshot)

        second = await store.publish(store.assemble(1015.0), prepare)
        assert len(second.memo) == 2 + 3  # each mesh off, and the three asked
        for docs in (mp_none, mp_all, other):
            body, _ = service.check(docs, None, second, GateConfig())
            assert len(second.memo) == 5  # all found: nothing judged on the path
            cold = replace(second)
            assert service.check(docs, None, cold, GateConfig())[0] == body
        # Bounded: one per mesh now, and at most two in all.
        monkeypatch.setattr(service, "AGAIN_PER_MESH", 1)
        monkeypatch.setattr(service, "AGAIN_IN_ALL", 2)
        assert {m: len(v) for m, v in service.asked_again(second).items()} == {"m": 1, "n": 1}
        monkeypatch.setattr(service, "AGAIN_IN_ALL", 1)
        assert sum(len(v) for v in service.asked_again(second).values()) == 1

    asyncio.run(main())
    db.close()


def test_a_paced_assembly_is_the_assembly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    """Sliced (a pause every few dataplanes) or not, the same snapshot."""
    from passguard.store import store as store_mod

    monkeypatch.setattr(store_mod, "ASSEMBLE_SLICE", 2)
    db = StateDB(tmp_path / "state.db")
    one, two = Store(900.0, 45.0, db), Store(900.0, 45.0, db)
    targets = [Target(f"http://t{i}", "m", f"dp-{i}") for i in range(7)]
    pauses = 0

    async def pause() -> None:
        nonlocal pauses
        pauses += 1

    async def main() -> None:
        for s in (one, two):
            s.set_targets(targets)
        plain = one.assemble(1000.0)
        paced = await two.assemble_paced(1000.0, None, pause)
        assert paced.dataplanes == plain.dataplanes and paced.time == plain.time
        assert pauses == 3  # after 2, 4 and 6 dataplanes

    asyncio.run(main())
    db.close()


def _window_of(tmp_path: Path, name: str, count: int) -> tuple[StateDB, Store, list[Target]]:
    """``count`` dataplanes, each sampled three times (two segments), some
    failing, and one destination each: what a state write carries."""
    from passguard.envoy.stats import Counters, StatsReading
    from passguard.scraper import ScrapeResult

    db = StateDB(tmp_path / name)
    store = Store(900.0, 45.0, db)
    targets = [Target(f"http://t{i}", "m", f"dp-{i}") for i in range(count)]
    store.set_targets(targets)
    for at in (100.0, 115.0, 130.0):
        for i, t in enumerate(targets):
            failed = i % 4 == 3 and at == 130.0
            reading = StatsReading(at, {"ipv4": Counters(cx_total=int(at) * i, cx_active=i % 2)})
            store.record_one(ScrapeResult(t, at, 0.01, None if failed else reading,
                                          "refused" if failed else None))
    store.finish_cycle()
    return db, store, targets


def test_a_paced_state_write_writes_what_a_plain_one_does(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The state write rests (``pause()``) every SAVE_SLICE targets while the
    gate is busy: the database it leaves is the one an unpaced write leaves,
    segments, samples and destinations."""
    from passguard.store import persistence

    pauses = 0

    def pause() -> None:
        nonlocal pauses
        pauses += 1

    dbs = []
    # The plain write in one slice, the paced one in slices of 3.
    for name, pacer, per in (("plain.db", None, 1000), ("paced.db", lambda: pause, 3)):
        monkeypatch.setattr(persistence, "SAVE_SLICE", per)
        db, store, targets = _window_of(tmp_path, name, 10)
        store.write_pacer = pacer
        changed = store.record_destinations(
            [(t, 131.0, [Seen(f"10.0.0.{i}:443", "ipv4", i + 1, 0)])
             for i, t in enumerate(targets)])
        asyncio.run(store.persist(140.0))
        asyncio.run(store.persist_destinations(changed, 140.0))
        dbs.append(db)
    plain, paced = (sqlite3.connect(d.path) for d in dbs)
    for table in ("segments", "targets", "destinations"):
        query = f"SELECT * FROM {table}"  # noqa: S608 - our own table names
        rows = sorted(plain.execute(query).fetchall())
        assert rows and rows == sorted(paced.execute(query).fetchall()), table
    # Each write: every 3 targets while building, before each slice of inserts.
    assert pauses >= 2 * (10 // 3)
    for c in (plain, paced):
        c.close()
    for d in dbs:
        d.close()


def test_the_clusters_due_are_the_dataplanes_not_quiet(tmp_path: Path) -> None:
    """``clusters_due`` (paced) lists what ``quiet_since_clusters_read`` does not skip."""
    db, store, targets = _window_of(tmp_path, "state.db", 9)
    for t in targets[::2]:
        store.set_clusters_mark(t.key, (101.0, (0, 0)))
    pauses = 0

    async def pause() -> None:
        nonlocal pauses
        pauses += 1

    due, skipped = asyncio.run(store.clusters_due(pause))
    want = [t for t in targets if not store.quiet_since_clusters_read(t.key)]
    assert due == want and skipped == len(targets) - len(want)
    assert 0 < skipped < len(targets)
    db.close()


def test_rests_inside_a_write_transaction_are_bounded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A paced write builds its rows before its transaction, and rests inside
    it (holding the database's write lock, which the shadow store waits for)
    only up to TXN_REST_SECONDS in all, however many slices it has."""
    import time

    from passguard.store import persistence

    monkeypatch.setattr(persistence, "SAVE_SLICE", 1)
    monkeypatch.setattr(persistence, "TXN_REST_SECONDS", 0.05)
    db, store, _ = _window_of(tmp_path, "state.db", 20)
    inside = outside = 0

    def pause() -> None:
        nonlocal inside, outside
        if db._db.in_transaction:
            inside += 1
        else:
            outside += 1
        time.sleep(0.02)

    store.write_pacer = lambda: pause
    asyncio.run(store.persist(140.0))
    assert outside >= 19  # every target while building, and once before BEGIN
    assert 1 <= inside <= 3  # 40 slices inside: the budget stopped the rests
    with sqlite3.connect(db.path) as check:
        assert check.execute("SELECT count(*) FROM targets").fetchone()[0] == 20
    db.close()
