"""Bulk work paces itself against the gate: a third of the loop while busy."""

from __future__ import annotations

import asyncio

import pytest

from passguard import foreground
from passguard.foreground import (
    LINGER_SECONDS,
    MAX_REST_SECONDS,
    REST_FACTOR,
    REST_SECONDS,
    Foreground,
)


def test_pieces_rest_twice_their_time_while_the_gate_is_busy(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    slept: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(delay: float) -> None:
        slept.append(delay)
        clock[0] += delay
        await real_sleep(0)

    monkeypatch.setattr(foreground.asyncio, "sleep", sleep)
    gate = Foreground(lambda: clock[0])

    async def main() -> None:
        give_way = gate.pace()
        clock[0] += 0.004
        await give_way()  # idle gate: one turn, whatever the piece took
        gate.enter()
        clock[0] += 0.004
        await give_way()  # busy: twice the 4 ms piece
        clock[0] += 0.0001
        await give_way()  # a tiny piece still rests the minimum
        clock[0] += 1.0
        await give_way()  # a piece far too long rests at most the cap
        gate.leave()
        clock[0] += LINGER_SECONDS / 2
        await give_way()  # served one a moment ago: still busy
        clock[0] += LINGER_SECONDS * 2
        await give_way()

    asyncio.run(main())
    assert slept[0] == 0
    assert slept[1] == pytest.approx(REST_FACTOR * 0.004)
    assert slept[2] == REST_SECONDS
    assert slept[3] == MAX_REST_SECONDS
    assert slept[4] == pytest.approx(REST_FACTOR * LINGER_SECONDS / 2)
    # The last piece took LINGER_SECONDS * 2 of idle time: the gate is idle.
    assert slept[5] == 0


def test_a_threads_pieces_rest_only_while_the_gate_is_busy(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The state write's pause: time.sleep in its thread, twice the piece
    while the gate is busy, nothing at all while it is idle."""
    clock = [100.0]
    slept: list[float] = []

    def sleep(delay: float) -> None:
        slept.append(delay)
        clock[0] += delay

    monkeypatch.setattr(foreground.time, "sleep", sleep)
    gate = Foreground(lambda: clock[0])
    give_way = gate.pace_thread()
    clock[0] += 0.004
    give_way()  # idle: no rest
    assert slept == []
    gate.enter()
    clock[0] += 0.003
    give_way()
    assert slept == [pytest.approx(REST_FACTOR * 0.003)]
    clock[0] += 1.0
    give_way()  # capped
    assert slept[-1] == MAX_REST_SECONDS
    gate.leave()
    clock[0] += LINGER_SECONDS * 2
    give_way()
    assert len(slept) == 2
