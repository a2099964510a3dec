"""Snapshot.at(): evidence ages even when the poller stalls."""

from __future__ import annotations

import asyncio

import pytest

from passguard import yielding
from passguard.envoy.clusters import Destination as Seen
from passguard.envoy.stats import Counters, StatsReading
from passguard.scraper import ScrapeResult
from passguard.store.snapshot import DataplaneEvidence, Snapshot
from passguard.store.store import Store
from passguard.targets import Target
from passguard.yielding import Budget, Foreground


def dp(name: str, mesh: str, last: float, stale_after: float | None = None) -> DataplaneEvidence:
    return DataplaneEvidence(Target(f"http://{name}", mesh, name), "fresh", True, None, {}, 0,
                             {}, 1.0, last, last, None, 0.01, stale_after=stale_after)


def test_fresh_turns_stale_after_the_threshold() -> None:
    snap = Snapshot(100.0, 900.0, 3.0, (dp("a", "m", 100.0), dp("b", "n", 99.0),
                                        dp("c", "n", 99.0, stale_after=60.0)))
    assert snap.at(101.5) is snap  # nothing has aged out yet: no copy
    later = snap.at(102.5)
    assert {d.target.dataplane: d.state for d in later.dataplanes} == {
        "a": "fresh", "b": "stale", "c": "fresh"}
    assert [d.state for d in snap.at(104.0).for_mesh("m")] == ["stale"]
    assert snap.at(200.0).for_mesh("n")[1].state == "stale"  # its own 60 s threshold


def test_mesh_index() -> None:
    snap = Snapshot(100.0, 900.0, 3.0, (dp("a", "m", 100.0), dp("b", "n", 100.0),
                                        dp("c", "m", 100.0)))
    assert snap.meshes() == ["m", "n"]
    assert [d.target.dataplane for d in snap.for_mesh("m")] == ["a", "c"]
    assert snap.for_mesh("nope") == ()


def test_snapshot_built_in_slices_equals_the_one_built_at_once() -> None:
    """The daemon builds its snapshot, and records a /clusters pass, handing the
    loop back whenever its time budget is spent; the result must be the very
    same evidence and destinations."""
    targets = [Target(f"http://{i}", f"m{i % 2}", f"dp{i}") for i in range(10)]
    reads = [[(t, 100.0 + 60 * k, [Seen(f"10.0.{i}.{j}:443", "ipv4", 3 * k + j, j % 2)
                                   for j in range(3)])
              for i, t in enumerate(targets)] for k in range(2)]

    def fed(store: Store) -> Store:
        store.set_targets(targets)
        for k, t0 in enumerate((1000.0, 1015.0)):
            for i, t in enumerate(targets):
                reading = StatsReading(100.0 + 15 * k, {"ipv4": Counters(cx_total=i * k)})
                error = "connection refused" if i == 7 and k == 1 else None
                assert store.record_one(ScrapeResult(t, t0, 0.01, None if error else reading,
                                                     error)) is not None
            store.finish_cycle()
        return store

    whole = fed(Store(900.0, 45.0))
    changed_whole = [whole.record_destinations(r) for r in reads]
    at_once = whole.build_snapshot(1020.0)

    async def sliced() -> tuple[Snapshot, list[list[tuple[str, object]]], int]:
        store = fed(Store(900.0, 45.0))
        changed = [await store.record_destinations_async(r, Budget(0.0, 0.0)) for r in reads]
        task = asyncio.ensure_future(store.build_snapshot_async(1020.0, budget=Budget(0.0, 0.0)))
        turns = 0
        while not task.done():
            turns += 1
            await asyncio.sleep(0)
        return task.result(), changed, turns

    snap, changed, turns = asyncio.run(sliced())
    assert turns >= 10 + 30  # a budget of 0: a turn per dataplane and destination
    assert snap.dataplanes == at_once.dataplanes
    assert snap.destinations == at_once.destinations and len(snap.destinations) == 30
    assert [[(k, d.address, d.connections) for k, d in c] for c in changed] == \
        [[(k, d.address, d.connections) for k, d in c] for c in changed_whole]
    assert snap.ready and [d.state for d in snap.dataplanes].count("failed") == 1
    assert sum(d.connections for d in snap.dataplanes) == sum(range(10)) - 7



def test_poller_work_rests_only_while_the_gate_is_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    """A spent budget yields one turn when no request is being served, and
    rests REST_SECONDS while one is (or was, within LINGER_SECONDS)."""
    slept: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(delay: float) -> None:
        slept.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(yielding.asyncio, "sleep", sleep)
    clock = [100.0]
    gate = Foreground(lambda: clock[0])
    budget = Budget(0.0, 0.002, gate)

    async def main() -> None:
        await budget.pause()  # idle
        gate.enter()
        await budget.pause()  # a request in flight
        gate.leave()
        await budget.pause()  # just served one
        clock[0] += 0.06
        await budget.pause()  # idle again

    asyncio.run(main())
    assert slept == [0, 0.002, 0.002, 0]
