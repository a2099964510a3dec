"""Spreading a pass over its targets: how long, in what order, and a clean cancel."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from passguard.pacing import AUTO_SCRAPE_RATE, paced, spread_for


def test_spread_for() -> None:
    # auto: count / rate, capped at half the interval and at interval - timeout
    assert spread_for(10, None, 15.0, 5.0, AUTO_SCRAPE_RATE) == pytest.approx(0.05)
    assert spread_for(1000, None, 15.0, 5.0, 200.0) == 5.0
    assert spread_for(10_000, None, 15.0, 5.0, 200.0) == 7.5
    assert spread_for(10_000, None, 15.0, 12.0, 200.0) == 3.0
    assert spread_for(10_000, None, 1.0, 1.0, 200.0) == 0.0
    assert spread_for(0, None, 15.0, 5.0, 200.0) == 0.0
    # configured: as given (the config checked it against the interval)
    assert spread_for(3, 2.0, 15.0, 5.0, 200.0) == 2.0
    assert spread_for(3, 0.0, 15.0, 5.0, 200.0) == 0.0


def test_paced_starts_evenly_and_keeps_order() -> None:
    async def main() -> tuple[list[int], list[float]]:
        loop = asyncio.get_running_loop()
        begin = loop.time()
        starts: list[float] = []

        async def run(i: int) -> int:
            starts.append(loop.time() - begin)
            await asyncio.sleep(0.05 if i == 0 else 0)  # the first finishes last
            return i * 10

        return await paced(list(range(5)), 0.5, run), starts

    results, starts = asyncio.run(main())
    assert results == [0, 10, 20, 30, 40]
    # Item i never starts before i x 0.5 / 5 s (the loop may only be late).
    for i, t in enumerate(starts):
        assert t >= i * 0.1 - 0.005, starts


def test_paced_all_at_once_and_empty() -> None:
    async def main() -> tuple[list[int], list[int]]:
        started: list[int] = []

        async def run(i: int) -> int:
            started.append(i)
            await asyncio.sleep(0.01)
            return i

        task = asyncio.ensure_future(paced([1, 2, 3], 0.0, run))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        early = list(started)  # all three are running before any has finished
        return await task, [*early, len(await paced([], 1.0, run))]

    results, early = asyncio.run(main())
    assert results == [1, 2, 3]
    assert early == [1, 2, 3, 0]


class Runs:
    """Runs that wait long, recording their starts and cancels; item ``fail`` raises."""

    def __init__(self, fail: int | None = None) -> None:
        self.started: list[int] = []
        self.cancelled = 0
        self.fail = fail

    async def __call__(self, i: int) -> int:
        self.started.append(i)
        if i == self.fail:
            raise ValueError(f"run {i} broke")
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return i


def test_cancel_cancels_the_started_runs() -> None:
    runs = Runs()

    async def main() -> None:
        task = asyncio.ensure_future(paced(list(range(10)), 1.0, runs))
        await asyncio.sleep(0.25)  # about three have started, the rest wait their turn
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert 1 <= len(runs.started) < 10
    assert runs.cancelled == len(runs.started)


def test_a_failing_run_ends_the_pass_with_its_error() -> None:
    """As gather would: the first error is raised, no further run starts and
    the runs in flight are cancelled."""
    runs = Runs(fail=2)

    async def main() -> None:
        with pytest.raises(ValueError, match="run 2 broke"):
            await paced(list(range(10)), 0.5, runs)

    asyncio.run(main())
    assert runs.started == [0, 1, 2]
    assert runs.cancelled == 2


def test_an_unspread_pass_starts_its_runs_a_burst_per_turn(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With no spread (or behind its pace) a pass starts START_BURST runs, then
    hands the loop back: 10,000 starts in one callback held it ~110 ms."""
    from passguard import pacing
    monkeypatch.setattr(pacing, "START_BURST", 10)
    turns: list[int] = []

    async def main() -> list[int]:
        started = 0

        async def run(i: int) -> int:
            nonlocal started
            started += 1
            return i

        async def watch() -> None:
            for _ in range(20):
                turns.append(started)
                await asyncio.sleep(0)

        watcher = asyncio.ensure_future(watch())
        out = await paced(list(range(50)), 0.0, run)
        await watcher
        return out

    assert asyncio.run(main()) == list(range(50))
    # The watcher saw the starts grow in steps, never all 50 in one turn.
    seen = sorted(set(turns))
    assert any(0 < n < 50 for n in seen)
    assert max(b - a for a, b in itertools.pairwise(seen)) <= 10


@pytest.mark.parametrize("spread", [0.0, 0.05])
def test_a_limit_bounds_the_runs_that_exist_at_once(spread: float) -> None:
    """Never more than ``limit`` runs alive (each a task while it lives), every
    item run once, results in order; a failure still ends the pass."""
    alive = peak = 0

    async def run(i: int) -> int:
        nonlocal alive, peak
        alive += 1
        peak = max(peak, alive)
        await asyncio.sleep(0.005)
        alive -= 1
        return i * 2

    async def main() -> list[int]:
        return await paced(list(range(200)), spread, run, limit=7)

    assert asyncio.run(main()) == [i * 2 for i in range(200)]
    assert peak == 7

    async def failing(i: int) -> int:
        await asyncio.sleep(0.001)
        if i == 20:
            raise ValueError("run 20 broke")
        return i

    async def fails() -> None:
        with pytest.raises(ValueError, match="run 20 broke"):
            await paced(list(range(200)), spread, failing, limit=5)

    asyncio.run(fails())
