"""Snapshot.at(): evidence ages even when the poller stalls."""

from __future__ import annotations

from passguard.store.snapshot import DataplaneEvidence, Snapshot
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
