"""The reset-aware window and coverage rules of DESIGN §3, on synthetic samples.

The same rules are exercised against real Envoy processes in tests/e2e; here
every edge (restart in a gap, straddling segments, pruning) is pinned exactly.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from passguard.envoy.stats import Counters, StatsReading
from passguard.store.window import History, Sample, restarted

STALE = 3.0  # 3 intervals of 1 s


def reading(cx: int, uptime: float | None, active: int = 0, fam: str = "ipv4",
            no_route: int = 0) -> StatsReading:
    return StatsReading(uptime, {fam: Counters(cx_total=cx, cx_active=active,  # type: ignore[dict-item]
                                               no_route=no_route)})


def feed(h: History, points: list[tuple[float, int, float | None]]) -> None:
    for t, cx, up in points:
        h.add(t, reading(cx, up), STALE)


def test_idle_old_proxy_is_covered_at_first_sample() -> None:
    h = History()
    feed(h, [(1000.0, 0, 50_000.0)])
    res = h.window(1000.0 - 900, STALE)
    assert res.covered and res.total_connections == 0


def test_old_traffic_is_unknown_until_a_whole_window_was_watched() -> None:
    h = History()
    feed(h, [(1000.0, 7, 50_000.0)])
    res = h.window(1000.0 - 900, STALE)
    assert not res.covered and res.total_connections == 0
    assert "before passguard watched" in (res.gap_reason or "")
    feed(h, [(1000.0 + i, 7, 50_000.0 + i) for i in range(1, 902)])
    res = h.window(1901.0 - 900, STALE)
    assert res.covered and res.total_connections == 0


def test_proxy_started_inside_window_counts_everything() -> None:
    h = History()
    feed(h, [(1000.0, 5, 30.0)])
    res = h.window(1000.0 - 900, STALE)
    assert res.covered and res.total_connections == 5


def test_restart_mid_window_counts_both_sides() -> None:
    h = History()
    feed(h, [(100.0, 0, 5000.0), (101.0, 4, 5001.0), (102.0, 6, 5002.0),
             (103.0, 1, 0.0), (104.0, 3, 1.0)])
    res = h.window(50.0, STALE)
    assert res.covered and res.total_connections == 6 + 3


def test_restart_detected_by_uptime_when_counter_grew_past_old_value() -> None:
    a = Sample(100.0, 5000.0, {"ipv4": Counters(cx_total=4)})
    b = Sample(101.0, 0.0, {"ipv4": Counters(cx_total=9)})
    assert restarted(a, b)
    h = History()
    feed(h, [(100.0, 4, 5000.0), (101.0, 9, 0.0)])
    # The first sample's 4 may predate the window; the 9 since the restart do not.
    assert h.window(99.0, STALE).total_connections == 9


def test_no_restart_on_steady_uptime() -> None:
    a = Sample(100.0, 5000.0, {"ipv4": Counters(cx_total=4)})
    b = Sample(115.0, 5011.0, {"ipv4": Counters(cx_total=9)})  # uptime lags flush: fine
    assert not restarted(a, b)


def test_restart_inside_long_gap_is_incomplete() -> None:
    h = History()
    feed(h, [(100.0, 0, 5000.0), (101.0, 2, 5001.0)])
    # passguard could not scrape for 60 s, and the proxy restarted meanwhile.
    feed(h, [(161.0, 1, 10.0)])
    res = h.window(90.0, STALE)
    assert not res.covered and "restarted during a gap" in (res.gap_reason or "")
    assert res.total_connections == 2 + 1
    # A window that starts at the restart (161 - uptime 10) is complete again.
    res = h.window(151.0, STALE)
    assert res.covered and res.total_connections == 1
    # One starting just after it is not: that connection may predate it.
    assert not h.window(152.0, STALE).covered


def test_gap_without_restart_is_harmless() -> None:
    h = History()
    feed(h, [(100.0, 0, 5000.0), (101.0, 2, 5001.0), (400.0, 2, 5300.0)])
    res = h.window(90.0, STALE)
    assert res.covered and res.total_connections == 2


def test_short_straddling_segment_counts_long_one_is_unknown() -> None:
    h = History()
    feed(h, [(100.0, 0, 5000.0), (102.0, 3, 5002.0)])
    assert h.window(101.0, STALE).total_connections == 3
    h2 = History()
    feed(h2, [(100.0, 0, 5000.0), (120.0, 3, 5020.0)])
    res = h2.window(110.0, STALE)
    assert not res.covered and res.total_connections == 0


def test_active_connection_and_blocked() -> None:
    h = History()
    h.add(100.0, reading(0, 5000.0), STALE)
    h.add(101.0, reading(1, 5001.0, active=1, no_route=4), STALE)
    assert h.active() == 1
    assert h.window(50.0, STALE).blocked == 4


def test_new_family_counts_from_zero() -> None:
    h = History()
    h.add(100.0, reading(0, 5000.0), STALE)
    h.add(101.0, StatsReading(5001.0, {"ipv4": Counters(), "matched": Counters(cx_total=2)}),
          STALE)
    res = h.window(50.0, STALE)
    assert res.connections["matched"].cx_total == 2


def test_pruned_traffic_makes_a_wider_window_uncovered() -> None:
    h = History()
    feed(h, [(100.0, 0, 5000.0), (101.0, 5, 5001.0), (200.0, 5, 5100.0)])
    h.prune(150.0)
    assert h.window(160.0, STALE).covered
    res = h.window(50.0, STALE)
    assert not res.covered and "pruned" in (res.gap_reason or "")


def test_since_start_uses_cumulative_counters() -> None:
    h = History()
    feed(h, [(100.0, 7, 50_000.0)])
    res = h.since_start()
    assert res.covered and res.total_connections == 7


def test_never_scraped() -> None:
    h = History()
    h.fail(100.0, "connection refused")
    assert not h.window(0.0, STALE).covered


def test_idle_samples_store_nothing_and_change_nothing() -> None:
    h = History()
    stored = []
    for i in range(100):
        stored += h.add(100.0 + i, reading(0, 5000.0 + i), STALE)
    assert stored == [] and not h.segments  # nothing to persist, nothing kept
    assert h.window(150.0, STALE).covered
    h.add(300.0, reading(2, 5200.0), STALE)
    res = h.window(250.0, STALE)
    # The increase spans the idle stretch since the last sample (199 → 300):
    # a long segment straddling the window start, so not proven inside it.
    assert not res.covered
    assert h.window(199.0, STALE).total_connections == 2


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(st.one_of(
    st.tuples(st.just("scrape"), st.sampled_from([1.0, 5.0, 15.0, 40.0, 300.0]),
              st.integers(0, 4), st.booleans()),
    st.tuples(st.just("ask"), st.floats(0.0, 400.0), st.sampled_from([15.0, 45.0]),
              st.booleans()),
    st.tuples(st.just("prune"), st.floats(0.0, 400.0), st.just(0), st.just(False))),
    max_size=40))
def test_a_reused_window_answer_equals_one_computed_afresh(
        ops: list[tuple[str, float, float, bool]]) -> None:
    """window() reuses its last answer for later starts until a segment
    boundary; whatever the interleaving of scrapes, prunes and starts, the
    answer equals the one a history without that memory gives."""
    h = History()
    t, uptime, total = 1000.0, 50.0, 0
    for op, x, y, flag in ops:
        if op == "scrape":
            t += x
            uptime = x / 2 if flag else uptime + x
            total = int(y) if flag else total + int(y)
            h.add(t, StatsReading(uptime, {"ipv4": Counters(cx_total=total)}), 45.0)
        elif op == "prune":
            h.prune(t - x)
        else:
            start = t - x
            fresh = History()
            fresh.segments.extend(h.segments)
            fresh.last, fresh.pruned_until = h.last, h.pruned_until
            assert h.window(start, y) == fresh.window(start, y)
