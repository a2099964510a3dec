"""The audit log alone: how long ``AuditLog.record`` keeps an answer waiting.

Run from the repository root::

    python bench/audit.py --rate 500 --duration 40 --json audit.json
    python bench/audit.py --rate 500 --duration 40 --checkpoint passive

Every gate answer waits until its audit entry is on disk (group commit, WAL,
``synchronous=FULL``: ``passguard/audit.py``). This drives ``record()`` at a
constant rate (open loop: latency counts from when a record was due) with
entries the size the load generator's produce (~2.6 KB: the documents, the
reasons, the evidence), in a fresh database under ``--dir`` (``/var/tmp``, a
real disk, by default), and reports the latency quantiles, how many waited
over 10 ms, and the largest WAL file seen.

``--checkpoint passive`` is the experiment of moving SQLite's WAL checkpoints
off the commit path: automatic checkpoints off on the writer's connection,
``PRAGMA wal_checkpoint(PASSIVE)`` every 0.5 s from a thread with its own
connection. It is not what passguard does; docs/reliability.md §5 says why
(the WAL is never reset under continuous writes, and grew to 320 MB in 40 s).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from passguard.audit import AuditEntry, AuditLog


def _entry() -> AuditEntry:
    # ~2.6 KB as stored: what one decision of bench/load.py takes.
    return AuditEntry("check", "ci", "busy-0", "enforce", "deny", ["r" * 200],
                      [{"kind": "Mesh", "name": "busy-0", "yaml": "x" * 1800}],
                      {"dataplanes": "v" * 300})


def _quantile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def _drive(log: AuditLog, rate: float, duration: float, wal: Path,
                 latencies: list[float]) -> int:
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    wal_max = 0

    async def one(due: float) -> None:
        await log.record([_entry()])
        latencies.append(loop.time() - due)

    start, n = loop.time(), 0
    while (due := start + n / rate) - start < duration:  # bounded by --duration
        if due > loop.time():
            await asyncio.sleep(due - loop.time())
        task = asyncio.create_task(one(due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        n += 1
        if n % 100 == 0:  # a stat(): microseconds, on the loop like the records
            with contextlib.suppress(FileNotFoundError):
                wal_max = max(wal_max, os.stat(wal).st_size)
    await asyncio.gather(*tasks)
    return wal_max


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="passguard-audit-", dir=args.dir))
    path = workdir / "audit.db"
    log = AuditLog(path)
    stop = threading.Event()
    checkpoints = {"count": 0, "max_s": 0.0}
    checkpointer = None
    if args.checkpoint == "passive":
        log._db.execute("PRAGMA wal_autocheckpoint=0")

        def passive() -> None:
            db = sqlite3.connect(path, isolation_level=None, timeout=5)
            while not stop.wait(0.5):
                t = time.perf_counter()
                db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                checkpoints["count"] += 1
                checkpoints["max_s"] = max(checkpoints["max_s"], time.perf_counter() - t)
            db.close()

        checkpointer = threading.Thread(target=passive, daemon=True)
        checkpointer.start()
    latencies: list[float] = []
    try:
        wal_max = asyncio.run(_drive(log, args.rate, args.duration,
                                     path.with_name("audit.db-wal"), latencies))
    finally:
        stop.set()
        if checkpointer is not None:
            checkpointer.join(10)
        log.close()
    size = path.stat().st_size
    for f in workdir.iterdir():
        f.unlink()
    workdir.rmdir()
    latencies.sort()
    ms = [x * 1000 for x in latencies]
    return {"rate": args.rate, "duration_s": args.duration, "checkpoint": args.checkpoint,
            "records": len(ms), "p50_ms": round(_quantile(ms, 0.5), 2),
            "p99_ms": round(_quantile(ms, 0.99), 2), "p999_ms": round(_quantile(ms, 0.999), 2),
            "max_ms": round(ms[-1], 2), "over_10ms": sum(x > 10 for x in ms),
            "wal_max_mb": round(wal_max / 1e6, 1), "db_mb": round(size / 1e6, 1),
            "background_checkpoints": checkpoints["count"],
            "max_checkpoint_ms": round(checkpoints["max_s"] * 1000, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=500.0, help="records per second (500)")
    p.add_argument("--duration", type=float, default=40.0, help="seconds (40)")
    p.add_argument("--checkpoint", choices=("auto", "passive"), default="auto",
                   help="auto: SQLite's, in the commit path (passguard's); passive: the "
                        "experiment of a background thread")
    p.add_argument("--dir", default="/var/tmp", help="where the database goes (a real disk)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.rate <= 0 or not 0 < args.duration <= 3600:
        p.error("--rate must be > 0 and --duration in (0, 3600]")
    result = run(args)
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
