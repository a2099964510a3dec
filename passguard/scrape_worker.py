"""The scrape worker: the sidecars' admin APIs read in a process of its own.

``passguard run`` starts one (``scrape.worker``, passguard/scrape_process.py)
so that reading and scanning ten thousand ``/stats`` answers and parsing
their ``/clusters`` does not take the gate's event loop, nor its core. The
worker runs the same ``Scraper`` as the daemon would in-process, and streams
each result back as it ends; the daemon records it (``Store.record_one``).

Run as ``python -m passguard.scrape_worker FD PARENT_PID``: FD is its end of
the daemon's socketpair. Messages (passguard/frames.py), daemon to worker::

    ("config", ScrapeConfig, passthrough_clusters, outbound_port, log_level, log_format)
    ("stats", job, spread, [key, …], [(key, Target, Request | None), …])
    ("clusters", job, spread, [key, …], [(key, Target, Request | None), …])

    ("known", [(key, Target, Request | None), …])

A pass names its targets by key and carries only the targets (and requests)
that changed since the worker was last told (see ``take``); many changes
(a new worker: all of them) come ahead of it in "known" messages.

worker to daemon::

    ("ready", pid)
    ("results", job, [(index, t, duration, reading, error), …])
    ("reads", job, [(index, t, destinations | None, error), …])
    ("done", job)

Results go in batches of ``BATCH`` or every ``FLUSH_SECONDS``, whichever
first: each send on the channel cost the worker ~0.4 ms at 50,000 targets
(14 % of its CPU with batches of 32), so batches are large; the daemon
records a batch in pieces of its own (``scrape_process.DISPATCH_SLICE``).
The worker ends when the daemon closes the channel, and when the daemon
dies (``PR_SET_PDEATHSIG``: SIGKILL). It ignores SIGTERM, SIGINT and SIGHUP,
which systemd and a terminal send to the whole group: the daemon's stop lets
its running cycle end with this worker, then closes the channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
from dataclasses import replace
from typing import Any

from passguard import frames
from passguard.config_types import Config
from passguard.logqueue import OneLine, use_format
from passguard.scraper import ClustersRead, Request, Scraper, ScrapeResult
from passguard.targets import Target

log = logging.getLogger(__name__)

#: Results per message, at most; and how long a result waits for its batch.
BATCH = 256
FLUSH_SECONDS = 0.05
_PR_SET_PDEATHSIG = 1


class Outbox:
    """Results of one job, sent in batches on the channel."""

    def __init__(self, writer: asyncio.StreamWriter, kind: str, job: int) -> None:
        self._writer, self._kind, self._job = writer, kind, job
        self._items: list[tuple[Any, ...]] = []
        self._timer: asyncio.TimerHandle | None = None

    def add(self, item: tuple[Any, ...]) -> None:
        self._items.append(item)
        if len(self._items) >= BATCH:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._items:
            self._writer.write(frames.encode((self._kind, self._job, self._items)))
            self._items = []

    def done(self) -> None:
        self.flush()
        self._writer.write(frames.encode(("done", self._job)))


Known = dict[str, tuple[Target, Request | None]]


def take(known: Known, message: tuple[Any, ...]) -> tuple[str, int, float, list[Target],
                                                         list[Request | None]]:
    """A pass's targets from its message and what the worker was told before
    (the daemon sends a target only when it changed; a stats pass lists all,
    so what it leaves out is forgotten, as the daemon does)."""
    kind, job, spread, keys, updates = message
    for key, t, req in updates:
        known[key] = (t, req)
    if kind == "stats":
        kept = set(keys)
        for key in [k for k in known if k not in kept]:
            del known[key]
    pairs = [known[k] for k in keys]
    return kind, job, spread, [t for t, _ in pairs], [r for _, r in pairs]


async def run_job(scraper: Scraper, writer: asyncio.StreamWriter, kind: str, job: int,
                  spread: float, targets: list[Target], reqs: list[Request | None]) -> None:
    index = {id(t): i for i, t in enumerate(targets)}
    requests = {id(t): r for t, r in zip(targets, reqs, strict=True)}
    out = Outbox(writer, "results" if kind == "stats" else "reads", job)

    def request_for(t: Target) -> Request | None:
        return requests[id(t)]

    def on_result(r: ScrapeResult) -> None:
        out.add((index[id(r.target)], r.t, r.duration, r.reading, r.error))

    def on_read(read: ClustersRead) -> None:
        t, at, found, err = read
        out.add((index[id(t)], at, found, err))

    try:
        if kind == "stats":
            await scraper.cycle(targets, request_for, spread, on_result)
        else:
            await scraper.clusters_pass(targets, request_for, spread, None, on_read)
    finally:
        out.done()
        with contextlib.suppress(ConnectionError):
            await writer.drain()


async def serve(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_connection(sock=sock)
    first = await frames.read(reader)
    _, scrape, clusters, port, level, fmt = first
    _configure_logging(level, fmt)
    scraper = Scraper(replace(Config(), scrape=scrape, passthrough_clusters=clusters,
                              outbound_port=port))
    writer.write(frames.encode(("ready", os.getpid())))
    jobs: set[asyncio.Task[None]] = set()
    known: Known = {}
    try:
        while True:
            try:
                message = await frames.read(reader)
            except asyncio.IncompleteReadError:
                return  # the daemon closed the channel: its stop, or it is gone
            if message[0] == "known":  # targets told ahead of a pass, in slices
                known.update((key, (t, req)) for key, t, req in message[1])
                continue
            task = asyncio.create_task(run_job(scraper, writer, *take(known, message)))
            jobs.add(task)
            task.add_done_callback(jobs.discard)
    finally:
        for task in jobs:
            task.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
        await scraper.close()
        writer.close()


def _configure_logging(level: int, fmt: str) -> None:
    """The daemon's log level and format, on the same stderr (journald sees
    one unit); the lines say they are the worker's by the logger's name
    (``passguard.scraper``), each escaped and bounded as the daemon's are."""
    handler = logging.StreamHandler()
    handler.addFilter(OneLine())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    use_format(fmt)


def _die_with(parent: int) -> None:
    """SIGKILL when the daemon dies, however it dies (Linux); and if it died
    before this was set, exit now."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        sys.exit(0)


def main(argv: list[str]) -> int:
    fd, parent = int(argv[0]), int(argv[1])
    _die_with(parent)
    # The daemon says when to stop, by closing the channel. A terminal's
    # Ctrl-C and hang-up reach the whole process group, and systemd's stop
    # sends SIGTERM to the whole unit: the daemon then finishes its running
    # cycle, which needs this worker until its last result, and closes.
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    asyncio.run(serve(fd))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
