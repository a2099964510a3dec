"""passguard/verify.py: refusals counted from the segments after --since."""

from __future__ import annotations

import pytest

from passguard.envoy.stats import Counters
from passguard.store.window import History
from passguard.verify import Refusals, SinceError, parse_since, refusals_since

T0 = 1_000_000.0


def sample(h: History, t: float, uptime: float, no_route: int = 0, fail: int = 0,
           overflow: int = 0) -> None:
    from passguard.envoy.stats import StatsReading

    h.add(t, StatsReading(uptime, {"ipv4": Counters(cx_total=5, connect_fail=fail,
                                                    overflow=overflow, no_route=no_route)}),
          stale_gap=3.0)


def test_only_increases_after_since_count_and_a_restart_counts_from_zero() -> None:
    h = History()
    sample(h, T0, 100, no_route=7)          # refusals from before the deploy
    sample(h, T0 + 1, 101, no_route=7)
    sample(h, T0 + 10, 110, no_route=7)     # deploy at T0 + 10
    sample(h, T0 + 11, 1, no_route=2, overflow=1)  # restarted by the deploy
    sample(h, T0 + 12, 2, no_route=3, fail=4, overflow=1)
    got, doubt = refusals_since(h, T0 + 10, short=3.0)
    assert got == Refusals(refused=3, connect_failures=4, overflows=1) and doubt is None
    assert refusals_since(h, T0 + 12, short=3.0) == (Refusals(), None)


def test_a_long_gap_across_since_with_refusals_is_a_doubt_not_a_count() -> None:
    h = History()
    sample(h, T0, 100)
    sample(h, T0 + 60, 160, no_route=2)
    got, doubt = refusals_since(h, T0 + 30, short=3.0)
    assert got.total == 0 and doubt is not None and "gap" in doubt


@pytest.mark.parametrize(("text", "want"), [
    ("10m", T0 - 600), ("2026-08-21T10:00:00Z", 1787306400.0), (str(T0 - 5), T0 - 5)])
def test_since_forms(text: str, want: float) -> None:
    assert parse_since(text, T0) == want


@pytest.mark.parametrize("text", ["", "yesterday", "2026-08-21T10:00:00"])
def test_bad_since_names_the_parameter(text: str) -> None:
    with pytest.raises(SinceError, match="since"):
        parse_since(text, T0)
