"""bench/load.py cannot rot: a small run end to end (fleet, ``passguard run``, the
open-loop client), checked for its JSON and for zero errors.

The figures themselves (latency, throughput) are the benchmark's business,
not this test's: a loaded CI machine must not fail it. What must hold at any
speed: every request answered 200 with the verdict its mesh deserves, and
scraping observed while the gate was loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
KEYS = ("rate", "requests", "errors", "p50_ms", "p99_ms", "max_scrape_cycle_seconds",
        "passguard_cpu_percent", "passguard_rss_max_mb", "throughput_rps",
        "unexpected_verdicts", "scrape_cycles_seen", "max_cycle_gap_seconds",
        "steal_cpu_percent", "other_cpu_percent")

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def _run(tmp_path: Path, *args: str) -> dict[str, object]:
    out = tmp_path / "load.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "load.py"), "--targets", "50", "--clusters", "5",
         "--interval", "1", "--warmup", "0.5", "--json", str(out), *args],
        cwd=REPO, capture_output=True, text=True, timeout=100, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, object] = json.loads(out.read_text())
    return result


def test_small_run_reports_every_key_and_no_errors(tmp_path: Path) -> None:
    r = _run(tmp_path, "--rate", "50", "--duration", "3")
    missing = [k for k in KEYS if k not in r]
    assert not missing, (missing, r)
    assert r["rate"] == 50.0 and r["requests"] == 150
    assert r["errors"] == 0 and r["unexpected_verdicts"] == 0, r
    assert isinstance(r["p50_ms"], float) and isinstance(r["p99_ms"], float)
    assert r["p50_ms"] <= r["p99_ms"]
    # A 1 s interval over 3 s: cycles ran while the gate was loaded, and each
    # one took less than the interval.
    assert isinstance(r["scrape_cycles_seen"], int) and r["scrape_cycles_seen"] >= 2, r
    assert isinstance(r["max_scrape_cycle_seconds"], float)
    assert 0 < r["max_scrape_cycle_seconds"] < 1.0, r
    assert r["by_route"]["check"]["requests"] == r["by_route"]["admission"]["requests"] == 75  # type: ignore[index]


def test_rate_steps(tmp_path: Path) -> None:
    r = _run(tmp_path, "--rates", "20,40", "--duration", "1", "--pause", "0.2",
             "--metrics-every", "-1")
    runs = r["runs"]
    assert isinstance(runs, list) and [x["rate"] for x in runs] == [20.0, 40.0]
    assert all(x["errors"] == 0 for x in runs), runs
    assert r["config"]["targets"] == 50  # type: ignore[index]


def test_machine_share_separates_steal_and_other_processes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Over 10 s at 100 ticks/s: 600 busy ticks of which the bench's processes
    used 4.5 s, 50 ticks stolen by the hypervisor."""
    sys.path.insert(0, str(REPO))
    from bench import load

    monkeypatch.setattr(load.os, "sysconf", lambda name: 100)
    share = load.machine_share((1000, 10, 5000), (1600, 60, 7000),
                               {"passguard": 3.0, "fleet": 0.5, "client": 1.0}, 10.0)
    assert share == {"steal_cpu_percent": 5.0, "other_cpu_percent": 15.0,
                     "machine_busy_percent": 30.0}
