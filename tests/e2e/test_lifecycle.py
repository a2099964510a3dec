"""One lifecycle (issue 14, item 4): every periodic duty is a job of the one
scheduler with the same overlap and misfire rules, and stop() closes what was
opened in the reverse order. A real daemon against the Kuma CP test server
(tests/kuma_cp.py: Kuma's API shapes; the CP itself does not run here)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from passguard import config as config_mod
from passguard.app import Daemon
from tests.kuma_cp import FakeKumaCP

pytestmark = pytest.mark.timeout(60)


async def _until(cond: Any, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, "not within the deadline"
        await asyncio.sleep(0.05)


async def test_every_duty_is_a_job_and_stop_unwinds_in_reverse(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with FakeKumaCP() as cp:
        cp.add_dataplane("m", "web-1")
        raw = {"listen": "127.0.0.1:0", "scrape": {"interval": "1s", "timeout": "500ms"},
               "window": "30s", "state": {"path": "s.db"},
               "sources": [{"kind": "kuma", "url": cp.url, "discovery_interval": "1s"}]}
        d = Daemon(config_mod.build(raw, tmp_path))
        order: list[str] = []
        for name in ("_stop_scheduler", "_close_web", "_close_sources"):
            real = getattr(d, name)

            async def spy(real: Any = real, name: str = name) -> None:
                order.append(name)
                await real()

            monkeypatch.setattr(d, name, spy)
        await d.start()
        try:
            assert d.scheduler is not None
            jobs = {j.id: j for j in d.scheduler.get_jobs()}
            assert set(jobs) == {"scrape", "destinations", "audit-retention", "discovery-0"}
            for job in jobs.values():  # the one rule for every duty
                assert job.max_instances == 1 and job.coalesce is True
                assert job.misfire_grace_time >= 1
            # Discovery runs as a job: a dataplane added to the CP is found.
            cp.add_dataplane("m", "web-2")
            await _until(lambda: "m/web-2" in d.store.targets)
            # A reload re-declares the jobs (a second CP: a second discovery job).
            async with FakeKumaCP() as cp2:
                raw["sources"].append({"kind": "kuma", "url": cp2.url,
                                       "discovery_interval": "2s"})
                await d._apply(config_mod.build(raw, tmp_path))
                ids = {j.id for j in d.scheduler.get_jobs()}
                assert {"discovery-0", "discovery-1"} <= ids
        finally:
            await d.stop()
    # Opened in __init__ (databases, sources), then the web server, then the
    # scheduler: closed scheduler first, the web server next, the sources last.
    assert order == ["_stop_scheduler", "_close_web", "_close_sources"]
    assert d.scheduler is None and d.runner is None
    await d.stop()  # a second stop has nothing left to close
