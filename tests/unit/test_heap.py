"""The heap freezer: frozen after each cycle, thawed and collected once an hour,
nothing at all unless enabled (tests run many daemons in one process)."""

from __future__ import annotations

import gc

import pytest

from passguard import heap
from passguard.heap import Freezer


def test_freezes_after_each_cycle_and_thaws_hourly(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(heap.gc, "freeze", lambda: calls.append("freeze"))
    monkeypatch.setattr(heap.gc, "unfreeze", lambda: calls.append("unfreeze"))
    monkeypatch.setattr(heap.gc, "collect", lambda: calls.append("collect") or 0)
    clock = [0.0]
    f = Freezer(3600.0, lambda: clock[0])
    f.after_cycle()
    assert calls == []  # not enabled
    f.enabled = True
    for _ in range(3):
        clock[0] += 15.0
        f.after_cycle()
    assert calls == ["freeze"] * 3
    calls.clear()
    clock[0] = 3600.0
    f.after_cycle()
    clock[0] += 15.0
    f.after_cycle()
    assert calls == ["unfreeze", "collect", "freeze", "freeze"]


def test_frozen_objects_are_still_freed_by_reference_counting() -> None:
    """What the design relies on: freezing keeps nothing alive."""
    import weakref

    class Evidence:
        pass

    obj = Evidence()
    ref = weakref.ref(obj)
    gc.freeze()
    try:
        del obj
        assert ref() is None
    finally:
        gc.unfreeze()


def test_taking_over_freezes_and_leaves_full_passes_to_the_thaw(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """After ``take_over`` the collector still runs its young generations
    but never a full pass by itself (the hourly thaw does it)."""
    before = gc.get_threshold()
    calls: list[str] = []
    monkeypatch.setattr(heap.gc, "freeze", lambda: calls.append("freeze"))
    monkeypatch.setattr(heap.gc, "collect", lambda: calls.append("collect") or 0)
    f = Freezer()
    try:
        f.take_over()
        young, middle, full = gc.get_threshold()
        assert (young, middle, full) == (before[0], heap.MIDDLE_THRESHOLD, heap.NO_FULL_PASSES)
        assert calls == ["collect", "freeze"] and f.enabled
    finally:
        gc.set_threshold(*before)
