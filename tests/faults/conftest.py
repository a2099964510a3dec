"""Fixtures of the fault tests: real Envoys (shared with tests/e2e), hostile proxies,
and in-process daemons that are always stopped."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from passguard.app import Daemon
from tests.e2e.conftest import echo_upstream, envoy_factory  # noqa: F401 - fixtures

from .harness import new_daemon
from .hostile import HostileProxies

DaemonFactory = Callable[..., Awaitable[Daemon]]


@pytest.fixture
async def hostile() -> AsyncIterator[HostileProxies]:
    async with HostileProxies() as server:
        yield server


@pytest.fixture
async def make_daemon(tmp_path: Path) -> AsyncIterator[DaemonFactory]:
    made: list[Daemon] = []

    async def make(sources: list[dict[str, Any]], schedule: bool = False,
                   **extra: Any) -> Daemon:
        d = await new_daemon(tmp_path, sources, schedule, **extra)
        made.append(d)
        return d

    try:
        yield make
    finally:
        for d in made:
            if d.runner is not None:
                await d.stop()
