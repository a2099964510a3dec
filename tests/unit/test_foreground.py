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
