"""Load generator: the gate under open-loop load while ``passguard run`` scrapes a fleet.

Run from the repository root::

    python bench/load.py --rate 500 --duration 30 --targets 1000 --json load.json
    python bench/load.py --rates 100,200,500 --duration 20 --targets 1000 --json steps.json

It starts, each in its own process:

1. the fleet simulator (``bench/fleet.py``): ``--targets`` Envoy admin APIs
   with the default traffic mix (70 % idle, the rest steady, bursty or
   restarting), ``--clusters`` service clusters each;
2. a real ``passguard run`` (``python -m passguard run -c FILE``) scraping
   every one of them each ``--interval`` (15 s by default, the production
   default), with its state database, audit log and metrics, in a temporary
   directory. Targets are grouped by traffic into meshes ``busy-0..9`` (some
   traffic) and ``idle-0..9`` (none), so the gate has both answers to give;

then, once passguard is ready (its first full scrape cycle is done), this
process drives ``POST /v1/check`` and ``POST /v1/admission`` (``--check-share``
of the requests are checks, 0.5 by default) at a constant rate: request *i*
is due at ``start + i / rate`` whatever happened to the others (open loop),
with at most ``--concurrency`` in flight. The bodies are realistic: a
Universal Mesh in YAML, a Kubernetes Mesh in JSON and a MeshPassthrough
``None`` to ``/v1/check``; an ``AdmissionReview`` UPDATE of a Kubernetes Mesh
(passthrough true → false) to ``/v1/admission``; for busy and idle meshes.

Latency is measured from the moment a request was *due*, so a client-side
queue (the in-flight bound, a late event loop) counts against passguard's
latency rather than hiding it (no coordinated omission); the service time
(from send to last byte) is reported too. ``errors`` counts transport
errors, timeouts and answers that are not 200; an answer whose verdict is not
the one expected for its mesh is counted apart (``unexpected_verdicts``).

During the run a sampler reads passguard's ``/proc/<pid>`` (CPU, RSS) every
second and its ``/metrics`` every ``--metrics-every`` seconds (as Prometheus
would; half the scrape interval by default, and once before and after the
run): ``passguard_scrape_cycle_duration_seconds`` gives
``max_scrape_cycle_seconds``, and the newest
``passguard_last_successful_scrape_timestamp_seconds`` marks the end of each
cycle, so ``max_cycle_gap_seconds`` shows whether scraping kept its interval.

The JSON written by ``--json`` (one object per rate; ``--rates`` writes
``{"config": …, "runs": […]}``) has at least ``rate, requests, errors, p50_ms,
p99_ms, max_scrape_cycle_seconds``, and CPU/RSS of passguard, the fleet and
this client (to show the generator is not the bottleneck). ``--profile FILE``
records passguard with py-spy during the (last) run.

Everything binds 127.0.0.1; the children are stopped when this ends (SIGTERM,
then SIGKILL) and die with it if it is killed (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import json
import math
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python bench/load.py`
    sys.path.insert(0, str(REPO))

from bench.fleet import DEFAULT_MIX, Pattern, assign_patterns, parse_mix  # noqa: E402

MESHES_PER_KIND = 10
EXPECTED_KEYS = ("rate", "requests", "errors", "p50_ms", "p99_ms", "max_scrape_cycle_seconds")


# --------------------------------------------------------------------------- children


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM this child when the load generator dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _spawn(argv: Sequence[str], log: Path | None, stdout_pipe: bool = False
           ) -> subprocess.Popen[bytes]:
    out: Any = subprocess.PIPE if stdout_pipe else (log.open("ab") if log else subprocess.DEVNULL)
    try:
        return subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT if log and not stdout_pipe else None,
                                cwd=REPO, preexec_fn=_die_with_parent)
    finally:
        if log and not stdout_pipe:
            out.close()


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float = 20.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker_pid(pid: int) -> int | None:
    """passguard's scrape worker (``scrape.worker``), a child of the daemon."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            with contextlib.suppress(OSError):
                if b"passguard.scrape_worker" in Path(f"/proc/{child}/cmdline").read_bytes():
                    return int(child)
    return None


def machine_cpu() -> tuple[int, int, int]:
    """Jiffies of the whole machine from /proc/stat: (busy, steal, total). Steal is
    time the hypervisor gave our virtual CPUs to someone else: a run with steal
    was measured on a machine it did not have."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    steal = fields[7] if len(fields) > 7 else 0
    # guest time is already counted in user/nice: leave fields 8, 9 out.
    total = sum(fields[:8])
    return total - idle - steal, steal, total


def memory_mb(pid: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


# --------------------------------------------------------------------------- bodies


@dataclass(frozen=True)
class Body:
    path: str
    data: bytes
    content_type: str
    mesh: str
    want_allowed: bool  # busy meshes are refused, idle ones allowed


def _mesh_yaml(mesh: str) -> bytes:
    return (f"type: Mesh\nname: {mesh}\nnetworking:\n  outbound:\n"
            f"    passthrough: false\n").encode()


def _k8s_mesh(mesh: str, passthrough: bool) -> dict[str, Any]:
    return {"apiVersion": "kuma.io/v1alpha1", "kind": "Mesh",
            "metadata": {"name": mesh, "uid": f"uid-{mesh}", "generation": 7,
                         "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"networking": {"outbound": {"passthrough": passthrough}},
                     "mtls": {"enabledBackend": "ca-1",
                              "backends": [{"name": "ca-1", "type": "builtin"}]}}}


def _meshpassthrough_none(mesh: str) -> bytes:
    return (f"type: MeshPassthrough\nname: lockdown\nmesh: {mesh}\nspec:\n  targetRef:\n"
            f"    kind: Mesh\n  default:\n    passthroughMode: None\n").encode()


def _review(mesh: str, n: int) -> bytes:
    return json.dumps({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": f"0d8c7a4e-{n:04d}-4b8e-9f5e-7f0a2c1d3e4f",
            "kind": {"group": "kuma.io", "version": "v1alpha1", "kind": "Mesh"},
            "resource": {"group": "kuma.io", "version": "v1alpha1", "resource": "meshes"},
            "requestKind": {"group": "kuma.io", "version": "v1alpha1", "kind": "Mesh"},
            "requestResource": {"group": "kuma.io", "version": "v1alpha1",
                                "resource": "meshes"},
            "name": mesh, "namespace": "", "operation": "UPDATE",
            "userInfo": {"username": "system:serviceaccount:argocd:argocd-application-controller",
                         "uid": "u-1", "groups": ["system:serviceaccounts",
                                                  "system:authenticated"]},
            "object": _k8s_mesh(mesh, False), "oldObject": _k8s_mesh(mesh, True),
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "UpdateOptions"}},
    }).encode()


def bodies(meshes: dict[str, bool]) -> tuple[list[Body], list[Body]]:
    """(checks, admissions) for every mesh; ``meshes`` maps a mesh to "has traffic"."""
    checks: list[Body] = []
    admissions: list[Body] = []
    for i, (mesh, busy) in enumerate(sorted(meshes.items())):
        allowed = not busy
        checks.append(Body("/v1/check", _mesh_yaml(mesh), "application/yaml", mesh, allowed))
        checks.append(Body("/v1/check", json.dumps({"object": _k8s_mesh(mesh, False),
                                                    "oldObject": _k8s_mesh(mesh, True)}).encode(),
                           "application/json", mesh, allowed))
        checks.append(Body("/v1/check", _meshpassthrough_none(mesh), "application/yaml", mesh,
                           allowed))
        admissions.append(Body("/v1/admission", _review(mesh, i), "application/json", mesh,
                               allowed))
    return checks, admissions


# --------------------------------------------------------------------------- the run


@dataclass
class Sample:
    kind: str  # "check" | "admission"
    due: float
    sent: float
    done: float
    ok: bool
    error: str | None
    expected: bool


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)  # nearest rank: the smallest value with q of them at or below it
    return s[max(0, math.ceil(q * len(s)) - 1)]


def _ms(x: float) -> float:
    return round(x * 1000.0, 3)


@dataclass
class Observed:
    """What the sampler saw. ``cycle_ends`` starts with the end of the last cycle
    before the run (the baseline for the first gap); ``cycle_seconds`` holds the
    duration of each cycle that ended during the run."""

    since: float  # wall-clock start of the run
    cycle_seconds: list[float] = field(default_factory=list)
    cycle_ends: list[float] = field(default_factory=list)
    metrics_ms: list[float] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)
    metric_errors: int = 0


def _scan_metrics(text: str) -> tuple[float | None, float | None]:
    """(passguard_scrape_cycle_duration_seconds, newest last-successful-scrape time)."""
    cycle: float | None = None
    newest: float | None = None
    for line in text.splitlines():
        if line.startswith("passguard_scrape_cycle_duration_seconds "):
            cycle = float(line.rsplit(" ", 1)[1])
        elif line.startswith("passguard_last_successful_scrape_timestamp_seconds{"):
            value = float(line.rsplit(" ", 1)[1])
            newest = value if newest is None else max(newest, value)
    return cycle, newest


def fetch_metrics(url: str, timeout: float) -> tuple[float, float | None, float | None]:
    """GET /metrics and scan it: (milliseconds, cycle seconds, newest scrape time).

    Runs in a process of its own (``_metrics_pool``): reading and scanning a
    2 MB exposition in the client's event loop stalled that loop for ~15 ms,
    and the requests in flight then measured the client, not passguard.
    """
    start = time.monotonic()
    with urllib.request.urlopen(url + "/metrics", timeout=timeout) as r:  # noqa: S310 - our http URL
        text = r.read().decode()
    elapsed = time.monotonic() - start
    return (elapsed, *_scan_metrics(text))


_METRICS_POOL: ProcessPoolExecutor | None = None


def _metrics_pool() -> ProcessPoolExecutor:
    global _METRICS_POOL
    if _METRICS_POOL is None:
        _METRICS_POOL = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_die_with_parent)
    return _METRICS_POOL


async def read_metrics(url: str, seen: Observed, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    try:
        elapsed, cycle, newest = await loop.run_in_executor(_metrics_pool(), fetch_metrics, url,
                                                            timeout)
    except (OSError, ValueError):
        seen.metric_errors += 1
        return
    seen.metrics_ms.append(elapsed)
    if newest is not None and (not seen.cycle_ends or newest > seen.cycle_ends[-1]):
        seen.cycle_ends.append(newest)  # a cycle we had not seen yet
        if newest > seen.since and cycle is not None:
            seen.cycle_seconds.append(cycle)


async def sampler(url: str, pid: int, metrics_every: float, stop: asyncio.Event,
                  seen: Observed) -> None:
    """RSS every second; /metrics every ``metrics_every`` s during the run (<= 0:
    never, to measure the gate without that load; the caller reads it before
    and after the run anyway)."""
    next_metrics = time.monotonic() + metrics_every
    while not stop.is_set():
        with contextlib.suppress(OSError):
            rss = memory_mb(pid).get("VmRSS", float("nan"))
            worker = worker_pid(pid)
            if worker is not None:
                rss += memory_mb(worker).get("VmRSS", float("nan"))
            seen.rss_mb.append(rss)  # the daemon and its scrape worker
        if metrics_every > 0 and time.monotonic() >= next_metrics:
            next_metrics += metrics_every
            await read_metrics(url, seen)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), min(1.0, metrics_every) if metrics_every > 0
                                   else 1.0)


async def drive(session: aiohttp.ClientSession, url: str, rate: float, duration: float,
                concurrency: int, checks: list[Body], admissions: list[Body],
                check_share: float) -> tuple[list[Sample], int]:
    """Open loop: request i is due at start + i/rate. Returns the samples and how
    many requests started more than 5 ms after they were due (client backlog)."""
    loop = asyncio.get_running_loop()
    total = max(1, int(rate * duration))
    gate = asyncio.Semaphore(concurrency)
    samples: list[Sample] = []
    tasks: set[asyncio.Task[None]] = set()
    late = 0
    # Deterministic interleaving of the two kinds at the requested share.
    acc = 0.0

    async def one(body: Body, kind: str, due: float) -> None:
        nonlocal late
        async with gate:
            sent = loop.time()
            if sent - due > 0.005:
                late += 1
            ok, error, expected = False, None, False
            try:
                async with session.post(url + body.path, data=body.data,
                                        headers={"Content-Type": body.content_type}) as r:
                    raw = await r.read()
                    ok = r.status == 200
                    if not ok:
                        error = f"HTTP {r.status}"
                    else:
                        answer = json.loads(raw)
                        allowed = answer["allowed"] if kind == "check" else \
                            answer["response"]["allowed"]
                        expected = allowed == body.want_allowed
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
                error = type(exc).__name__
            samples.append(Sample(kind, due, sent, loop.time(), ok, error, expected))

    start = loop.time() + 0.05
    i = 0
    while i < total:
        now = loop.time()
        while i < total and start + i / rate <= now:
            acc += check_share
            if acc >= 1.0 - 1e-9:
                acc -= 1.0
                body, kind = checks[i % len(checks)], "check"
            else:
                body, kind = admissions[i % len(admissions)], "admission"
            task = asyncio.create_task(one(body, kind, start + i / rate))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        if i < total:
            await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
    if tasks:
        await asyncio.wait(tasks)
    return samples, late


def summarize(rate: float, duration: float, samples: list[Sample], late: int,
              seen: Observed, cpu: dict[str, float], wall: float,
              interval: float) -> dict[str, Any]:
    ok = [s for s in samples if s.ok]
    lat = [s.done - s.due for s in ok]
    service = [s.done - s.sent for s in ok]
    errors: dict[str, int] = {}
    for s in samples:
        if s.error:
            errors[s.error] = errors.get(s.error, 0) + 1
    span = (max(s.done for s in samples) - min(s.due for s in samples)) if samples else 0.0
    gaps = [b - a for a, b in zip(seen.cycle_ends, seen.cycle_ends[1:], strict=False)]
    out: dict[str, Any] = {
        "rate": rate,
        "duration_s": duration,
        "requests": len(samples),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "unexpected_verdicts": sum(1 for s in ok if not s.expected),
        "throughput_rps": round(len(ok) / span, 1) if span else 0.0,
        "p50_ms": _ms(_percentile(lat, 0.50)),
        "p90_ms": _ms(_percentile(lat, 0.90)),
        "p99_ms": _ms(_percentile(lat, 0.99)),
        "p999_ms": _ms(_percentile(lat, 0.999)),
        "max_ms": _ms(max(lat)) if lat else float("nan"),
        "service_p50_ms": _ms(_percentile(service, 0.50)),
        "service_p99_ms": _ms(_percentile(service, 0.99)),
        "late_starts": late,
        "by_route": {
            kind: {"requests": sum(1 for s in samples if s.kind == kind),
                   "p50_ms": _ms(_percentile([s.done - s.due for s in ok if s.kind == kind], .5)),
                   "p99_ms": _ms(_percentile([s.done - s.due for s in ok if s.kind == kind], .99))}
            for kind in ("check", "admission")},
        "max_scrape_cycle_seconds": max(seen.cycle_seconds) if seen.cycle_seconds else None,
        "scrape_cycle_seconds_seen": seen.cycle_seconds,
        "scrape_cycles_seen": len(seen.cycle_seconds),
        "max_cycle_gap_seconds": round(max(gaps), 3) if gaps else None,
        "scrape_interval_s": interval,
        "metrics_scrape_ms_max": _ms(max(seen.metrics_ms)) if seen.metrics_ms else None,
        "passguard_cpu_percent": round(100 * cpu["passguard"] / wall, 1),
        "fleet_cpu_percent": round(100 * cpu["fleet"] / wall, 1),
        "client_cpu_percent": round(100 * cpu["client"] / wall, 1),
        "passguard_rss_mb": round(seen.rss_mb[-1], 1) if seen.rss_mb else None,
        "passguard_rss_max_mb": round(max(seen.rss_mb), 1) if seen.rss_mb else None,
    }
    return out


# --------------------------------------------------------------------------- main


@dataclass
class Setup:
    tmp: Path
    fleet: subprocess.Popen[bytes]
    passguard: subprocess.Popen[bytes]
    url: str
    meshes: dict[str, bool]


def start(args: argparse.Namespace, tmp: Path) -> Setup:
    mix = parse_mix(args.patterns) if args.patterns else dict(DEFAULT_MIX)
    fleet = _spawn([sys.executable, str(REPO / "bench" / "fleet.py"), "--targets",
                    str(args.targets), "--clusters", str(args.clusters), "--seed",
                    str(args.seed), "--patterns",
                    ",".join(f"{k}={v}" for k, v in mix.items())], None, stdout_pipe=True)
    assert fleet.stdout is not None
    line = fleet.stdout.readline().decode()
    if not line.startswith("READY "):
        _stop(fleet)
        raise RuntimeError(f"fleet simulator did not start: {line!r}")
    fleet_url = line.split()[1]
    patterns: list[Pattern] = assign_patterns(args.targets, mix, args.seed)
    meshes: dict[str, bool] = {}
    targets = []
    for n, pattern in enumerate(patterns):
        busy = pattern != "idle"
        mesh = f"{'busy' if busy else 'idle'}-{n % MESHES_PER_KIND}"
        meshes[mesh] = busy
        targets.append({"url": f"{fleet_url}{n}",
                        "labels": {"mesh": mesh, "dataplane": f"dp-{n}",
                                   "service": f"svc-{n % 97}"}})
    interval = args.interval
    port = _free_port()
    cfg = {
        "listen": f"127.0.0.1:{port}",
        "scrape": {"interval": f"{interval:g}s", "timeout": f"{min(5.0, interval * 0.8):g}s"},
        "window": f"{max(args.window, 2 * interval):g}s",
        "state": {"path": str(Path(args.state_dir or tmp) / "state.db")},
        "destinations": {"interval": f"{args.destinations_interval:g}s"},
        "sources": [{"kind": "envoy", "target_files": [str(tmp / "targets.yaml")]}],
    }
    (tmp / "targets.yaml").write_text(yaml.safe_dump({"targets": targets}))
    (tmp / "passguard.yaml").write_text(yaml.safe_dump(cfg))
    pg = _spawn([sys.executable, "-m", "passguard", "run", "-c", str(tmp / "passguard.yaml")],
                tmp / "passguard.log")
    return Setup(tmp, fleet, pg, f"http://127.0.0.1:{port}", meshes)


async def wait_ready(setup: Setup, timeout: float) -> float:
    start = time.monotonic()
    async with aiohttp.ClientSession() as session:
        while time.monotonic() - start < timeout:
            if setup.passguard.poll() is not None:
                raise RuntimeError("passguard exited:\n" + _tail(setup.tmp / "passguard.log"))
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(setup.url + "/-/ready",
                                       timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        return time.monotonic() - start
            await asyncio.sleep(0.2)
    raise RuntimeError(f"passguard not ready after {timeout:g}s:\n"
                       + _tail(setup.tmp / "passguard.log"))


def _tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return f"({path} missing)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _profile(pid: int, out: Path, seconds: float) -> subprocess.Popen[bytes] | None:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        print("--profile: py-spy not found (pip install py-spy)", file=sys.stderr)
        return None
    fmt = "speedscope" if out.suffix == ".json" else "flamegraph"
    return _spawn([exe, "record", "--pid", str(pid), "--duration", str(int(seconds) + 1),
                   "--rate", "200", "--format", fmt, "--output", str(out), "--nonblocking"],
                  out.with_suffix(".log"))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rates = [float(r) for r in args.rates.split(",")] if args.rates else [float(args.rate)]
    tmp = Path(tempfile.mkdtemp(prefix="passguard-load-"))
    setup: Setup | None = None
    profiler: subprocess.Popen[bytes] | None = None
    try:
        setup = start(args, tmp)
        ready_s = await wait_ready(setup, args.ready_timeout)
        checks, admissions = bodies(setup.meshes)
        config = {"targets": args.targets, "clusters": args.clusters, "interval_s": args.interval,
                  "concurrency": args.concurrency, "check_share": args.check_share,
                  "meshes": len(setup.meshes), "ready_after_s": round(ready_s, 2),
                  "warmup_s": args.warmup, "cpus": os.cpu_count()}
        connector = aiohttp.TCPConnector(limit=args.concurrency, limit_per_host=0)
        timeout = aiohttp.ClientTimeout(total=args.request_timeout)
        runs = []
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            if args.warmup > 0:  # connections, first parses, SQLite pages
                await drive(session, setup.url, min(rates), args.warmup, args.concurrency,
                            checks, admissions, args.check_share)
            for k, rate in enumerate(rates):
                if args.profile and k == len(rates) - 1:
                    profiler = _profile(setup.passguard.pid, Path(args.profile), args.duration)
                # The client is the measuring instrument: its own garbage
                # collections (~20 ms, seen with a per-callback timer) were
                # showing up as passguard latency. Off for the bounded run (as
                # timeit does), collected right after it.
                gc.collect()
                gc.disable()
                seen = Observed(since=time.time())
                stop = asyncio.Event()
                pids = {"passguard": setup.passguard.pid, "fleet": setup.fleet.pid}
                # passguard's CPU is its daemon's and its scrape worker's together.
                worker = worker_pid(setup.passguard.pid)
                if worker is not None:
                    pids["scrape_worker"] = worker
                cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
                client0, wall0 = time.process_time(), time.monotonic()
                machine0 = machine_cpu()
                # As a Prometheus would, twice per scrape interval: often enough to
                # see every cycle, rarely enough to be a realistic load.
                every = args.metrics_every or args.interval / 2
                await read_metrics(setup.url, seen)  # before the clock starts
                seen.metrics_ms.clear()
                sampling = asyncio.create_task(sampler(setup.url, setup.passguard.pid, every,
                                                       stop, seen))
                samples, late = await drive(session, setup.url, rate, args.duration,
                                            args.concurrency, checks, admissions,
                                            args.check_share)
                stop.set()
                gc.enable()
                await sampling
                await read_metrics(setup.url, seen)  # cycles that ended meanwhile
                wall = time.monotonic() - wall0
                try:
                    cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
                except OSError:
                    raise RuntimeError("passguard's scrape worker was replaced during the "
                                       "run: its CPU cannot be counted") from None
                split = {"passguard_main_cpu_percent": round(100 * cpu["passguard"] / wall, 1),
                         "scrape_worker_cpu_percent": round(
                             100 * cpu.get("scrape_worker", 0.0) / wall, 1)}
                cpu["passguard"] += cpu.pop("scrape_worker", 0.0)
                cpu["client"] = time.process_time() - client0
                machine1 = machine_cpu()
                result = summarize(rate, args.duration, samples, late, seen, cpu, wall,
                                   args.interval)
                if args.samples:
                    _write_samples(Path(args.samples), rate, samples, append=k > 0)
                # Other work on the machine skews every figure: say how busy it was.
                result["loadavg_1m"] = round(os.getloadavg()[0], 2)
                result.update(machine_share(machine0, machine1, cpu, wall))
                result.update(split)
                hwm = memory_mb(setup.passguard.pid).get("VmHWM", float("nan"))
                if worker is not None:
                    hwm += memory_mb(worker).get("VmHWM", float("nan"))
                result["passguard_rss_hwm_mb"] = round(hwm, 1)  # both processes' peaks
                runs.append(result)
                print(_line(result), file=sys.stderr, flush=True)
                if k + 1 < len(rates):
                    await asyncio.sleep(args.pause)
        if profiler is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                profiler.wait(30)
        if setup.passguard.poll() is not None:
            raise RuntimeError("passguard died during the run:\n"
                               + _tail(tmp / "passguard.log"))
        if len(runs) == 1:
            return {**config, **runs[0]}
        return {"config": config, "runs": runs}
    finally:
        _stop(profiler)
        if _METRICS_POOL is not None:
            _METRICS_POOL.shutdown(cancel_futures=True)
        if setup is not None:
            _stop(setup.passguard)
            _stop(setup.fleet)
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def machine_share(before: tuple[int, int, int], after: tuple[int, int, int],
                  cpu: dict[str, float], wall: float) -> dict[str, float]:
    """In % of one CPU over the run: steal, and the CPU the machine spent
    outside passguard, the fleet and this client (other processes, the
    kernel's share of the loopback traffic, the /metrics reader process). A
    run with much of either was measured on a machine it did not have."""
    busy, steal, total = (b - a for a, b in zip(before, after, strict=True))
    tick = os.sysconf("SC_CLK_TCK")
    ours = sum(cpu.values())
    return {"steal_cpu_percent": round(100 * steal / tick / wall, 1),
            "other_cpu_percent": round(max(0.0, 100 * (busy / tick - ours) / wall), 1),
            "machine_busy_percent": round(100 * busy / total, 1) if total else 0.0}


def _write_samples(path: Path, rate: float, samples: list[Sample], append: bool) -> None:
    """One CSV line per request: times in seconds from the first request's due time."""
    t0 = min((s.due for s in samples), default=0.0)
    with path.open("a" if append else "w") as f:
        if not append:
            f.write("rate,kind,due,sent,done,latency_ms,ok,error\n")
        for s in sorted(samples, key=lambda s: s.due):
            f.write(f"{rate:g},{s.kind},{s.due - t0:.4f},{s.sent - t0:.4f},{s.done - t0:.4f},"
                    f"{1000 * (s.done - s.due):.3f},{int(s.ok)},{s.error or ''}\n")


def _line(r: dict[str, Any]) -> str:
    return (f"rate {r['rate']:g}/s: {r['requests']} requests, {r['errors']} errors, "
            f"{r['unexpected_verdicts']} unexpected verdicts, {r['throughput_rps']} req/s; "
            f"latency p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, max {r['max_ms']} ms "
            f"(service p99 {r['service_p99_ms']} ms, {r['late_starts']} late starts); "
            f"scrape cycle max {r['max_scrape_cycle_seconds']} s over "
            f"{r['scrape_cycles_seen']} cycles, max gap {r['max_cycle_gap_seconds']} s; "
            f"CPU passguard {r['passguard_cpu_percent']}% (daemon "
            f"{r.get('passguard_main_cpu_percent')}%, scrape worker "
            f"{r.get('scrape_worker_cpu_percent')}%) fleet {r['fleet_cpu_percent']}% "
            f"client {r['client_cpu_percent']}% other {r.get('other_cpu_percent')}% "
            f"steal {r.get('steal_cpu_percent')}%; RSS passguard {r['passguard_rss_max_mb']} MiB")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/load.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    rate = p.add_mutually_exclusive_group()
    rate.add_argument("--rate", type=float, default=100.0, help="requests per second (100)")
    rate.add_argument("--rates", help="step through these rates, e.g. 100,200,500")
    p.add_argument("--duration", type=float, default=30.0, help="seconds per rate (30)")
    p.add_argument("--targets", type=int, default=1000, help="simulated sidecars (1000)")
    p.add_argument("--clusters", type=int, default=100,
                   help="service clusters per sidecar (100)")
    p.add_argument("--interval", type=float, default=15.0, help="scrape.interval in s (15)")
    p.add_argument("--window", type=float, default=900.0,
                   help="passguard's evidence window in s (900, the default; at least "
                        "twice --interval). A --warmup as long puts the run where the "
                        "window first fills and old evidence starts to age out")
    p.add_argument("--destinations-interval", type=float, default=60.0,
                   help="destinations.interval in s (60)")
    p.add_argument("--patterns", default=None, help="fleet traffic mix (bench/fleet.py)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrency", type=int, default=64, help="requests in flight at most")
    p.add_argument("--check-share", type=float, default=0.5,
                   help="share of /v1/check among the requests (0.5; the rest /v1/admission)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of unmeasured load first")
    p.add_argument("--pause", type=float, default=3.0, help="seconds between --rates steps")
    p.add_argument("--metrics-every", type=float, default=0.0,
                   help="read passguard's /metrics this often during a run, as Prometheus "
                        "would (default: half of --interval; negative: only before and after "
                        "the run)")
    p.add_argument("--request-timeout", type=float, default=10.0)
    p.add_argument("--ready-timeout", type=float, default=300.0)
    p.add_argument("--state-dir", help="where passguard's state database goes (default: the "
                                       "temporary directory; a tmpfs takes the disk's fsync "
                                       "out of the measurement)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--samples", help="write every request's timings here (CSV)")
    p.add_argument("--profile", help="py-spy recording of passguard during the (last) run "
                                     "(.svg flame graph, or .json speedscope)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")] if args.rates else [args.rate]
    if any(r <= 0 for r in rates) or args.duration <= 0 or args.targets < 1:
        p.error("rates, --duration and --targets must be positive")
    if not 0.0 <= args.check_share <= 1.0:
        p.error("--check-share must be between 0 and 1")
    if args.interval < 0.1:
        p.error("--interval must be at least 0.1 s")
    return args


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM: stop the children on the way out, like Ctrl-C


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
