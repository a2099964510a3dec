"""The ``prometheus`` source against a real Prometheus scraping real Envoy sidecars.

Three real Envoy processes, each its own mesh: ``alpha-1`` (Envoy's
``/stats/prometheus``), ``beta-1`` and ``idle-1`` (``/stats/prometheus?usedonly``,
as kuma-dp may serve them: a passthrough counter has no series until it is
used).  A real Prometheus (the Debian 2.42 binary) scrapes them every second,
with ``mesh``/``dataplane``/``service`` target labels as Kuma's
``kuma_sd_configs`` relabelling gives them, and also scrapes the ``/metrics``
of a real passguard daemon that scrapes the same Envoys directly (an agent).

On the same real traffic, three kinds of evidence must give the gate the same
verdicts for "disable passthrough on this mesh": the daemon's own (direct
scraping), the source reading Envoy's series (``metrics: envoy``) and the
source reading the agent's series (``metrics: passguard``) — with traffic,
once it has left the window, and with new traffic.  Then Prometheus is killed:
every dataplane of both sources is unknown, so the gate answers
``on_insufficient_data``.  A second scenario starts the watchers next to a
proxy whose passthrough traffic predates them: unknown (not "no traffic")
until one window has passed, then covered; then the proxy restarts (its
counters reset) and has traffic again.

A fresh Prometheus has less history than any real window, so the window is
10 s and every wait is bounded; a missing ``prometheus`` binary fails the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from passguard import config as config_mod
from passguard.app import Daemon
from passguard.demo.sidecar import EnvoyProcess
from passguard.demo.traffic import EchoUpstream, send_traffic
from passguard.documents import Change, Resource
from passguard.gate.decide import Evidence, decide
from passguard.sources.prometheus import PrometheusSource, PrometheusSourceConfig
from passguard.store.snapshot import DataplaneEvidence
from passguard.verdicts import GatePolicy

from .conftest import EnvoyFactory
from .procs import Prometheus, require_binary

pytestmark = pytest.mark.e2e

WINDOW = 10.0  # seconds: a fresh Prometheus must be able to cover it
INTERVAL = 1.0  # Prometheus's and the daemon's scrape interval
STALE_AFTER = 3 * INTERVAL
WAIT = 45.0  # bound of every wait
MESHES = ("alpha", "beta", "idle")
DENY = GatePolicy("enforce", "deny")
WARN = GatePolicy("enforce", "warn")
AGENT_JOB = "passguard-agent"
ALL_ALLOW = dict.fromkeys(MESHES, "allow")
IPV4_CLUSTERS = ('envoy_cluster_name=~"outbound_passthrough_ipv4'
                 '|self_transparentproxy_passthrough_outbound_ipv4"')


def mesh_off(mesh: str) -> Change:
    return Change(Resource("Mesh", mesh, mesh, "universal", "None"), None, "assumed")


def verdicts(dps: Sequence[DataplaneEvidence], policy: GatePolicy = DENY,
             meshes: Sequence[str] = MESHES) -> dict[str, str]:
    out: dict[str, str] = {}
    for mesh in meshes:
        ev = Evidence(mesh, WINDOW, tuple(d for d in dps if d.target.mesh == mesh))
        out[mesh] = decide(mesh_off(mesh), ev, policy).verdict
    return out


def by_name(dps: Sequence[DataplaneEvidence]) -> dict[str, DataplaneEvidence]:
    return {d.target.dataplane: d for d in dps}


def show(dps: Sequence[DataplaneEvidence]) -> str:
    return "; ".join(f"{d.target.key}: {d.state} covered={d.covered} conns={d.connections} "
                     f"active={d.active_connections} reason={d.gap_reason} error={d.error}"
                     for d in sorted(dps, key=lambda d: d.target.key))


async def wait_for(check: Callable[[], Awaitable[Any]], what: str,
                   details: Callable[[], str] = str) -> Any:
    """Await ``check()`` until it is truthy; fail after WAIT seconds."""
    deadline = time.monotonic() + WAIT
    last = ""
    while True:
        try:
            value = await check()
        except AssertionError as exc:
            value, last = None, str(exc)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {WAIT:g}s waiting for {what} ({last})\n"
                                 f"{details()}")
        await asyncio.sleep(0.3)


def scrape_job(name: str, envoys: dict[str, EnvoyProcess], usedonly: bool) -> dict[str, Any]:
    job: dict[str, Any] = {
        "job_name": name,
        "metrics_path": "/stats/prometheus",
        "static_configs": [
            {"targets": [envoy.admin_url.removeprefix("http://")],
             "labels": {"mesh": mesh, "dataplane": f"{mesh}-1", "service": f"{mesh}-svc"}}
            for mesh, envoy in envoys.items()],
    }
    if usedonly:
        job["params"] = {"usedonly": [""]}
    return job


@contextlib.asynccontextmanager
async def direct_daemon(envoys: dict[str, EnvoyProcess], tmp: Path) -> AsyncIterator[Daemon]:
    """A passguard daemon scraping the Envoys directly, cycling every second."""
    raw = {
        "listen": "127.0.0.1:0",
        "scrape": {"interval": f"{INTERVAL:g}s", "timeout": "400ms"},
        "window": f"{WINDOW:g}s",
        "state": {"path": str(tmp / "state.db")},
        "sources": [{"kind": "envoy", "targets": [
            {"url": envoy.admin_url,
             "labels": {"mesh": mesh, "dataplane": f"{mesh}-1", "service": f"{mesh}-svc"}}
            for mesh, envoy in envoys.items()]}],
    }
    daemon = Daemon(config_mod.build(raw, tmp))
    await daemon.start(schedule=False)

    async def cycles() -> None:
        while True:
            await daemon.cycle()
            await asyncio.sleep(INTERVAL)

    task = asyncio.create_task(cycles())
    try:
        yield daemon
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await daemon.stop()


@dataclass
class Stack:
    """The direct daemon, Prometheus, and the two sources reading Prometheus."""

    daemon: Daemon
    prom: Prometheus
    sources: dict[str, PrometheusSource]
    got: dict[str, list[DataplaneEvidence]] = field(default_factory=dict)

    def details(self) -> str:
        return "\n".join([f"{k}: {show(v)}" for k, v in self.got.items()]
                         + [f"errors: { {k: s.last_error for k, s in self.sources.items()} }",
                            self.prom.log_tail(15)])

    async def collect(self) -> dict[str, list[DataplaneEvidence]]:
        """Every evidence kind now: direct (after a fresh cycle), envoy, agent."""
        await self.daemon.cycle()
        self.got["direct"] = list(self.daemon.store.snapshot.dataplanes)
        now = time.time()
        for name, src in self.sources.items():
            self.got[name] = await src.collect(now)
        return self.got

    async def compare(self, expected: dict[str, str], when: str,
                      policy: GatePolicy = DENY) -> dict[str, list[DataplaneEvidence]]:
        ev = await self.collect()
        for name in ("direct", "envoy", "agent"):
            assert verdicts(ev[name], policy, tuple(expected)) == expected, (
                f"{when}: {name}: {self.details()}")
        return ev

    async def wait(self, check: Callable[[], Awaitable[Any]], what: str) -> Any:
        return await wait_for(check, what, self.details)

    async def counter(self, expr: str) -> dict[str, float]:
        return await asyncio.to_thread(self.prom.values, f"sum by (dataplane) ({expr})",
                                       "dataplane")


@contextlib.asynccontextmanager
async def running(envoys: dict[str, tuple[EnvoyProcess, bool]], tmp: Path
                  ) -> AsyncIterator[Stack]:
    """Daemon + Prometheus (+ the sources) over ``{mesh: (envoy, usedonly)}``."""
    binary = require_binary("prometheus")  # fails, never skips, without it
    async with direct_daemon({m: e for m, (e, _) in envoys.items()}, tmp) as daemon:
        prom_dir = tmp / "prometheus"
        prom_dir.mkdir()
        prom = Prometheus(prom_dir, interval=f"{INTERVAL:g}s", scrape_configs=[
            scrape_job("envoy", {m: e for m, (e, u) in envoys.items() if not u}, False),
            scrape_job("envoy-usedonly", {m: e for m, (e, u) in envoys.items() if u}, True),
            {"job_name": AGENT_JOB,
             "static_configs": [{"targets": [f"127.0.0.1:{daemon.config.listen.port}"]}]},
        ])
        envoy_src = PrometheusSource(PrometheusSourceConfig(
            url=prom.url, scrape_interval=INTERVAL, timeout=5,
            extra_selector='{job=~"envoy|envoy-usedonly"}'), WINDOW, STALE_AFTER)
        agent_src = PrometheusSource(PrometheusSourceConfig(
            url=prom.url, metrics="passguard", scrape_interval=INTERVAL, timeout=5,
            extra_selector=f'{{job="{AGENT_JOB}"}}'), WINDOW, STALE_AFTER)
        stack = Stack(daemon, prom, {"envoy": envoy_src, "agent": agent_src})
        try:
            await asyncio.to_thread(prom.start, binary)
            yield stack
        finally:
            await asyncio.to_thread(prom.close)
            for src in stack.sources.values():
                await src.close()


async def test_prometheus_source_matches_direct_scraping(
        envoy_factory: EnvoyFactory, echo_upstream: EchoUpstream, tmp_path: Path) -> None:
    alpha = await envoy_factory("legacy")
    beta = await envoy_factory("unified")
    idle = await envoy_factory("legacy")
    envoys = {"alpha": (alpha, False), "beta": (beta, True), "idle": (idle, True)}
    async with running(envoys, tmp_path) as stack:
        await run_scenario(stack, alpha, beta, echo_upstream)


async def run_scenario(stack: Stack, alpha: EnvoyProcess, beta: EnvoyProcess,
                       upstream: EchoUpstream) -> None:
    # ---- Prometheus has every dataplane, fresh and covered, with no traffic.
    async def all_seen() -> bool:
        ev = await stack.collect()
        return all(sorted(d.target.dataplane for d in dps) == ["alpha-1", "beta-1", "idle-1"]
                   and all(d.state == "fresh" and d.covered for d in dps)
                   for dps in ev.values())

    await stack.wait(all_seen, "every source to see 3 fresh, covered dataplanes")
    ev = await stack.compare(ALL_ALLOW, "no traffic yet")
    for dps in ev.values():
        assert not any(d.has_traffic for d in dps), stack.details()

    # ---- real passthrough traffic on alpha (3) and beta (2); idle stays idle.
    await send_traffic(alpha, upstream, 3)
    await send_traffic(beta, upstream, 2)
    t_traffic = time.time()
    want = {"alpha-1": 3.0, "beta-1": 2.0}

    async def prometheus_saw_it() -> bool:
        envoy = await stack.counter(f"envoy_cluster_upstream_cx_total{{{IPV4_CLUSTERS}}}")
        agent = await stack.counter(f'passguard_passthrough_connections_total{{job="{AGENT_JOB}"}}')
        return all(envoy.get(k) == v and agent.get(k) == v for k, v in want.items())

    await stack.wait(prometheus_saw_it, "Prometheus to sample the traffic")
    ev = await stack.compare({"alpha": "deny", "beta": "deny", "idle": "allow"}, "with traffic")
    for name in ("envoy", "agent"):
        named = by_name(ev[name])
        # Exact counts (no extrapolation on counters without a reset), including
        # beta's usedonly series, which appeared with its first value.
        assert (named["alpha-1"].connections, named["beta-1"].connections) == (3, 2), (
            stack.details())
        assert named["idle-1"].connections == 0 and not named["idle-1"].unknown, stack.details()
        assert all(d.state == "fresh" for d in named.values()), stack.details()
        assert named["alpha-1"].target.url == stack.prom.url
        assert named["alpha-1"].target.service == "alpha-svc"
    decision = decide(mesh_off("alpha"), Evidence("alpha", WINDOW, tuple(
        d for d in ev["envoy"] if d.target.mesh == "alpha")), DENY)
    assert "alpha-1 (3)" in decision.reasons[0], decision.reasons

    # ---- the traffic leaves the window (window + stale threshold + margin).
    await asyncio.sleep(max(0.0, t_traffic + WINDOW + STALE_AFTER + 3 - time.time()))
    ev = await stack.compare(ALL_ALLOW, "after the window")
    for name in ("envoy", "agent"):
        # Watched for longer than the window now: covered by history alone.
        assert all(d.covered and d.state == "fresh" and not d.has_traffic
                   for d in ev[name]), stack.details()

    # ---- new traffic on beta only.
    await send_traffic(beta, upstream, 1)

    async def beta_again() -> bool:
        envoy = await stack.counter(f"envoy_cluster_upstream_cx_total{{{IPV4_CLUSTERS}}}")
        agent = await stack.counter(f'passguard_passthrough_connections_total{{job="{AGENT_JOB}"}}')
        return envoy.get("beta-1") == 3.0 and agent.get("beta-1") == 3.0

    await stack.wait(beta_again, "Prometheus to sample beta's new connection")
    ev = await stack.compare({"alpha": "allow", "beta": "deny", "idle": "allow"}, "beta again")
    for name in ("envoy", "agent"):
        assert by_name(ev[name])["beta-1"].connections == 1, stack.details()

    # ---- Prometheus goes away: everything it vouched for is unknown.
    await asyncio.to_thread(stack.prom.close)
    ev = await stack.collect()
    for name, src in stack.sources.items():
        dps = ev[name]
        assert sorted(d.target.dataplane for d in dps) == ["alpha-1", "beta-1", "idle-1"]
        assert all(d.state == "failed" and d.unknown and not d.has_traffic for d in dps), (
            stack.details())
        assert src.last_error is not None and "cannot connect" in src.last_error, (
            src.last_error)
        # on_insufficient_data decides, for every mesh, whatever it is set to.
        assert verdicts(dps, WARN) == dict.fromkeys(MESHES, "warn"), stack.details()
        assert verdicts(dps, DENY) == dict.fromkeys(MESHES, "deny"), stack.details()
        decision = decide(mesh_off("beta"), Evidence("beta", WINDOW, tuple(
            d for d in dps if d.target.mesh == "beta")), DENY)
        assert "no complete evidence" in decision.reasons[0], decision.reasons
        assert "cannot connect" in decision.reasons[0], decision.reasons


async def test_history_before_the_watchers_is_not_evidence(
        envoy_factory: EnvoyFactory, echo_upstream: EchoUpstream, tmp_path: Path) -> None:
    """A proxy that used passthrough before anyone watched it: its counters are not
    zero at the first sample and it is older than the window, so nothing says
    whether that traffic was inside the window: unknown for every evidence kind
    (the gate's on_insufficient_data, here `warn`), until a window has passed."""
    old = await envoy_factory("legacy")
    await send_traffic(old, echo_upstream, 2)

    async def old_enough() -> bool:
        # Envoy's own uptime (refreshed every stats flush, 5 s) clearly past the
        # window, so no evidence kind can take it for a proxy started inside it.
        stats = await old.stats(r"^server\.uptime$")
        return stats.get("server.uptime", 0) >= WINDOW + STALE_AFTER + 6

    await wait_for(old_enough, "the proxy to be older than the window")
    only = {"alpha": (old, True)}
    async with running(only, tmp_path) as stack:
        async def seen() -> bool:
            ev = await stack.collect()
            return all([d.target.dataplane for d in dps] == ["alpha-1"]
                       and dps[0].state == "fresh" for dps in ev.values())

        await stack.wait(seen, "every source to see the old proxy")
        ev = await stack.compare({"alpha": "warn"}, "history before the watchers", WARN)
        for name in ("direct", "envoy", "agent"):
            [dp] = ev[name]
            assert not dp.covered and not dp.has_traffic, stack.details()
        assert "before Prometheus first saw it" in str(ev["envoy"][0].gap_reason)
        first_seen = time.time()

        # One window later the history is old enough to be evidence: no traffic.
        async def covered() -> bool:
            ev = await stack.collect()
            return all(dps[0].covered for dps in ev.values())

        await asyncio.sleep(max(0.0, first_seen + WINDOW - time.time()))
        await stack.wait(covered, "every source to cover the window")
        await stack.compare({"alpha": "allow"}, "a window later", WARN)

        # The proxy restarts (counters reset) and uses passthrough again.
        await old.restart()
        await send_traffic(old, echo_upstream, 1)

        async def after_restart() -> bool:
            envoy = await stack.counter(f"envoy_cluster_upstream_cx_total{{{IPV4_CLUSTERS}}}")
            agent = await stack.counter(
                f'passguard_passthrough_connections_total{{job="{AGENT_JOB}"}}')
            return envoy.get("alpha-1") == 1.0 and agent.get("alpha-1") == 1.0

        await stack.wait(after_restart, "Prometheus to sample the restarted proxy")
        ev = await stack.compare({"alpha": "deny"}, "after a restart", WARN)
        for name in ("envoy", "agent"):
            assert ev[name][0].connections >= 1, stack.details()
