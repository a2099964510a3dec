"""Snapshot.at(): evidence ages even when the poller stalls."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from passguard.envoy.clusters import Destination as Seen
from passguard.envoy.stats import Counters, StatsReading
from passguard.scraper import ScrapeResult
from passguard.store.snapshot import DataplaneEvidence, Snapshot
from passguard.store.store import Store
from passguard.targets import Target


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


def test_evidence_is_computed_as_results_arrive_and_only_assembled_at_the_end() -> None:
    """Each recorded result's evidence is the object the snapshot publishes;
    a dataplane with no result since the last assembly (or whose target
    changed) is computed at the assembly instead; destinations read alike."""
    targets = [Target(f"http://{i}", f"m{i % 2}", f"dp{i}") for i in range(10)]
    reads = [[(t, 100.0 + 60 * k, [Seen(f"10.0.{i}.{j}:443", "ipv4", 3 * k + j, j % 2)
                                   for j in range(3)])
              for i, t in enumerate(targets)] for k in range(2)]
    store = Store(900.0, 45.0)
    seen: list[DataplaneEvidence] = []
    store.on_evidence = seen.append
    store.set_targets(targets)
    for k, t0 in enumerate((1000.0, 1015.0)):
        for i, t in enumerate(targets):
            reading = StatsReading(100.0 + 15 * k, {"ipv4": Counters(cx_total=i * k)})
            error = "connection refused" if i == 7 and k == 1 else None
            if i == 3 and k == 1:
                continue  # no result for dp3 in the second cycle
            assert store.record_one(ScrapeResult(t, t0, 0.01, None if error else reading,
                                                 error))
        store.finish_cycle()
        snap = store.build_snapshot(t0 + 5)
    assert len(seen) == 19
    by_key = {d.target.key: d for d in snap.dataplanes}
    recorded = {d.target.key: d for d in seen[10:]}
    assert all(by_key[k] is d for k, d in recorded.items())
    assert by_key[targets[3].key] is not seen[3]  # computed again at the assembly
    assert by_key[targets[3].key] == store._evidence(targets[3].key, targets[3], 1020.0)
    assert snap.ready and [d.state for d in snap.dataplanes].count("failed") == 1
    assert sum(d.connections for d in snap.dataplanes) == sum(range(10)) - 7 - 3
    changed = [store.record_destinations(r) for r in reads]
    assert [len(c) for c in changed] == [30, 30]
    views = store.views(1020.0)
    assert len(views) == 30 and views == store.book.views(1020.0 - 900.0)
    assert views == tuple(fresh_views(store, 1020.0 - 900.0))


def fresh_views(store: Store, start: float) -> list[object]:
    from passguard.store.destinations import _view
    return [_view(store.book.items[k][a], start)
            for k in sorted(store.book.items) for a in sorted(store.book.items[k])]


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(st.tuples(st.sampled_from([1.0, 5.0, 15.0, 40.0, 300.0]),
                                st.integers(0, 5), st.booleans(), st.booleans()),
                      min_size=1, max_size=30),
       lag=st.floats(0.0, 15.0), uptime0=st.floats(0.0, 2000.0))
def test_evidence_at_a_results_time_refuses_at_least_what_the_exact_one_does(
        steps: list[tuple[float, int, bool, bool]], lag: float, uptime0: float) -> None:
    """Computed when the last result came in, the evidence sees a window that
    starts up to a cycle earlier than the snapshot's: it counts at least the
    connections the exact evidence counts, and where the exact one cannot
    vouch for the dataplane it either cannot either or shows traffic."""
    window, stale = 120.0, 45.0
    store = Store(window, stale)
    target = Target("http://a", "m", "a")
    store.set_targets([target])
    t, uptime, total = 1000.0, uptime0, 0
    for dt, inc, restart, fail in steps:
        t += dt
        uptime += dt
        if restart:
            uptime, total = dt / 2, 0
        total += inc
        reading = None if fail else StatsReading(uptime, {"ipv4": Counters(cx_total=total)})
        store.record_one(ScrapeResult(target, t, 0.01, reading, "refused" if fail else None))
    at_result = store._evidence_of[target.key][1]
    exact = store._evidence(target.key, target, t + lag)
    assert at_result.connections >= exact.connections
    if exact.unknown:
        assert at_result.unknown or at_result.connections > 0


@settings(max_examples=200, deadline=None)
@given(events=st.lists(st.tuples(st.floats(0.0, 600.0), st.integers(0, 3)), max_size=20),
       starts=st.lists(st.floats(-100.0, 700.0), min_size=1, max_size=10))
def test_cached_destination_views_are_exact_at_every_window_start(
        events: list[tuple[float, int]], starts: list[float]) -> None:
    """A dataplane's views are reused only while no event of theirs leaves the
    window: at any later (or earlier) start they equal views computed afresh."""
    store = Store(900.0, 45.0)
    target = Target("http://a", "m", "a")
    store.set_targets([target])
    totals = [0, 0]
    for t, n in sorted(events):
        totals[n % 2] += n
        store.record_destinations([(target, t, [Seen(f"10.0.0.{j}:443", "ipv4", totals[j],
                                                     j) for j in range(2)])])
    for start in sorted(starts):
        assert store.book.views(start) == tuple(fresh_views(store, start))


op = st.one_of(
    st.tuples(st.just("record"), st.integers(0, 2), st.floats(0.0, 600.0), st.integers(0, 3)),
    st.tuples(st.just("views"), st.floats(-100.0, 700.0)),
    st.tuples(st.just("prune"), st.floats(0.0, 600.0)),
    st.tuples(st.just("drop"), st.integers(0, 2)))


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(op, max_size=30))
def test_the_whole_book_of_views_is_exact_between_any_changes(ops: list[tuple[Any, ...]]
                                                              ) -> None:
    """The book's memo of every view (one cycle's end asks for them all) is
    reused only while no dataplane's views changed and the window start stays
    within what they hold: after any reads, prunes and removals, in any order,
    it equals views computed afresh."""
    store = Store(900.0, 45.0)
    targets = [Target(f"http://{i}", "m", f"dp-{i}") for i in range(3)]
    store.set_targets(targets)
    totals = [0, 0, 0]
    clock = 0.0
    for o in ops:
        if o[0] == "record":
            _, i, dt, n = o
            clock += dt / 10
            totals[i] += n
            store.record_destinations([(targets[i], clock, [Seen("10.0.0.1:443", "ipv4",
                                                                 totals[i], 0)])])
        elif o[0] == "views":
            assert store.book.views(o[1]) == tuple(fresh_views(store, o[1]))
        elif o[0] == "prune":
            store.book.prune(o[1])
        else:
            store.book.drop([targets[o[1]].key])
            totals[o[1]] = 0


def test_new_destinations_keep_the_judgements_of_the_meshes_they_leave_alone() -> None:
    """A destinations pass publishes the snapshot with new views: the gate's
    judgements of meshes whose destinations did not change carry over (their
    tuples are the same objects), the others are judged again, and a
    carried-over answer is the one judging afresh gives."""
    from passguard.gate import service
    from passguard.store.destinations import DestinationView
    from passguard.verdicts import GateConfig

    def view(mesh: str, n: int) -> DestinationView:
        return DestinationView(mesh, "a", "s", "10.0.0.1:443", "ipv4", 1.0, 2.0, n, n, 0)

    dps = (dp("a", "m", 100.0), dp("a", "n", 100.0))
    snap = Snapshot(100.0, 900.0, 45.0, dps, ready=True,
                    destinations=(view("m", 1), view("n", 1)))
    for mesh in snap.meshes():
        service.prepare(snap, mesh)
    assert {k[0] for k in snap.memo} == {"m", "n"}
    new = snap.with_destinations((view("m", 1), view("n", 2)))
    assert {k[0] for k in new.memo} == {"m"}
    assert new.for_mesh("m") is snap.for_mesh("m")
    assert new.destinations_of("m") is snap.destinations_of("m")
    assert new.destinations_of("n")[0].connections == 2
    off = [{"type": "Mesh", "name": "m", "networking": {"outbound": {"passthrough": False}}}]
    carried, _ = service.check(off, None, new, GateConfig())
    new.memo.clear()
    assert service.check(off, None, new, GateConfig())[0] == carried


def test_a_reload_that_widens_the_window_is_not_judged_on_the_narrower_one() -> None:
    """Evidence recorded under a 2-minute window, then a reload to 30 minutes
    before the assembly: the snapshot judges the wider window, whose traffic
    the history no longer holds (pruned for the old window), so it cannot
    vouch; the evidence recorded under the old window said "no traffic"."""
    store = Store(120.0, 45.0)
    target = Target("http://a", "m", "a")
    store.set_targets([target])
    for t, total in ((1000.0, 0), (1015.0, 9), (1600.0, 9)):
        store.record_one(ScrapeResult(target, t, 0.01, StatsReading(5000.0 + t, {
            "ipv4": Counters(cx_total=total)}), None))
    recorded = store._evidence_of[target.key][1]
    assert recorded.connections == 0 and not recorded.unknown  # 9 were 10 min ago
    store.configure(1800.0, 45.0)
    snap = store.build_snapshot(1601.0)
    assert snap.window_seconds == 1800.0
    [ev] = snap.dataplanes
    assert ev.unknown and "pruned" in (ev.gap_reason or "")
