"""Benchmark harness: passguard's scrape cycle, its gate and its parser against a
simulated fleet, next to a real Prometheus scraping the very same fleet.

Run from the repository root::

    python bench/run.py --targets 1000,5000,10000 --cycles 5 --json bench.json

For each target count N it starts, one after the other and each in its own
process (``docs/performance.md`` explains every figure):

1. the fleet simulator (``bench/fleet.py``: N Envoy admin APIs, ``--clusters``
   service clusters each);
2. a *driver*: this script again (``--driver CONFIG``), which loads a real
   passguard configuration (the N targets in ``target_files``), builds
   ``passguard.app.Daemon``, ``start(schedule=False)`` (the real HTTP server,
   no scheduler) and then runs ``await daemon.cycle()`` each time the harness
   writes ``cycle`` on its stdin.  Cycles are driven, not scheduled, so each
   one is timed alone (wall time by the driver, CPU and RSS by the harness
   from ``/proc/<pid>``) and never overlaps a gate measurement by accident.
   One warm-up cycle (connections, first histories) is run first and reported
   apart; ``cycle_seconds`` is the median of the ``--cycles`` that follow.
   The driver owns the process as ``passguard run`` does (heap frozen after
   each cycle, GIL switch interval). Then concurrent ``POST /v1/check``
   clients measure the gate on that daemon, idle and while a cycle runs: an
   unspread one (``gate_unspread_*``) and one with ``scrape.spread`` as in
   production (``spread-cycle``: auto; ``gate_busy_*``);
3. Prometheus (the Debian binary, or ``--prometheus``) scraping the same N
   targets' ``/stats/prometheus`` with passguard's ``filter``, then a subset
   of them without filter (every series of a big sidecar: see
   ``--prom-unfiltered-targets``); CPU per scrape interval from ``/proc``.

Before the sweep, a second fleet with one target and ``--scan-clusters``
clusters serves a full unfiltered ``/stats`` of tens of megabytes, which
``StatsParser`` scans (the Kuma inspect-API path, where no filter exists).

Everything binds 127.0.0.1; every child is stopped (SIGTERM, then SIGKILL)
when the harness ends, and dies with it (``PR_SET_PDEATHSIG``) if it is killed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, TextIO

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/run.py` puts bench/, not the root, on the path
    sys.path.insert(0, str(ROOT))

from passguard.envoy.names import DEFAULT_CLUSTERS_PATTERN, stats_filter  # noqa: E402
from passguard.envoy.stats import StatsParser, StatsReading  # noqa: E402

FLEET = ROOT / "bench" / "fleet.py"
SELF = Path(__file__).resolve()
CLK_TCK = os.sysconf("SC_CLK_TCK")
FILTER = stats_filter(DEFAULT_CLUSTERS_PATTERN)
#: Target files hold at most this many targets each: one YAML file is loaded
#: with the request-body limits (100,000 nodes), about 9,000 targets.
TARGETS_PER_FILE = 1000
#: passguard's defaults, written into the driver's configuration.
INTERVAL, WINDOW = 15.0, 900.0
#: What every gate request asks: may this mesh switch passthrough off?
MESH_OFF = "type: Mesh\nname: {mesh}\nnetworking:\n  outbound:\n    passthrough: false\n"

#: Keys every row of the JSON output has (the test checks them).
REQUIRED_KEYS = (
    "targets", "cycle_seconds", "cpu_seconds_per_cycle", "peak_rss_bytes", "bytes_per_target",
    "unfiltered_bytes_per_target", "prometheus_cpu_seconds_per_cycle",
    "prometheus_unfiltered_cpu_seconds_per_cycle", "prometheus_peak_rss_bytes",
    "scan_mb_per_s", "gate_p50_ms", "gate_p99_ms",
)


class BenchError(RuntimeError):
    """Something the harness cannot measure around (a child died, a target failed)."""


# --------------------------------------------------------------------------- /proc


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def family(pid: int) -> list[int]:
    """``pid`` and its children: the driver and its scrape worker
    (``scrape.worker``), whose CPU and memory are passguard's too."""
    out = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        out.extend(int(c) for c in (task / "children").read_text().split())
    return out


def cpu_by_pid(pid: int) -> dict[int, float]:
    return {p: cpu_seconds(p) for p in family(pid)}


def cpu_since(before: dict[int, float], pid: int) -> float:
    """CPU of ``pid``'s family since ``before``: a worker started meanwhile
    counts whole, one gone meanwhile counts nothing further."""
    return sum(c - before.get(p, 0.0) for p, c in cpu_by_pid(pid).items())


def peak_rss(pid: int) -> int:
    return sum(status_bytes(p, "VmHWM") for p in family(pid))


def status_bytes(pid: int, key: str) -> int:
    """A ``kB`` line of ``/proc/<pid>/status`` (``VmHWM``: peak RSS), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"no {key} in /proc/{pid}/status")


# --------------------------------------------------------------------------- children


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the harness dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Child:
    """A child process with a log file; ``stop()`` always ends it."""

    def __init__(self, name: str, argv: Sequence[str], log: Path, *,
                 stdin: bool = False, stdout: bool = False) -> None:
        self.name, self.argv, self.log_path = name, list(argv), log
        self._stdin, self._stdout = stdin, stdout
        self.proc: asyncio.subprocess.Process | None = None
        self._log: TextIO | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> None:
        self._log = self.log_path.open("w")
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.PIPE if self._stdin else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE if self._stdout else self._log, stderr=self._log,
            preexec_fn=_die_with_parent, cwd=str(self.log_path.parent))

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def check_alive(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            code = None if self.proc is None else self.proc.returncode
            raise BenchError(f"{self.name} exited ({code}); its log:\n{self.tail()}")

    async def readline(self, timeout: float) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except TimeoutError:
            raise BenchError(f"{self.name}: no answer within {timeout:g}s; its log:\n"
                             f"{self.tail()}") from None
        if not raw:
            await asyncio.sleep(0.2)  # let it be reaped, for the exit code
            raise BenchError(f"{self.name} closed its output ({self.proc.returncode}); "
                             f"its log:\n{self.tail()}")
        return raw.decode()

    async def send(self, line: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()

    async def stop(self, timeout: float = 20.0) -> None:
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


async def start_fleet(tmp: Path, name: str, targets: int, clusters: int,
                      timeout: float = 300.0) -> tuple[Child, str]:
    child = Child(name, [sys.executable, str(FLEET), "--targets", str(targets),
                         "--clusters", str(clusters), "--port", "0", "--host", "127.0.0.1"],
                  tmp / f"{name}.log", stdout=True)
    await child.start()
    line = await child.readline(timeout)
    if not line.startswith("READY "):
        await child.stop()
        raise BenchError(f"{name} did not start: {line!r}")
    return child, line.split()[1]


# --------------------------------------------------------------------------- the driver


async def driver(config_path: Path) -> int:
    """The passguard process: a real Daemon, cycles on command (see the module doc)."""
    import logging

    from passguard import config as config_mod
    from passguard.app import Daemon
    from passguard.scrape_process import ProcessScraper

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    daemon = Daemon(config_mod.load(config_path), config_path)
    await daemon.start(schedule=False)
    daemon.own_the_process()  # the collector and GIL settings of `passguard run`
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def say(msg: Mapping[str, Any]) -> None:
        sys.stdout.write(json.dumps(msg) + "\n")
        sys.stdout.flush()

    say({"event": "ready", "port": daemon.config.listen.port})
    try:
        while line := (await reader.readline()).decode().strip():
            if line == "stop":
                break
            if line.startswith("prefill "):
                _, count, interval = line.split()
                segments = prefill(daemon, int(count), float(interval))
                say({"event": "prefilled", "segments": segments})
                continue
            if line not in ("cycle", "cold-cycle", "spread-cycle"):
                say({"event": "error", "error": f"unknown command {line!r}"})
                continue
            if line == "cold-cycle":
                # Drop the pooled keep-alive connections: every target is
                # connected anew, as when targets are distinct hosts whose
                # idle connections expired between two scheduled cycles.
                # With a scrape worker, a new one (its start is in this cycle's CPU).
                if isinstance(daemon.scraper, ProcessScraper):
                    await daemon.scraper.close()
                else:
                    await daemon.scraper.client.close()
            unspread = daemon.config
            if line == "spread-cycle":
                # scrape.spread as in production (auto), for this cycle only.
                daemon.config = replace(unspread, scrape=replace(unspread.scrape, spread=None))
            t0 = time.monotonic()
            try:
                await daemon.cycle()
            finally:
                daemon.config = unspread
            seconds = time.monotonic() - t0
            snap = daemon.store.snapshot
            errors = [d.error for d in snap.dataplanes if d.error]
            say({"event": "cycle", "seconds": seconds, "dataplanes": len(snap.dataplanes),
                 "states": dict(Counter(d.state for d in snap.dataplanes)),
                 "failed": len(errors), "error_sample": errors[:3]})
    finally:
        await daemon.stop()
    return 0


def prefill(daemon: Any, count: int, interval: float) -> int:
    """Give every dataplane the evidence window of a daemon that has run for a whole
    window: ``count`` samples ``interval`` apart before its latest one (same
    counters, the uptime going back with the clock), through ``History.add``
    as real scrapes would.  Without it a benchmark of a few cycles holds a few
    segments per dataplane instead of window/interval (60 at 15m/15s), and
    under-measures the memory and the per-cycle window arithmetic."""
    from passguard.envoy.stats import StatsReading
    from passguard.store.window import History

    store = daemon.store
    total = 0
    for key, old in list(store.histories.items()):
        last = old.last
        if last is None:
            continue
        new = History()
        for j in range(count, -1, -1):
            uptime = None if last.uptime is None else max(0.0, last.uptime - j * interval)
            new.add(last.t - j * interval, StatsReading(uptime, dict(last.families)),
                    store.stale_after)
        new.last_duration = old.last_duration
        store.histories[key] = new
        total += len(new.segments)
    store.build_snapshot(time.time())
    return total


def write_passguard_config(tmp: Path, fleet_url: str, targets: int, meshes: int,
                           concurrency: int) -> Path:
    """A real configuration: the fleet's targets in ``targets.d/*.yaml``."""
    tdir = tmp / "targets.d"
    tdir.mkdir(exist_ok=True)
    for first in range(0, targets, TARGETS_PER_FILE):
        chunk = [{"url": f"{fleet_url}{n}",
                  "labels": {"mesh": mesh_of(n, meshes), "service": f"svc-{n % 100}",
                             "dataplane": f"dp-{n}"}}
                 for n in range(first, min(first + TARGETS_PER_FILE, targets))]
        (tdir / f"fleet-{first:06d}.yaml").write_text(yaml.safe_dump(chunk, sort_keys=False))
    cfg = {
        "listen": "127.0.0.1:0",
        # The harness drives the cycles; the interval only sets staleness (3x).
        # spread 0s: a cycle is timed as the cost of reading every target, not
        # stretched over the interval as `auto` does in production.
        "scrape": {"interval": f"{INTERVAL:g}s", "timeout": "5s", "concurrency": concurrency,
                   "spread": "0s"},
        "window": f"{WINDOW:g}s",
        "state": {"path": "state/passguard.db"},
        "sources": [{"kind": "envoy", "target_files": ["targets.d/*.yaml"]}],
    }
    path = tmp / "passguard.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def mesh_of(n: int, meshes: int) -> str:
    return "default" if meshes <= 1 else f"mesh-{n % meshes}"


# --------------------------------------------------------------------------- measurements


@dataclass
class Options:
    targets: list[int]
    clusters: int
    cycles: int
    meshes: int
    concurrency: int
    gate_clients: int
    gate_busy_clients: int
    gate_seconds: float
    prometheus: str
    prom_interval: float
    prom_cycles: int
    prom_unfiltered_targets: int
    scan_clusters: int
    scan_repeat: int
    scan_parser: str | None
    byte_samples: int
    prefill: bool
    keep: bool
    workdir: Path | None


Row = dict[str, Any]


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sample."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[k]


async def body_sizes(session: aiohttp.ClientSession, url: str, targets: int, samples: int,
                     params: Mapping[str, str] | None) -> float:
    """Mean ``/stats`` body size over ``samples`` targets spread across the fleet."""
    picks = sorted({round(i * (targets - 1) / max(1, samples - 1)) for i in range(samples)})
    sizes = []
    for n in picks:
        async with session.get(f"{url}{n}/stats", params=params) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise BenchError(f"fleet target {n}: HTTP {resp.status}: {body[:200]!r}")
            sizes.append(len(body))
    return statistics.fmean(sizes)


async def scan_throughput(tmp: Path, opts: Options) -> dict[str, Any]:
    """Parse a full unfiltered ``/stats`` of a ``--scan-clusters`` sidecar."""
    from passguard.envoy.admin import AdminClient

    fleet, url = await start_fleet(tmp, "scan-fleet", 1, opts.scan_clusters)
    try:
        client = AdminClient(4, 1 << 30)
        try:
            t0 = time.perf_counter()
            text = await client.get(f"{url}0", "/stats", None, 120.0)
            fetch = time.perf_counter() - t0
        finally:
            await client.close()
    finally:
        await fleet.stop()
    size = len(text.encode())
    parser = load_parser(opts.scan_parser)
    times = []
    reading = None
    for _ in range(opts.scan_repeat):
        t0 = time.perf_counter()
        reading = parser.parse(text)
        times.append(time.perf_counter() - t0)
    assert reading is not None
    if reading.uptime is None or not reading.families:
        raise BenchError("the scan found no passthrough stats in the unfiltered body")
    best, median = min(times), statistics.median(times)
    return {"scan_body_bytes": size, "scan_clusters": opts.scan_clusters,
            "scan_parser": opts.scan_parser or "passguard.envoy.stats.StatsParser",
            "scan_seconds": median, "scan_mb_per_s": size / median / 1e6,
            "scan_best_mb_per_s": size / best / 1e6,
            # The whole inspect-API read: HTTP from the simulator, decode, scan.
            "scan_fetch_parse_mb_per_s": size / (fetch + median) / 1e6}


class Parser(Protocol):
    def parse(self, text: str) -> StatsReading: ...


def load_parser(spec: str | None) -> Parser:
    """``StatsParser``, or ``FILE.py:CLASS`` (a candidate replacement, for A/B runs)."""
    if spec is None:
        return StatsParser(DEFAULT_CLUSTERS_PATTERN)
    import importlib.util

    path, _, name = spec.rpartition(":")
    module_spec = importlib.util.spec_from_file_location("bench_scan_parser", path)
    if not path or module_spec is None or module_spec.loader is None:
        raise BenchError(f"--scan-parser {spec!r}: want FILE.py:CLASS")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    parser: Parser = getattr(module, name)(DEFAULT_CLUSTERS_PATTERN)
    return parser


async def gate_load(session: aiohttp.ClientSession, url: str, clients: int,
                    until: Callable[[], bool], meshes: int) -> list[float]:
    """``clients`` loops of ``POST /v1/check`` until ``until()``: latencies in seconds."""
    latencies: list[float] = []
    counter = iter(range(1 << 62))

    async def one_client() -> None:
        while not until():
            body = MESH_OFF.format(mesh=mesh_of(next(counter), meshes))
            t0 = time.perf_counter()
            async with session.post(url, data=body,
                                    headers={"Content-Type": "application/yaml"}) as resp:
                answer = await resp.json()
            latencies.append(time.perf_counter() - t0)
            if resp.status != 200 or "verdict" not in answer:
                raise BenchError(f"/v1/check answered {resp.status}: {answer}")

    await asyncio.gather(*(one_client() for _ in range(clients)))
    return latencies


async def measure_passguard(tmp: Path, opts: Options, n: int, fleet: Child, fleet_url: str,
                            row: Row) -> None:
    cfg = write_passguard_config(tmp, fleet_url, n, opts.meshes, opts.concurrency)
    drv = Child("passguard-driver", [sys.executable, str(SELF), "--driver", str(cfg)],
                tmp / "passguard-driver.log", stdin=True, stdout=True)
    await drv.start()
    try:
        ready = json.loads(await drv.readline(120))
        if ready.get("event") != "ready":
            raise BenchError(f"driver: {ready}")
        port = int(ready["port"])

        async def cycle(command: str = "cycle") -> dict[str, Any]:
            c0, f0 = cpu_by_pid(drv.pid), cpu_seconds(fleet.pid)
            await drv.send(command)
            out: dict[str, Any] = json.loads(await drv.readline(600))
            out["cpu"] = cpu_since(c0, drv.pid)
            out["fleet_cpu"] = cpu_seconds(fleet.pid) - f0
            if out.get("event") != "cycle":
                raise BenchError(f"driver: {out}")
            if out["failed"] or out["dataplanes"] != n:
                raise BenchError(f"{out['failed']} of {n} targets failed to scrape "
                                 f"({out['dataplanes']} dataplanes): {out['error_sample']}")
            return out

        first = await cycle()
        log(f"[{n}] warm-up cycle: {first['seconds']:.2f}s, CPU {first['cpu']:.2f}s")
        if opts.prefill:
            # The window of a daemon that has run for WINDOW: (window + stale) / interval.
            await drv.send(f"prefill {math.ceil((WINDOW + 3 * INTERVAL) / INTERVAL)} {INTERVAL}")
            filled = json.loads(await drv.readline(600))
            if filled.get("event") != "prefilled":
                raise BenchError(f"driver: {filled}")
            log(f"[{n}] window prefilled: {filled['segments'] / n:.0f} segments per dataplane")
            row["window_segments_per_dataplane"] = filled["segments"] / n
        row["window_prefilled"] = opts.prefill
        runs = []
        for i in range(opts.cycles):
            runs.append(await cycle())
            log(f"[{n}] cycle {i + 1}: {runs[-1]['seconds']:.2f}s, CPU {runs[-1]['cpu']:.2f}s, "
                f"fleet CPU {runs[-1]['fleet_cpu']:.2f}s")
        row["first_cycle_seconds"] = first["seconds"]
        row["first_cycle_cpu_seconds"] = first["cpu"]
        row["cycle_seconds"] = statistics.median(r["seconds"] for r in runs)
        row["cycle_seconds_max"] = max(r["seconds"] for r in runs)
        row["cpu_seconds_per_cycle"] = statistics.median(r["cpu"] for r in runs)
        row["fleet_cpu_seconds_per_cycle"] = statistics.median(r["fleet_cpu"] for r in runs)
        cold = await cycle("cold-cycle")
        log(f"[{n}] cycle on new connections: {cold['seconds']:.2f}s, CPU {cold['cpu']:.2f}s")
        row["cold_cycle_seconds"] = cold["seconds"]
        row["cold_cpu_seconds_per_cycle"] = cold["cpu"]
        row["cycle_rss_bytes"] = peak_rss(drv.pid)

        url = f"http://127.0.0.1:{port}/v1/check"
        connector = aiohttp.TCPConnector(limit=opts.gate_clients)
        async with aiohttp.ClientSession(connector=connector) as session:
            # Idle daemon: only the gate runs.
            await gate_load(session, url, 1, _after(0.5), opts.meshes)  # warm-up
            c0, t0 = cpu_by_pid(drv.pid), time.monotonic()
            lat = await gate_load(session, url, opts.gate_clients, _after(opts.gate_seconds),
                                  opts.meshes)
            wall = time.monotonic() - t0
            row["gate_requests"] = len(lat)
            row["gate_rps"] = len(lat) / wall
            row["gate_cpu_ms_per_check"] = 1000 * cpu_since(c0, drv.pid) / len(lat)
            row["gate_p50_ms"] = 1000 * percentile(lat, 50)
            row["gate_p99_ms"] = 1000 * percentile(lat, 99)
            log(f"[{n}] gate, idle daemon: p50 {row['gate_p50_ms']:.1f} ms, p99 "
                f"{row['gate_p99_ms']:.1f} ms, {row['gate_rps']:.1f} checks/s, "
                f"{row['gate_cpu_ms_per_check']:.1f} ms CPU per check")
            # A pipeline's checks while a scrape cycle runs on the same event
            # loop: unspread (every scrape at once: the cycle's cost), then as
            # in production (scrape.spread auto: the starts spread).
            for command, prefix in (("cycle", "unspread"), ("spread-cycle", "busy")):
                await drv.send(command)
                answer: asyncio.Task[str] = asyncio.ensure_future(drv.readline(600))
                busy = await gate_load(session, url, opts.gate_busy_clients, answer.done,
                                       opts.meshes)
                done = json.loads(await answer)
                row[f"{prefix}_cycle_seconds"] = done.get("seconds")
                row[f"{prefix}_cycle_failed_targets"] = done.get("failed")
                row[f"gate_{prefix}_requests"] = len(busy)
                if busy:
                    row[f"gate_{prefix}_p50_ms"] = 1000 * percentile(busy, 50)
                    row[f"gate_{prefix}_p99_ms"] = 1000 * percentile(busy, 99)
                log(f"[{n}] gate during a{'n unspread' if prefix == 'unspread' else ' spread'} "
                    f"cycle ({opts.gate_busy_clients} client): {len(busy)} checks, p99 "
                    f"{row.get(f'gate_{prefix}_p99_ms', 0):.0f} ms; the cycle took "
                    f"{done.get('seconds', 0):.2f}s, {done.get('failed')} targets failed")
        row["peak_rss_bytes"] = peak_rss(drv.pid)
        await drv.send("stop")
        if drv.proc is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(drv.proc.wait(), 60)
    finally:
        await drv.stop()


def _after(seconds: float) -> Callable[[], bool]:
    end = time.monotonic() + seconds
    return lambda: time.monotonic() >= end


def prometheus_config(fleet_url: str, targets: int, interval: float,
                      filtered: bool) -> dict[str, Any]:
    """One static group per target: the same address, ``__metrics_path__`` per target."""
    address = fleet_url.split("/")[2]
    prefix = "/" + fleet_url.split("/", 3)[3]
    job: dict[str, Any] = {
        "job_name": "fleet",
        "scrape_interval": f"{interval:g}s",
        "scrape_timeout": f"{interval:g}s",
        "static_configs": [
            {"targets": [address],
             "labels": {"__metrics_path__": f"{prefix}{n}/stats/prometheus",
                        "dataplane": f"dp-{n}"}}
            for n in range(targets)],
    }
    if filtered:
        job["params"] = {"filter": [FILTER]}
    return {"global": {"scrape_interval": f"{interval:g}s",
                       "evaluation_interval": f"{interval:g}s"},
            "scrape_configs": [job]}


async def prom_query(session: aiohttp.ClientSession, base: str, expr: str) -> float | None:
    async with session.get(f"{base}/api/v1/query", params={"query": expr}) as resp:
        body = await resp.json()
    if body.get("status") != "success":
        raise BenchError(f"Prometheus query {expr!r}: {body}")
    result = body["data"]["result"]
    return float(result[0]["value"][1]) if result else None


async def measure_prometheus(tmp: Path, opts: Options, fleet_url: str, targets: int,
                             filtered: bool) -> dict[str, Any]:
    """Prometheus scraping ``targets`` of the fleet: CPU per scrape interval, peak RSS."""
    name = "prometheus-" + ("filtered" if filtered else "unfiltered")
    pdir = tmp / name
    pdir.mkdir()
    (pdir / "prometheus.yml").write_text(yaml.safe_dump(
        prometheus_config(fleet_url, targets, opts.prom_interval, filtered), sort_keys=False))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    prom = Child(name, [opts.prometheus, f"--config.file={pdir / 'prometheus.yml'}",
                        f"--storage.tsdb.path={pdir / 'tsdb'}",
                        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                 pdir / "prometheus.log")
    await prom.start()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            await _wait(lambda: _ok(session, f"{base}/-/ready"), 120, prom, "Prometheus ready")

            async def all_up() -> bool:
                return await prom_query(session, base, "sum(up)") == targets

            # Every target scraped once (series created), then one more interval.
            await _wait(all_up, 60 + 6 * opts.prom_interval, prom, f"{targets} targets up")
            await asyncio.sleep(opts.prom_interval)
            c0, t0 = cpu_seconds(prom.pid), time.monotonic()
            await asyncio.sleep(opts.prom_cycles * opts.prom_interval)
            cpu = cpu_seconds(prom.pid) - c0
            cycles = (time.monotonic() - t0) / opts.prom_interval
            prom.check_alive()
            up = await prom_query(session, base, "sum(up)")
            samples = await prom_query(session, base, "avg(scrape_samples_scraped)")
            duration = await prom_query(session, base, "avg(scrape_duration_seconds)")
        return {"cpu_per_cycle": cpu / cycles, "peak_rss": status_bytes(prom.pid, "VmHWM"),
                "up": up, "samples_per_target": samples, "scrape_duration": duration}
    finally:
        await prom.stop()


async def _ok(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(url) as resp:
            return resp.status == 200
    except aiohttp.ClientError:
        return False


async def _wait(probe: Callable[[], Awaitable[bool]], timeout: float, child: Child,
                what: str) -> None:
    end = time.monotonic() + timeout
    while True:
        child.check_alive()
        try:
            if await probe():
                return
        except (aiohttp.ClientError, TimeoutError):
            # A Prometheus busy with 50,000 targets on two cores may take
            # longer than the session's 30 s to answer a query: asked again.
            pass
        if time.monotonic() > end:
            raise BenchError(f"timed out after {timeout:g}s waiting for {what}; "
                             f"{child.name} log:\n{child.tail()}")
        await asyncio.sleep(0.5)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def measure_n(tmp: Path, opts: Options, n: int, scan: Mapping[str, Any]) -> Row:
    row: Row = {}
    row["targets"] = n
    row["loadavg_before"] = os.getloadavg()[0]
    row["clusters"] = opts.clusters
    row["meshes"] = max(1, opts.meshes)
    row["cycles"] = opts.cycles
    log(f"[{n}] starting a fleet of {n} targets x {opts.clusters} clusters")
    fleet, url = await start_fleet(tmp, "fleet", n, opts.clusters)
    try:
        row["fleet_rss_bytes"] = status_bytes(fleet.pid, "VmRSS")
        async with aiohttp.ClientSession() as session:
            row["bytes_per_target"] = await body_sizes(session, url, n, opts.byte_samples,
                                                       {"filter": FILTER})
            row["unfiltered_bytes_per_target"] = await body_sizes(session, url, n, 3, None)
            # What the Kuma inspect API returns from 2.14 on (usedonly, no filter).
            row["usedonly_bytes_per_target"] = await body_sizes(session, url, n, 3,
                                                                {"usedonly": ""})
        row["bytes_reduction"] = row["unfiltered_bytes_per_target"] / row["bytes_per_target"]
        log(f"[{n}] passguard: 1 warm-up + {opts.cycles} cycles, then the gate")
        await measure_passguard(tmp, opts, n, fleet, url, row)
        log(f"[{n}] Prometheus, filtered, {n} targets")
        try:
            await _measure_prometheus_row(tmp, opts, url, n, row)
        except BenchError as exc:
            # Prometheus may not hold N on this machine: passguard's figures
            # stand, and the row says why the comparison is missing.
            log(f"[{n}] Prometheus could not be measured: {exc}")
            row["prometheus_error"] = str(exc)
    finally:
        await fleet.stop()
    row["loadavg_after"] = os.getloadavg()[0]
    row["cpu_ms_per_target"] = 1000 * row["cpu_seconds_per_cycle"] / n
    row["cpu_us_per_target"] = 1e6 * row["cpu_seconds_per_cycle"] / n
    if "prometheus_cpu_seconds_per_cycle" in row:
        row["prometheus_cpu_ms_per_target"] = \
            1000 * row["prometheus_cpu_seconds_per_cycle"] / n
        row["cpu_ratio_vs_prometheus"] = (row["cpu_seconds_per_cycle"]
                                          / row["prometheus_cpu_seconds_per_cycle"])
    for k, v in scan.items():
        row[k] = v
    return row


async def _measure_prometheus_row(tmp: Path, opts: Options, url: str, n: int, row: Row) -> None:
    """Prometheus on the same fleet: filtered on all N, unfiltered on a few."""
    pf = await measure_prometheus(tmp, opts, url, n, True)
    row["prometheus_cpu_seconds_per_cycle"] = pf["cpu_per_cycle"]
    row["prometheus_peak_rss_bytes"] = pf["peak_rss"]
    row["prometheus_samples_per_target"] = pf["samples_per_target"]
    row["prometheus_scrape_duration_seconds"] = pf["scrape_duration"]
    row["prometheus_up_targets"] = pf["up"]
    s = min(n, opts.prom_unfiltered_targets)
    log(f"[{n}] Prometheus, unfiltered, {s} targets")
    pu = await measure_prometheus(tmp, opts, url, s, False)
    # Scaled to N: the unfiltered scrape of all N would not fit this machine.
    row["prometheus_unfiltered_measured_targets"] = s
    row["prometheus_unfiltered_cpu_seconds_per_target"] = pu["cpu_per_cycle"] / s
    row["prometheus_unfiltered_cpu_seconds_per_cycle"] = pu["cpu_per_cycle"] * n / s
    row["prometheus_unfiltered_peak_rss_bytes"] = pu["peak_rss"]
    row["prometheus_unfiltered_samples_per_target"] = pu["samples_per_target"]
    row["prometheus_unfiltered_up_targets"] = pu["up"]


# --------------------------------------------------------------------------- output

COLUMNS: tuple[tuple[str, str, Callable[[Any], str]], ...] = (
    ("targets", "targets", lambda v: f"{v:,}"),
    ("cycle s", "cycle_seconds", lambda v: f"{v:.2f}"),
    ("CPU s/cycle", "cpu_seconds_per_cycle", lambda v: f"{v:.2f}"),
    ("fleet CPU s", "fleet_cpu_seconds_per_cycle", lambda v: f"{v:.2f}"),
    ("peak RSS MB", "peak_rss_bytes", lambda v: f"{v / 1e6:.0f}"),
    ("B/target", "bytes_per_target", lambda v: f"{v:,.0f}"),
    ("unfilt. B/target", "unfiltered_bytes_per_target", lambda v: f"{v:,.0f}"),
    ("prom CPU s/cycle", "prometheus_cpu_seconds_per_cycle", lambda v: f"{v:.2f}"),
    ("prom unfilt. CPU s/cycle", "prometheus_unfiltered_cpu_seconds_per_cycle",
     lambda v: f"{v:.1f}"),
    ("prom RSS MB", "prometheus_peak_rss_bytes", lambda v: f"{v / 1e6:.0f}"),
    ("CPU vs prom", "cpu_ratio_vs_prometheus", lambda v: f"{v:.2f}x"),
    ("scan MB/s", "scan_mb_per_s", lambda v: f"{v:.0f}"),
    ("gate p50 ms", "gate_p50_ms", lambda v: f"{v:.1f}"),
    ("gate p99 ms", "gate_p99_ms", lambda v: f"{v:.1f}"),
    ("unspread p99 ms", "gate_unspread_p99_ms", lambda v: f"{v:.0f}"),
    ("busy p99 ms", "gate_busy_p99_ms", lambda v: f"{v:.0f}"),
)


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    cells = [[title for title, _, _ in COLUMNS]]
    for r in rows:
        cells.append([fmt(r[key]) if r.get(key) is not None else "-" for _, key, fmt in COLUMNS])
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = [" | ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- main


async def run(opts: Options, out: Path | None) -> int:
    own_tmp = opts.workdir is None
    tmp = Path(tempfile.mkdtemp(prefix="passguard-bench-")) if own_tmp else opts.workdir
    assert tmp is not None
    tmp.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    try:
        log(f"scan: one target x {opts.scan_clusters} clusters, unfiltered /stats")
        sdir = tmp / "scan"
        sdir.mkdir(exist_ok=True)
        scan = await scan_throughput(sdir, opts)
        log(f"scan: {scan['scan_body_bytes'] / 1e6:.1f} MB at {scan['scan_mb_per_s']:.0f} MB/s")
        for n in opts.targets:
            ndir = tmp / f"n{n}"
            ndir.mkdir(exist_ok=True)
            try:
                rows.append(await measure_n(ndir, opts, n, scan))
            except BenchError as exc:
                log(f"[{n}] FAILED: {exc}")
                rows.append({"targets": n, "error": str(exc)})
    finally:
        if own_tmp and not opts.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        elif rows or opts.keep:
            log(f"work files kept in {tmp}")
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()},
        "results": rows,
    }
    print(table(rows))
    if out is not None:
        write_json(out, result)
        log(f"wrote {out}")
    return 1 if any("error" in r for r in rows) else 0


def write_json(path: Path, doc: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(doc, indent=1) + "\n")


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpus": os.cpu_count(), "cpu_model": model, "python": sys.version.split()[0],
            "kernel": os.uname().release}


def parse_targets(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: want N or N,N,...") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("target counts must be >= 1")
    return values


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python bench/run.py",
        description="Measure passguard's scrape cycle, gate and parser on a simulated fleet, "
                    "next to Prometheus scraping the same fleet (docs/performance.md).")
    p.add_argument("--targets", type=parse_targets, default=[1000],
                   help="target count, or a comma-separated sweep (1000,5000,10000)")
    p.add_argument("--clusters", type=int, default=500, help="service clusters per sidecar")
    p.add_argument("--cycles", type=int, default=5,
                   help="measured scrape cycles per N, after one warm-up cycle")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--meshes", type=int, default=1,
                   help="spread targets over this many meshes (1: all in 'default', the "
                        "gate's worst case)")
    p.add_argument("--concurrency", type=int, default=256, help="passguard scrape.concurrency")
    p.add_argument("--gate-clients", type=int, default=8, help="concurrent /v1/check clients")
    p.add_argument("--gate-busy-clients", type=int, default=1,
                   help="sequential /v1/check clients while a scrape cycle runs")
    p.add_argument("--gate-seconds", type=float, default=5.0, help="idle-gate phase length")
    p.add_argument("--prometheus", default=shutil.which("prometheus"),
                   help="Prometheus binary (default: prometheus on PATH)")
    p.add_argument("--prom-interval", type=float, default=15.0,
                   help="Prometheus scrape interval in seconds (passguard's default: 15)")
    p.add_argument("--prom-cycles", type=int, default=3,
                   help="Prometheus intervals measured (after warm-up)")
    p.add_argument("--prom-unfiltered-targets", type=int, default=5,
                   help="targets the unfiltered Prometheus scrapes (~87k series each at 500 "
                        "clusters); its CPU is scaled to N")
    p.add_argument("--scan-clusters", type=int, default=4000,
                   help="clusters of the sidecar whose unfiltered /stats is scanned (~30 MB)")
    p.add_argument("--scan-repeat", type=int, default=5, help="scans timed (median)")
    p.add_argument("--scan-parser", metavar="FILE.py:CLASS",
                   help="scan with this class instead of StatsParser (same constructor and "
                        "parse()): measures a candidate parser on the same body")
    p.add_argument("--byte-samples", type=int, default=50,
                   help="targets whose filtered body size is averaged")
    p.add_argument("--no-prefill", dest="prefill", action="store_false",
                   help="measure with the few segments the cycles leave, instead of a window "
                        "filled as after 15 minutes of scraping")
    p.add_argument("--workdir", type=Path, help="keep work files (logs, configs) here")
    p.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    p.add_argument("--driver", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.driver is not None:
        return asyncio.run(driver(args.driver))
    if not args.prometheus or not Path(args.prometheus).exists():
        p.error("Prometheus is required (apt-get install prometheus, or --prometheus BIN)")
    for name in ("clusters", "cycles", "gate_clients", "gate_busy_clients", "prom_cycles",
                 "prom_unfiltered_targets", "scan_repeat", "byte_samples"):
        if getattr(args, name) < (0 if name == "clusters" else 1):
            p.error(f"--{name.replace('_', '-')} is too small")
    opts = Options(
        targets=args.targets, clusters=args.clusters, cycles=args.cycles, meshes=args.meshes,
        concurrency=args.concurrency, gate_clients=args.gate_clients,
        gate_busy_clients=args.gate_busy_clients,
        gate_seconds=args.gate_seconds, prometheus=args.prometheus,
        prom_interval=args.prom_interval, prom_cycles=args.prom_cycles,
        prom_unfiltered_targets=args.prom_unfiltered_targets, scan_clusters=args.scan_clusters,
        scan_repeat=args.scan_repeat, scan_parser=args.scan_parser,
        byte_samples=args.byte_samples, prefill=args.prefill, keep=args.keep,
        workdir=args.workdir)
    return asyncio.run(_main_guarded(opts, args.json))


async def _main_guarded(opts: Options, out: Path | None) -> int:
    """SIGTERM and SIGINT cancel the run, so every child is stopped on the way out."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await run(opts, out)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except asyncio.CancelledError:
        print("bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
