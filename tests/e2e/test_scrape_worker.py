"""The scrape worker (``scrape.worker: process``) with real Envoy and real
``passguard run`` processes: what the daemon's evidence is when its worker
is killed, hangs, cannot start, or outlives it.

The sidecars are real Envoy processes with passthrough traffic sent through
their listener to a local upstream; the daemon is ``python -m passguard run``
(the worker is its child, ``python -m passguard.scrape_worker``), or, for the
faults that need a hand on the worker, ``ProcessScraper`` in this process.
"""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from passguard import scrape_process
from passguard.config_types import Config
from passguard.demo.traffic import EchoUpstream, send_traffic
from passguard.scrape_process import ProcessScraper
from passguard.scraper import Request, Scraper, ScrapeResult
from passguard.targets import Target

from .conftest import EnvoyFactory
from .procs import Passguard, envoy_target, passguard_config, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

WORKER = replace(Config(), scrape=replace(Config().scrape, worker="process"))
MESH_OFF = b"type: Mesh\nname: {mesh}\nnetworking:\n  outbound:\n    passthrough: false\n"


def worker_config(tmp: Path, url: str, mesh: str, dataplane: str) -> dict[str, Any]:
    """A `passguard run` config reading one sidecar through a worker (a fleet
    this small would be read in-process under ``scrape.worker: auto``)."""
    cfg = passguard_config(tmp, [envoy_target(url, mesh, dataplane)],
                           interval="500ms", timeout="400ms")
    cfg["scrape"]["worker"] = "process"
    return cfg


def children(pid: int) -> list[int]:
    """The processes ``pid`` started (Linux: /proc/<pid>/task/*/children)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out.extend(int(p) for p in text)
    return out


def worker_of(pg: Passguard) -> int:
    """The pid of the daemon's scrape worker, once it runs."""
    def find() -> int | None:
        pg.assert_running()
        kids = [p for p in children(pg.pid) if "passguard.scrape_worker" in _cmdline(p)]
        return kids[0] if len(kids) == 1 else None
    return wait_until(find, 20, "the scrape worker", details=pg.log_tail)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"  # a zombie has exited


def metric(pg: Passguard, name: str) -> float | None:
    for line in str(pg.get("/metrics")).splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def verdict(pg: Passguard, mesh: str) -> str:
    status, body = pg.post("/v1/check", MESH_OFF.replace(b"{mesh}", mesh.encode()))
    assert status == 200, body
    return str(body["verdict"])


async def test_a_killed_worker_is_replaced_and_the_evidence_goes_on(
        envoy_factory: EnvoyFactory, echo_upstream: EchoUpstream, tmp_path: Path) -> None:
    """The daemon reads a real sidecar through its worker; SIGKILL the worker:
    the next cycle starts another (counted), the sidecar stays up and its
    traffic keeps the mesh refused."""
    busy = await envoy_factory("legacy")
    await send_traffic(busy, echo_upstream, 3)
    pg = Passguard(worker_config(tmp_path, busy.admin_url, "pay", "pay-1"), tmp_path)
    try:
        await asyncio.to_thread(pg.start)
        first = await asyncio.to_thread(worker_of, pg)
        assert await asyncio.to_thread(verdict, pg, "pay") == "deny"
        os.kill(first, signal.SIGKILL)
        await asyncio.to_thread(wait_until, lambda: gone(first) or None, 10, "the kill")

        def replaced() -> int | None:
            w = worker_of(pg)
            return w if w != first else None
        second = await asyncio.to_thread(wait_until, replaced, 20, "a new worker",
                                         details=pg.log_tail)
        assert second != first
        assert await asyncio.to_thread(metric, pg, "passguard_scrape_worker_exits_total") == 1

        def up_again() -> bool:
            return metric(pg, 'passguard_target_up{dataplane="pay-1",mesh="pay"}') == 1.0
        await asyncio.to_thread(wait_until, up_again, 10, "the sidecar read by the new worker")
        await send_traffic(busy, echo_upstream, 2)
        assert await asyncio.to_thread(verdict, pg, "pay") == "deny"
        assert "scrape worker" in pg.log.read_text()
    finally:
        await asyncio.to_thread(pg.close)


async def test_the_worker_dies_with_the_daemon(envoy_factory: EnvoyFactory,
                                               tmp_path: Path) -> None:
    """SIGKILL the daemon (no chance to close anything): its worker exits too,
    so a restart never leaves two workers. The worker is stopped (SIGSTOP)
    first, so it cannot notice the channel's end itself: only the kernel's
    PR_SET_PDEATHSIG (SIGKILL) ends it."""
    envoy = await envoy_factory("legacy")
    pg = Passguard(worker_config(tmp_path, envoy.admin_url, "m", "dp"), tmp_path)
    try:
        await asyncio.to_thread(pg.start)
        worker = await asyncio.to_thread(worker_of, pg)
        os.kill(worker, signal.SIGSTOP)
        pg.send_signal(signal.SIGKILL)
        await asyncio.to_thread(pg.wait, 10)
        await asyncio.to_thread(wait_until, lambda: gone(worker) or None, 10,
                                "the worker to exit after its daemon")
    finally:
        await asyncio.to_thread(pg.close)


async def test_a_reload_that_changes_the_scrape_settings_replaces_the_worker(
        envoy_factory: EnvoyFactory, tmp_path: Path) -> None:
    envoy = await envoy_factory("legacy")
    cfg = worker_config(tmp_path, envoy.admin_url, "m", "dp")
    pg = Passguard(cfg, tmp_path)
    try:
        await asyncio.to_thread(pg.start)
        old = await asyncio.to_thread(worker_of, pg)
        pg.write({**cfg, "scrape": {**cfg["scrape"], "timeout": "300ms"}})
        pg.send_signal(signal.SIGHUP)
        await asyncio.to_thread(wait_until, lambda: gone(old) or None, 15,
                                "the old worker to stop", details=pg.log_tail)
        new = await asyncio.to_thread(worker_of, pg)
        assert new != old
        # Replaced on purpose: not counted as an exit.
        assert await asyncio.to_thread(metric, pg, "passguard_scrape_worker_exits_total") == 0
    finally:
        await asyncio.to_thread(pg.close)


async def test_a_clean_stop_ends_the_worker(envoy_factory: EnvoyFactory,
                                            tmp_path: Path) -> None:
    envoy = await envoy_factory("legacy")
    pg = Passguard(worker_config(tmp_path, envoy.admin_url, "m", "dp"), tmp_path)
    try:
        await asyncio.to_thread(pg.start)
        worker = await asyncio.to_thread(worker_of, pg)
        assert await asyncio.to_thread(pg.stop) == 0
        assert gone(worker)
    finally:
        await asyncio.to_thread(pg.close)


# --------------------------------------------------------------------------- in-process


def targets_of(url: str, n: int) -> list[Target]:
    return [Target(url, "m", f"dp-{i}") for i in range(n)]


async def test_the_worker_reads_what_the_in_process_scraper_reads(
        envoy_factory: EnvoyFactory, echo_upstream: EchoUpstream) -> None:
    """Same Envoy, same targets: the worker's readings and destinations equal
    the in-process scraper's, in the targets' order."""
    envoy = await envoy_factory("legacy")
    await send_traffic(envoy, echo_upstream, 4)
    ts = [*targets_of(envoy.admin_url, 5), Target("http://127.0.0.1:1", "m", "refused")]
    ps, inline = ProcessScraper(WORKER), Scraper(Config())
    try:
        seen: list[ScrapeResult] = []
        remote = await ps.cycle(ts, None, 0.2, seen.append)
        local = await inline.cycle(ts, None)
        assert all(r.target is t for r, t in zip(remote, ts, strict=True))  # ours, in order
        assert sorted(r.target.key for r in seen) == sorted(t.key for t in ts)
        for a, b in zip(remote, local, strict=True):
            assert (a.error is None) == (b.error is None)
            if a.reading is not None and b.reading is not None:
                assert a.reading.families == b.reading.families
        assert remote[-1].error is not None and local[-1].error is not None
        reads = await ps.clusters_pass(ts, lambda t: None, 0.0)
        assert [r[2] for r in reads] == [r[2] for r in await inline.clusters_pass(
            ts, lambda t: None)]
        assert any(r[2] for r in reads)  # the echo upstream is listed
        assert ps.worker_pid is not None
    finally:
        await ps.close()
        await inline.close()


def resting(seconds: float, log: list[float] | None = None
            ) -> Callable[[], Callable[[], Awaitable[None]]]:
    """A pace like the daemon's under a busy gate: each piece rests
    ``seconds`` (and is logged in ``log``)."""
    def pace() -> Callable[[], Awaitable[None]]:
        async def give_way() -> None:
            if log is not None:
                log.append(seconds)
            await asyncio.sleep(seconds)
        return give_way
    return pace


async def test_the_answers_are_recorded_in_pieces_paced_by_the_daemon(
        envoy_factory: EnvoyFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon's pace (passguard.foreground) runs after each DISPATCH_SLICE
    answers of a frame and each slice of a pass handed over: a pace that
    rests still gets every answer, in order, and is called for each piece."""
    monkeypatch.setattr(scrape_process, "DISPATCH_SLICE", 2)
    envoy = await envoy_factory("legacy")
    ts = targets_of(envoy.admin_url, 7)
    pieces: list[float] = []
    ps = ProcessScraper(WORKER, pace=resting(0.01, pieces))
    try:
        got = await ps.cycle(ts, None, 0.1)
        assert [r.target for r in got] == ts and all(r.error is None for r in got)
        # 7 answers in pieces of 2 (however the worker batched them: at
        # least 4 pieces) and the pass's end.
        assert len(pieces) >= 5
    finally:
        await ps.close()


async def test_a_pass_handed_over_meanwhile_waits_for_the_targets_to_be_told(
        envoy_factory: EnvoyFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A /clusters pass (the daemon runs it outside the cycle lock) handed
    over while a stats pass is still telling the worker of new targets, in
    paced pieces, must not name a target the worker has not been told of
    yet: both passes read everything, and the worker lives on."""
    monkeypatch.setattr(scrape_process, "SLICE", 2)
    envoy = await envoy_factory("legacy")
    ts = targets_of(envoy.admin_url, 9)
    rest = 0.02
    ps = ProcessScraper(WORKER, pace=resting(rest))
    try:
        assert all(r.error is None for r in await ps.cycle(ts[:1]))  # a worker, told of one
        first = ps.worker_pid

        async def late_clusters_pass() -> list[Any]:
            # The stats pass rests 4 times listing its requests and 4 times
            # comparing them (160 ms), then tells the worker of 8 targets
            # in 4 slices 20 ms apart: the last one is told ~240 ms in.
            await asyncio.sleep(9.5 * rest)
            return await ps.clusters_pass(ts[-1:], lambda t: None, 0.0)

        stats, reads = await asyncio.gather(ps.cycle(ts, None, 0.0), late_clusters_pass())
        assert all(r.error is None for r in stats), [r.error for r in stats]
        assert all(r[3] is None for r in reads), [r[3] for r in reads]
        assert ps.worker_pid == first  # the same worker: it never choked
    finally:
        await ps.close()


async def test_a_hung_worker_fails_its_targets_within_the_bound(
        envoy_factory: EnvoyFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGSTOP the worker mid-life: the pass ends after spread + 2 × timeout +
    GRACE with every target failed by name (never a hang), the worker is
    replaced, and the next pass reads again."""
    monkeypatch.setattr(scrape_process, "GRACE", 1.0)
    envoy = await envoy_factory("legacy")
    ts = targets_of(envoy.admin_url, 3)
    cfg = replace(WORKER, scrape=replace(WORKER.scrape, timeout=0.5))
    ps = ProcessScraper(cfg)
    try:
        assert all(r.error is None for r in await ps.cycle(ts))
        stuck = ps.worker_pid
        assert stuck is not None
        os.kill(stuck, signal.SIGSTOP)
        t0 = time.monotonic()
        failed = await ps.cycle(ts)
        took = time.monotonic() - t0
        assert 2 * cfg.scrape.timeout + 1.0 <= took < 2 * cfg.scrape.timeout + 1.0 + 3.0, took
        assert [r.target for r in failed] == ts
        assert all(r.error and "did not answer within" in r.error for r in failed), failed
        assert all(r.reading is None for r in failed)
        again = await ps.cycle(ts)
        assert all(r.error is None for r in again)
        assert ps.worker_pid not in (None, stuck)
    finally:
        await ps.close()


async def test_a_worker_that_cannot_start_leaves_the_pass_to_the_daemon(
        envoy_factory: EnvoyFactory, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    envoy = await envoy_factory("legacy")
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    ps = ProcessScraper(WORKER)
    try:
        results = await ps.cycle(targets_of(envoy.admin_url, 2))
        assert all(r.error is None and r.reading is not None for r in results)
        assert ps.worker_pid is None
        assert "could not start the scrape worker" in caplog.text
    finally:
        await ps.close()


async def test_a_tls_request_is_read_in_process(envoy_factory: EnvoyFactory) -> None:
    """A request with a TLS context (through a control plane over https) is
    never sent to the worker: an SSLContext does not cross processes."""
    envoy = await envoy_factory("legacy")
    ctx = ssl.create_default_context()

    def request_for(t: Target) -> Request:
        return Request(envoy.admin_url, "/stats", {}, "envoy", None, ssl=ctx)

    ps = ProcessScraper(WORKER)
    try:
        results = await ps.cycle(targets_of(envoy.admin_url, 2), request_for)
        assert all(r.error is None and r.reading is not None for r in results)
        assert ps.worker_pid is None  # never started: nothing to send it
    finally:
        await ps.close()
