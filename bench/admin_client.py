"""CPU per admin GET: the lean client (passguard.envoy.lean) against aiohttp's
AdminClient, side by side in one run, on the same server.

The server is a real Envoy (``--server envoy``, TCP or ``--admin unix``) or the
fleet simulator in its own process (``--server fleet``: every GET goes to the
next of ``--targets`` simulated sidecars, ``/dp/N/stats``). Either way the
server's CPU is another process's: ``time.process_time()`` around the GETs
counts only the client (parse of the answer included, not the stats parser).

Each round reads the filtered ``/stats`` ``--gets`` times sequentially, then
``--gets`` times with ``--concurrency`` GETs in flight, for both clients; the
order of the clients alternates between rounds so neither always runs on a
warmer (or busier) machine. Prints µs of CPU per GET, median and best of the
rounds, and one JSON line with the same figures.

    python bench/admin_client.py --server envoy --gets 2000 --rounds 5
    python bench/admin_client.py --server fleet --targets 1000 --gets 3000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from passguard.demo.sidecar import EnvoyProcess
from passguard.envoy.admin import AdminClient
from passguard.envoy.lean import LeanClient
from passguard.envoy.names import DEFAULT_CLUSTERS_PATTERN, stats_filter

FILTER = {"filter": stats_filter(DEFAULT_CLUSTERS_PATTERN)}
FLEET = Path(__file__).resolve().parent / "fleet.py"
Get = Callable[[str, str, dict[str, str] | None, float], Awaitable[str]]


@contextlib.asynccontextmanager
async def envoy_server(admin: str) -> AsyncIterator[Callable[[int], str]]:
    async with EnvoyProcess("legacy", admin="unix" if admin == "unix" else "tcp") as envoy:
        url = envoy.admin_url
        yield lambda n: url


@contextlib.asynccontextmanager
async def fleet_server(targets: int, clusters: int) -> AsyncIterator[Callable[[int], str]]:
    env = {**os.environ, "PYTHONPATH": str(FLEET.parent.parent)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(FLEET), "--targets", str(targets), "--clusters", str(clusters),
        stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL, env=env)
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(120):
            while True:
                line = (await proc.stdout.readline()).decode()
                if not line:
                    raise RuntimeError("the fleet simulator exited before it was ready")
                if line.startswith("READY "):
                    break
        url = line.split()[1]
        yield lambda n: f"{url}{n % targets}"
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def measure(get: Get, base: Callable[[int], str], gets: int, concurrency: int
                  ) -> tuple[float, float]:
    """µs of this process's CPU per GET: sequential, then ``concurrency`` in flight."""
    t0 = time.process_time()
    for n in range(gets):
        await get(base(n), "/stats", FILTER, 10.0)
    sequential = (time.process_time() - t0) / gets * 1e6

    todo = iter(range(gets))

    async def worker() -> None:
        for n in todo:
            await get(base(n), "/stats", FILTER, 10.0)

    t0 = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    concurrent = (time.process_time() - t0) / gets * 1e6
    return sequential, concurrent


async def run(opts: argparse.Namespace) -> dict[str, object]:
    server = (envoy_server(opts.admin) if opts.server == "envoy"
              else fleet_server(opts.targets, opts.clusters))
    results: dict[str, dict[str, list[float]]] = {
        name: {"sequential": [], "concurrent": []} for name in ("lean", "aiohttp")}
    async with server as base:
        lean = LeanClient(64 * 1024 * 1024, max_idle=max(opts.concurrency, 1024))
        ref = AdminClient(opts.concurrency, 64 * 1024 * 1024)
        clients: dict[str, Get] = {"lean": lean.get, "aiohttp": ref.get}
        try:
            for get in clients.values():  # warm: connections, caches, code paths
                await measure(get, base, min(200, opts.gets), opts.concurrency)
            for r in range(opts.rounds):
                order = list(clients) if r % 2 == 0 else list(reversed(clients))
                for name in order:
                    seq, conc = await measure(clients[name], base, opts.gets, opts.concurrency)
                    results[name]["sequential"].append(seq)
                    results[name]["concurrent"].append(conc)
            opened = lean.opened
        finally:
            await lean.close()
            await ref.close()
    summary: dict[str, object] = {
        "server": opts.server if opts.server == "fleet" else f"envoy-{opts.admin}",
        "gets": opts.gets, "rounds": opts.rounds, "concurrency": opts.concurrency,
        "lean_connections_opened": opened}
    print(f"server {summary['server']}, {opts.gets} GETs of the filtered /stats per mode, "
          f"{opts.rounds} rounds, concurrency {opts.concurrency}; CPU µs per GET "
          "(median, best):")
    for mode in ("sequential", "concurrent"):
        med = {n: statistics.median(results[n][mode]) for n in results}
        best = {n: min(results[n][mode]) for n in results}
        print(f"  {mode:<10}  lean {med['lean']:7.1f} ({best['lean']:6.1f})   "
              f"aiohttp {med['aiohttp']:7.1f} ({best['aiohttp']:6.1f})   "
              f"ratio {med['lean'] / med['aiohttp']:.2f}")
        summary[f"{mode}_us_per_get"] = {"lean": round(med["lean"], 1),
                                         "aiohttp": round(med["aiohttp"], 1)}
        summary[f"{mode}_ratio"] = round(med["lean"] / med["aiohttp"], 3)
    print(json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", choices=("envoy", "fleet"), default="envoy")
    p.add_argument("--admin", choices=("tcp", "unix"), default="tcp",
                   help="Envoy's admin address (--server envoy)")
    p.add_argument("--targets", type=int, default=1000, help="simulated sidecars (fleet)")
    p.add_argument("--clusters", type=int, default=500, help="clusters per sidecar (fleet)")
    p.add_argument("--gets", type=int, default=2000, help="GETs per mode and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=32)
    opts = p.parse_args(argv)
    if opts.gets < 1 or opts.rounds < 1 or opts.concurrency < 1 or opts.targets < 1:
        p.error("--gets, --rounds, --concurrency and --targets must be positive")
    asyncio.run(run(opts))


if __name__ == "__main__":
    main()
