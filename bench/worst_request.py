"""The gate's worst single request, and what the daemon's probes see meanwhile.

Run from the repository root::

    python bench/worst_request.py --matches 1000 --destinations 10000 --json worst.json

It writes a passguard state database holding one mesh, ``big``, of
``--dataplanes`` dataplanes (``--destinations`` observed external
destinations between them, all with traffic inside the window), using
passguard's own store and persistence code; starts a real ``passguard run``
on it (the targets point at a closed port: the evidence is the restored
window, as after a restart); then sends ``--requests`` times the largest
document the default limits allow — a MeshPassthrough ``Matched`` for the
whole mesh with ``--matches`` appendMatch entries (CIDRs and IPs of assorted
prefix lengths, ports and protocols, every destination's /24 among them, so
every lookup walks the index) — while another task asks ``GET /-/healthy``
every 10 ms.

It reports the request's latency (each one) and the probe's latency while
requests were in flight (p50, p99, max, count). Everything binds 127.0.0.1;
the loops are bounded in count and time; passguard is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from passguard.envoy.clusters import Destination as EnvoyDestination  # noqa: E402
from passguard.envoy.stats import Counters, StatsReading  # noqa: E402
from passguard.scraper import ScrapeResult  # noqa: E402
from passguard.store.persistence import StateDB  # noqa: E402
from passguard.store.store import Store  # noqa: E402
from passguard.targets import Target  # noqa: E402

MESH = "big"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def destination_ip(i: int) -> str:
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255 or 1}"


def fill_state(path: Path, dataplanes: int, destinations: int, now: float,
               window: float) -> list[Target]:
    """A restored window: each dataplane sampled twice inside the window with
    traffic between, and its share of the destinations read from /clusters."""
    targets = [Target(f"http://127.0.0.1:1/dp-{i}", MESH, f"dp-{i}", f"svc-{i % 20}")
               for i in range(dataplanes)]
    db = StateDB(path)
    store = Store(window, 45.0, db)
    store.set_targets(targets)
    t0, t1 = now - window / 3, now - 5.0
    for t, total in ((t0, 0), (t1, 1000)):
        store.record([ScrapeResult(tg, t, 0.01, StatsReading(
            3600.0 + t - t0, {"ipv4": Counters(cx_total=total)}), None) for tg in targets])
        asyncio.run(store.persist(t))
    per_dp: dict[int, list[EnvoyDestination]] = {}
    for i in range(destinations):
        per_dp.setdefault(i % dataplanes, []).append(
            EnvoyDestination(f"{destination_ip(i)}:{443 if i % 3 else 5432}", "ipv4", 7, 0))
    for t, total in ((t0, 0), (t1, 1)):
        reads = [(targets[dp], t, [EnvoyDestination(d.address, d.family, d.cx_total * total,
                                                    0) for d in dests])
                 for dp, dests in per_dp.items()]
        changed = store.record_destinations(reads)
        asyncio.run(store.persist_destinations(changed, t))
    db.close()
    return targets


def worst_document(matches: int, destinations: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    entries: list[dict[str, Any]] = []
    protocols = ("tcp", "tls", "http", "tcp", "tls")
    while len(entries) < matches:
        i = rng.randrange(destinations)
        ip = destination_ip(i)
        kind = rng.choice(("IP", "CIDR16", "CIDR24", "CIDR28"))
        if kind == "IP":
            entry: dict[str, Any] = {"type": "IP", "value": ip}
        else:
            bits = int(kind[4:])
            entry = {"type": "CIDR", "value": f"{ip}/{bits}"}
        proto = rng.choice(protocols)
        entry["protocol"] = proto
        if proto == "http" or rng.random() < 0.5:
            entry["port"] = rng.choice((80, 443, 5432, 8443)) if proto != "http" else 80
        entries.append(entry)
    return {"type": "MeshPassthrough", "name": "worst", "mesh": MESH,
            "spec": {"targetRef": {"kind": "Mesh"},
                     "default": {"passthroughMode": "Matched", "appendMatch": entries}}}


def ready(url: str) -> bool:
    with contextlib.suppress(OSError), \
            urllib.request.urlopen(url + "/-/ready", timeout=1.0) as r:  # noqa: S310
        return bool(r.status == 200)
    return False


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(url: str, bodies: list[bytes], timeout: float) -> dict[str, Any]:
    probes: list[float] = []
    during: list[float] = []
    in_flight = asyncio.Event()
    done = asyncio.Event()

    async def probe(session: aiohttp.ClientSession) -> None:
        deadline = time.monotonic() + timeout
        while not done.is_set() and time.monotonic() < deadline:
            start = time.perf_counter()
            async with session.get(url + "/-/healthy") as r:
                await r.read()
            ms = (time.perf_counter() - start) * 1000
            probes.append(ms)
            if in_flight.is_set():
                during.append(ms)
            await asyncio.sleep(0.01)

    latencies: list[float] = []
    verdicts: list[str] = []
    conn = aiohttp.TCPConnector(limit=4)
    async with aiohttp.ClientSession(connector=conn) as probe_session, \
            aiohttp.ClientSession() as session:
        task = asyncio.create_task(probe(probe_session))
        await asyncio.sleep(0.5)  # a baseline of idle probes first
        for body in bodies:
            in_flight.set()
            start = time.perf_counter()
            async with session.post(url + "/v1/check", data=body,
                                    timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                answer = await r.json()
                assert r.status == 200, answer
            latencies.append((time.perf_counter() - start) * 1000)
            in_flight.clear()
            verdicts.append(answer["verdict"])
            await asyncio.sleep(0.2)
        done.set()
        await task
    return {
        "request_ms": [round(x, 1) for x in latencies],
        "request_p50_ms": round(statistics.median(latencies), 1),
        "request_max_ms": round(max(latencies), 1),
        "verdicts": sorted(set(verdicts)),
        "healthy_during_count": len(during),
        "healthy_during_p50_ms": round(percentile(during, 0.5), 2),
        "healthy_during_p99_ms": round(percentile(during, 0.99), 2),
        "healthy_during_max_ms": round(max(during, default=float("nan")), 2),
        "healthy_idle_p50_ms": round(percentile(probes[:40], 0.5), 2),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--matches", type=int, default=1000)
    p.add_argument("--destinations", type=int, default=10_000)
    p.add_argument("--dataplanes", type=int, default=100)
    p.add_argument("--requests", type=int, default=5)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=120.0, help="per request, and the probe loop")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="passguard-worst-") as tmp:
        d = Path(tmp)
        now = time.time()
        window = 900.0
        targets = fill_state(d / "state.db", args.dataplanes, args.destinations, now, window)
        port = free_port()
        (d / "targets.yaml").write_text(yaml.safe_dump([
            {"url": t.url, "labels": {"mesh": t.mesh, "dataplane": t.dataplane,
                                      "service": t.service}} for t in targets]))
        (d / "passguard.yaml").write_text(yaml.safe_dump({
            "listen": f"127.0.0.1:{port}", "window": "15m", "state": {"path": "state.db"},
            "scrape": {"interval": "15s", "timeout": "1s"},
            "destinations": {"interval": "1h"},
            "sources": [{"kind": "envoy", "target_files": ["targets.yaml"]}]}))
        proc = subprocess.Popen([sys.executable, "-m", "passguard", "run", "-c",
                                 str(d / "passguard.yaml")], cwd=tmp,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60  # ready once the state is restored
            while not ready(url):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("passguard did not become ready: "
                                     + (proc.stderr.read().decode()[-2000:]
                                        if proc.poll() is not None and proc.stderr else ""))
                time.sleep(0.2)
            # A new document each time: the same one twice is answered from
            # the snapshot's memo, which would hide the work measured here.
            bodies = [json.dumps(worst_document(args.matches, args.destinations,
                                                args.seed + i)).encode()
                      for i in range(args.requests)]
            result = asyncio.run(measure(url, bodies, args.timeout))
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    result.update(matches=args.matches, destinations=args.destinations,
                  dataplanes=args.dataplanes, body_bytes=max(len(b) for b in bodies),
                  cpus=os.cpu_count())
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
