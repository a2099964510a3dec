"""Shadows persisted: counters survive a restart, never count twice, and a
failed write changes nothing (neither the database nor what /metrics shows)."""

from __future__ import annotations

import sqlite3
from collections import deque
from pathlib import Path
from typing import Any

import pytest

from passguard.gate.shadow import MAX_SHADOWS
from passguard.shadows import Conflict, Shadows
from passguard.store.destinations import Destination
from passguard.store.shadows import ShadowDB
from passguard.targets import Target

T0 = 1_800_000_000.0
WEB = Target("http://a", "m", "web-1", "web")
OFF = {"type": "Mesh", "name": "m", "networking": {"outbound": {"passthrough": False}}}


def book(*events: tuple[float, int]) -> list[tuple[str, Destination]]:
    return [(WEB.key, Destination("m", "web-1", "web", "10.0.0.9:443", "ipv4", T0, T0, 0, 0, 0,
                                  deque(events)))]


def exported(s: Shadows) -> dict[tuple[str, ...], float]:
    out = {}
    for fam in s.collector(lambda: {"m"}, lambda: 900.0).collect():
        for sample in fam.samples:
            out[(sample.name, *sample.labels.values())] = sample.value
    return out


async def evaluate(s: Shadows, events: list[tuple[float, int]], now: float) -> int:
    return await s.evaluate(book(*events), [WEB], {}, now)


async def test_counter_survives_restart_and_never_counts_twice(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    s = Shadows(ShadowDB(path))
    await s.add("off", [OFF], "token:ci", T0, 1000)
    events = [(T0 + 1, 2), (T0 + 2, 3)]
    assert await evaluate(s, events, T0 + 5) == 5
    assert exported(s)[("passguard_shadow_would_block_connections_total", "off", "m",
                        "web-1")] == 5
    s.close()

    # Restart: the same events are still in the restored book; the cursor skips them.
    s2 = Shadows(ShadowDB(path))
    assert s2.restore() == 1
    assert s2.counters[("off", "m", "web-1")] == [5, 0, 0]
    events.append((T0 + 7, 4))
    assert await evaluate(s2, events, T0 + 10) == 4
    assert s2.counters[("off", "m", "web-1")] == [9, 0, 0]
    report = s2.report("off", T0 - 3600, 900.0, T0 + 10, lambda m: True)
    assert report is not None
    [refused] = report["refused"]
    assert (refused["address"], refused["connections"]) == ("10.0.0.9:443", 9)
    assert report["clean_for_seconds"] == 3.0 and not report["clean"]
    assert report["source"] == [OFF]
    s2.close()


async def test_a_failed_write_changes_nothing_and_is_retried(tmp_path: Path) -> None:
    s = Shadows(ShadowDB(tmp_path / "state.db"))
    await s.add("off", [OFF], "test", T0, 1000)

    def broken(*args: Any) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    real = s.db.apply
    s.db.apply = broken  # type: ignore[method-assign]
    with pytest.raises(sqlite3.OperationalError):
        await evaluate(s, [(T0 + 1, 2)], T0 + 5)
    assert s.counters == {} and s.items["off"].evaluated_until == T0
    s.db.apply = real  # type: ignore[method-assign]
    assert await evaluate(s, [(T0 + 1, 2)], T0 + 6) == 2
    assert s.counters[("off", "m", "web-1")] == [2, 0, 0]
    s.close()


def test_apply_is_one_transaction(tmp_path: Path) -> None:
    db = ShadowDB(tmp_path / "state.db")
    from passguard.store.shadows import ShadowRow

    db.add(ShadowRow("off", T0, "t", [OFF], T0), 10)
    with pytest.raises(sqlite3.Error):
        # The hour row is malformed: the dataplane row and the cursor before it
        # must not stay written.
        db.apply([("off", T0 + 5)], [("off", "m", "web-1", 3, 0, 0)], [],
                 [("off", "m", "web-1")], 0)  # type: ignore[list-item]
    assert db.dataplanes() == []
    assert db.shadows()[0].evaluated_until == T0
    db.close()


async def test_bounded_count_duplicates_and_removal(tmp_path: Path) -> None:
    s = Shadows(ShadowDB(tmp_path / "state.db"))
    for i in range(MAX_SHADOWS):
        await s.add(f"s{i}", [OFF], "t", T0, 1000)
    with pytest.raises(Conflict, match=f"at most {MAX_SHADOWS}"):
        await s.add("one-more", [OFF], "t", T0, 1000)
    with pytest.raises(Conflict, match="exists"):
        await s.add("s1", [OFF], "t", T0, 1000)
    await evaluate(s, [(T0 + 1, 1)], T0 + 2)
    assert await s.remove("s1") and not await s.remove("s1")
    assert not any(k[0] == "s1" for k in s.counters)
    # A new shadow under the old name starts from zero.
    await s.add("s1", [OFF], "t", T0 + 3, 1000)
    assert s.report("s1", T0, 900.0, T0 + 4, lambda m: True)["refused"] == []  # type: ignore[index]
    s.close()


async def test_gauge_counts_destinations_cut_in_the_window(tmp_path: Path) -> None:
    s = Shadows(ShadowDB(tmp_path / "state.db"))
    import time

    now = time.time()
    await s.add("off", [OFF], "t", now - 10, 1000)
    await s.add("elsewhere", [{**OFF, "name": "nowhere"}], "t", now - 10, 1000)
    await evaluate(s, [(now - 5, 1)], now)
    got = exported(s)
    assert got[("passguard_shadow_destinations", "off", "m")] == 1
    # A mesh passguard does not watch is never a label value of its own.
    assert got[("passguard_shadow_destinations", "elsewhere", "other")] == 0
    s.close()
