"""The benchmark harness (bench/run.py) runs end to end, so it cannot rot.

A reduced run — 200 targets, 50 clusters, 2 cycles, a one-second gate phase,
Prometheus with a 2 s interval — exercises every phase the real sweep has
(fleet, passguard driver, gate, Prometheus filtered and unfiltered, scan) as
the subprocess a person would start, and the JSON it writes is checked for
its keys and for sane values.  No figure is compared with a target here:
speed is the harness's output, not a test's (docs/performance.md).

Prometheus is required: without it the test fails, it does not skip.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.run import REQUIRED_KEYS, percentile, table

ROOT = Path(__file__).resolve().parents[2]
TARGETS = 200


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, object], str]:
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is not installed (apt-get install prometheus): the harness "
                    "compares passguard with it")
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "bench.json"
    cmd = [sys.executable, str(ROOT / "bench" / "run.py"), "--targets", str(TARGETS),
           "--clusters", "50", "--cycles", "2", "--gate-seconds", "1",
           "--prom-interval", "2", "--prom-cycles", "2", "--prom-unfiltered-targets", "2",
           "--scan-clusters", "300", "--scan-repeat", "2", "--byte-samples", "10",
           "--json", str(out), "--workdir", str(tmp / "work")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=150,
                          check=False)
    assert proc.returncode == 0, f"bench/run.py failed ({proc.returncode}):\n{proc.stderr}"
    doc: dict[str, object] = json.loads(out.read_text())
    return doc, proc.stdout


def test_one_row_per_target_count_with_every_key(run: tuple[dict[str, object], str]) -> None:
    doc, _ = run
    rows = doc["results"]
    assert isinstance(rows, list) and len(rows) == 1
    row = rows[0]
    missing = [k for k in REQUIRED_KEYS if k not in row]
    assert not missing, f"keys missing from the JSON row: {missing}"
    assert row["targets"] == TARGETS
    assert "error" not in row
    for key in ("date", "machine", "options"):
        assert key in doc


def test_values_are_sane(run: tuple[dict[str, object], str]) -> None:
    doc, _ = run
    rows = doc["results"]
    assert isinstance(rows, list)
    row = rows[0]
    for key in REQUIRED_KEYS:
        value = row[key]
        assert isinstance(value, int | float) and math.isfinite(value) and value > 0, \
            f"{key} = {value!r}"
    # The server-side filter is the point: a filtered answer is far smaller.
    assert row["bytes_per_target"] < row["unfiltered_bytes_per_target"]
    assert row["bytes_per_target"] < 5000
    # Every target was scraped, by passguard (else the run fails) and by Prometheus.
    assert row["prometheus_up_targets"] == TARGETS
    assert row["prometheus_unfiltered_up_targets"] == 2
    # Prometheus got the filtered series only (the fleet honours `filter` there too),
    # and everything without it.
    assert row["prometheus_samples_per_target"] < 30
    assert row["prometheus_unfiltered_samples_per_target"] > 100 * row[
        "prometheus_samples_per_target"]
    assert row["gate_p50_ms"] <= row["gate_p99_ms"]
    assert row["gate_requests"] > 0
    assert row["peak_rss_bytes"] >= row["cycle_rss_bytes"] > 10 * 2**20
    assert row["scan_body_bytes"] > 1_000_000


def test_table_on_stdout(run: tuple[dict[str, object], str]) -> None:
    _, stdout = run
    header, rule, line = stdout.strip().splitlines()[-3:]
    assert "cycle s" in header and "gate p99 ms" in header
    assert set(rule) <= {"-", "+"}
    assert line.split("|")[0].strip() == f"{TARGETS}"


def test_percentile_and_table_helpers() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 99) == 99.0
    assert percentile([5.0], 99) == 5.0
    assert "targets" in table([{"targets": 1}])  # missing figures print as "-"
