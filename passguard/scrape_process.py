"""The scraper in a process of its own: what ``scrape.worker: process`` runs.

At 500 gate requests/s while scraping 10,000 sidecars, one process spent
~70 % of its main thread busy, a quarter of it reading and scanning admin
answers, and the gate's p99 was 70-90 ms (docs/performance.md). Here the
reads, the ``/stats`` scans and the ``/clusters`` parses run in a worker
process (passguard/scrape_worker.py) on the other core; the daemon gets each
result back as it ends and records it as before (``on_result``), so the
store, the evidence, the metrics and the gate do not change.

``ProcessScraper`` has ``Scraper``'s interface (``cycle``, ``clusters_pass``,
``close``). What stays in the daemon's process:

- a target whose request carries a TLS context (an SSLContext is not sent
  across; reading through a control plane over https): read by an
  in-process ``Scraper``, concurrently with the worker's share;
- the request of each target (``request_for``), computed here, so a
  reload's or a discovery's new request applies at the next cycle.

Failure modes (tests/e2e/test_scrape_worker.py):

- the worker exits or is killed mid-pass: every target it had not answered
  gets a failed result naming that, at once (never a hang); the next pass
  starts a new worker, and ``passguard_scrape_worker_exits_total`` counts it;
- a worker that does not answer within the pass's bound (spread + twice the
  timeout + ``GRACE``) is killed, with the same outcome;
- a worker that cannot start (the interpreter missing, a broken install):
  that pass is read in-process, with an ERROR in the log, so the evidence
  keeps coming;
- the daemon dies: the kernel sends the worker SIGKILL (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from passguard import frames, logqueue
from passguard.config_types import Config
from passguard.pacing import Pace, one_turn, turn
from passguard.scraper import (
    ClustersRead,
    Request,
    Scraper,
    ScrapeResult,
    internal_error,
    log_unexpected,
)
from passguard.targets import Target

log = logging.getLogger(__name__)

#: Seconds a new worker has to say it is ready (an interpreter start and imports).
START_TIMEOUT = 30.0
#: Beyond spread + 2 × timeout, how long a pass may take before the worker is
#: declared stuck.
GRACE = 30.0
#: ``scrape.worker: auto`` reads a pass in the worker from this many targets
#: (a read costs the loop ~0.1 ms: below this, under 5 % of a 1 s interval,
#: and a per-dataplane agent reads one).
AUTO_WORKER_TARGETS = 500
#: After a close, how long the worker has to exit before it is killed.
EXIT_TIMEOUT = 5.0
#: Answers recorded per piece of the loop (~1 ms); a frame brings up to
#: ``scrape_worker.BATCH``.
DISPATCH_SLICE = 32

RequestFor = Callable[[Target], Request | None]
R = TypeVar("R")


@dataclass
class _Job:
    """A pass sent to the worker: its targets, and what came back so far."""

    kind: str  # "stats" | "clusters"
    targets: list[Target]
    on_item: Callable[[int, tuple[Any, ...]], None]
    answered: set[int] = field(default_factory=set)
    finished: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


class WorkerGone(Exception):
    """The worker exited or stopped answering; the message says which."""


class _Worker:
    """One running worker process and the reader of its messages."""

    def __init__(self, proc: asyncio.subprocess.Process, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, pace: Pace) -> None:
        self.proc, self.reader, self.writer = proc, reader, writer
        self.pace = pace
        self.jobs: dict[int, _Job] = {}
        # What the worker was told of each target: a pass sends a target and
        # its request only when they changed (10,000 pickled anew each pass
        # held the loop 30-47 ms).
        self.known: dict[str, tuple[Target, Request | None]] = {}
        self.gone: str | None = None
        self.handing_over = asyncio.Lock()  # ProcessScraper._run
        self.reading = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                message = await frames.read(self.reader)
                # Recorded DISPATCH_SLICE answers per piece: a backlog read
                # at once held the loop for 40-55 ms; a piece per turn of the
                # loop without rest still left a request one turn in three (a
                # pass's first answers: 40-60 ms of requests waiting).
                items = message[2] if len(message) > 2 else ()
                for start in range(0, max(1, len(items)), DISPATCH_SLICE):
                    give_way = self.pace()
                    self._dispatch(message, start, start + DISPATCH_SLICE)
                    await give_way()
        except asyncio.IncompleteReadError:
            self.gone = "the scrape worker exited"
        except (frames.FrameError, ConnectionError, ValueError) as exc:
            self.gone = f"the scrape worker's channel broke: {exc}"
        except asyncio.CancelledError:
            self.gone = "the scrape worker was stopped"
            raise
        finally:
            for job in self.jobs.values():
                if not job.finished.done():
                    job.finished.set_exception(WorkerGone(self.gone or "gone"))
            self.jobs.clear()

    def _dispatch(self, message: tuple[Any, ...], start: int = 0,
                  stop: int | None = None) -> None:
        """``message``'s answers ``[start:stop]``, or its end of a pass."""
        kind, job_id = message[0], message[1]
        job = self.jobs.get(job_id)
        if job is None:
            return  # a pass given up on (its bound passed): late results are dropped
        if kind == "done":
            del self.jobs[job_id]
            job.finished.set_result(None)
            return
        for item in itertools.islice(message[2], start, stop):
            i = item[0]
            if 0 <= i < len(job.targets) and i not in job.answered:
                job.answered.add(i)
                job.on_item(i, item)

    async def stop(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.proc.wait(), EXIT_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
        self.reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reading


class ProcessScraper:
    """``Scraper``'s passes, read by a worker process (module docstring)."""

    def __init__(self, cfg: Config, on_exit: Callable[[], None] | None = None,
                 pace: Pace = one_turn) -> None:
        self.cfg = cfg
        self.pace = pace  # between the pieces of handing a pass over and of its answers
        self.timeout = cfg.scrape.timeout
        self.inline = Scraper(cfg)  # TLS targets, and a worker that cannot start
        self._on_exit = on_exit
        self._worker: _Worker | None = None
        self._large = False  # the last stats pass had AUTO_WORKER_TARGETS targets
        self._starting = asyncio.Lock()
        self._ids = itertools.count(1)

    @property
    def worker_pid(self) -> int | None:
        w = self._worker
        return None if w is None or w.gone else w.proc.pid

    async def cycle(self, targets: list[Target], request_for: RequestFor | None = None,
                    spread: float = 0.0,
                    on_result: Callable[[ScrapeResult], object] | None = None
                    ) -> list[ScrapeResult]:
        """``Scraper.cycle``: one result per online target, in order."""
        online = [t for t in targets if not t.offline]
        return await self._pass(
            "stats", online, request_for, spread, on_result,
            lambda t, item: ScrapeResult(t, item[1], item[2], item[3], item[4]),
            lambda t, why: ScrapeResult(t, time.time(), 0.0, None, why),
            lambda ts, rf, done: self.inline.cycle(ts, rf, spread,
                                                   lambda r: done(r.target, r)))

    async def clusters_pass(self, targets: list[Target], request_for: RequestFor,
                            spread: float = 0.0,
                            on_start: Callable[[Target], None] | None = None,
                            on_done: Callable[[ClustersRead], None] | None = None
                            ) -> list[ClustersRead]:
        """``Scraper.clusters_pass``. ``on_start`` sees every target when the
        pass is handed to the worker, before its read starts: a mark taken
        earlier can only make a dataplane look less quiet (read again), never
        quieter."""
        online = [t for t in targets if not t.offline]
        if on_start is not None:
            give_way = self.pace()
            for n, t in enumerate(online):
                if n and not n % SLICE:
                    await give_way()
                on_start(t)
        return await self._pass(
            "clusters", online, request_for, spread, on_done,
            lambda t, item: (t, item[1], item[2], item[3]),
            lambda t, why: (t, time.time(), None, why),
            lambda ts, rf, done: self.inline.clusters_pass(ts, rf, spread, None,
                                                           lambda r: done(r[0], r)))

    async def _pass(self, kind: str, online: list[Target], request_for: RequestFor | None,
                    spread: float, on_each: Callable[[R], object] | None,
                    build: Callable[[Target, tuple[Any, ...]], R],
                    fail: Callable[[Target, str], R],
                    run_inline: Callable[[list[Target], RequestFor,
                                          Callable[[Target, R], None]], Awaitable[Any]]
                    ) -> list[R]:
        """One result per target of ``online``, in order, each handed to
        ``on_each`` as it comes: the targets split between the worker (its
        items made results by ``build``) and the in-process scraper; what the
        worker leaves unanswered fails (``fail``)."""
        out: list[R | None] = [None] * len(online)
        pos = {id(t): i for i, t in enumerate(online)}

        def deliver(i: int, r: R) -> None:
            out[i] = r
            if on_each is not None:
                on_each(r)

        requests = await _requests(online, request_for, self.pace())
        here = [i for i, r in enumerate(requests) if r is not None and r.ssl is not None]
        sent = [i for i, r in enumerate(requests) if r is None or r.ssl is None]
        if kind == "stats":
            # The fleet's size decides, from its stats passes: a /clusters
            # pass skips the quiet dataplanes and lists a part of it.
            self._large = len(sent) >= AUTO_WORKER_TARGETS
        if self.cfg.scrape.worker == "auto" and not self._large:
            here, sent = list(range(len(online))), []  # too few to be worth a process
        worker = await self._ensure_worker() if sent else None
        if worker is None:  # none needed, or it could not start: all read here
            here, sent = list(range(len(online))), []
        by_target = {id(online[i]): requests[i] for i in here}
        inline = run_inline([online[i] for i in here], lambda t: by_target[id(t)],
                            lambda t, r: deliver(pos[id(t)], r)) if here else _nothing()
        job = _Job(kind, [online[i] for i in sent],
                   lambda j, item: deliver(sent[j], build(online[sent[j]], item))) \
            if sent else None
        remote = self._run(worker, job, spread,
                           [(online[i], _portable(requests[i])) for i in sent]) \
            if worker is not None and job is not None else _nothing()
        results = await asyncio.gather(inline, remote, return_exceptions=True)
        if job is not None:
            why = _reason(results[1])
            for j in range(len(sent)):
                if j not in job.answered:
                    deliver(sent[j], fail(online[sent[j]], why))
        if isinstance(results[0], BaseException):
            raise results[0]
        return [r for r in out if r is not None]

    async def _run(self, worker: _Worker, job: _Job, spread: float,
                   items: list[tuple[Target, Request | None]]) -> None:
        job_id = next(self._ids)
        # Retrieved here, so a pass given up on (a stop) logs no "exception
        # never retrieved" when its worker goes.
        job.finished.add_done_callback(lambda f: f.cancelled() or f.exception())
        give_way = self.pace()
        # One pass handed over at a time: a /clusters pass (not under the
        # cycle lock) handed over between the pieces of a stats pass's would
        # find ``known`` already updated and name targets the worker has not
        # been told of yet, or lose some a stats pass forgets meanwhile.
        async with worker.handing_over:
            keys, updates = await _changes(worker.known, items, job.kind == "stats", give_way)
            # A new worker is told of every target: in slices, one per piece
            # (10,000 pickled at once held the loop ~35 ms).
            while len(updates) > SLICE:
                worker.writer.write(frames.encode(("known", updates[:SLICE])))
                updates = updates[SLICE:]
                await give_way()
            worker.jobs[job_id] = job
            worker.writer.write(frames.encode((job.kind, job_id, spread, keys, updates)))
        bound = spread + 2 * self.timeout + GRACE
        try:
            await asyncio.wait_for(asyncio.shield(job.finished), bound)
        except TimeoutError:
            worker.jobs.pop(job_id, None)
            log.error("the scrape worker (pid %d) did not finish a pass in %.0fs: "
                      "stopping it; the next pass starts a new one", worker.proc.pid, bound)
            await self._drop(worker)
            raise WorkerGone(f"the scrape worker did not answer within {bound:.0f}s") from None

    async def _ensure_worker(self) -> _Worker | None:
        async with self._starting:
            w = self._worker
            if w is not None and w.gone is None and w.proc.returncode is None:
                return w
            if w is not None:
                log.error("the scrape worker (pid %d) exited (%s, code %s); starting a new one",
                          w.proc.pid, w.gone, w.proc.returncode)
                if self._on_exit is not None:
                    self._on_exit()
                await self._drop(w)
            try:
                self._worker = await self._start()
            except Exception as exc:
                log.error("could not start the scrape worker (%s): this pass is read "
                          "in-process", exc)
                self._worker = None
            return self._worker

    async def _start(self) -> _Worker:
        mine, theirs = socket.socketpair()
        try:
            env = {k: v for k, v in os.environ.items()
                   if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS",
                                "LISTEN_PID", "LISTEN_FDNAMES")}  # systemd talks to the daemon
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "passguard.scrape_worker", str(theirs.fileno()),
                str(os.getpid()), pass_fds=(theirs.fileno(),), env=env,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL)
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        reader, writer = await asyncio.open_connection(sock=mine)
        root = logging.getLogger()
        writer.write(frames.encode(("config", self.cfg.scrape, self.cfg.passthrough_clusters,
                                    self.cfg.outbound_port, root.level, logqueue.current_format)))
        try:
            hello = await asyncio.wait_for(frames.read(reader), START_TIMEOUT)
            if not (isinstance(hello, tuple) and hello[:1] == ("ready",)):
                raise frames.FrameError(f"it said {str(hello)[:80]!r} instead of ready")
        except BaseException:
            writer.close()
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        log.info("scrape worker started (pid %d)", proc.pid)
        return _Worker(proc, reader, writer, self.pace)

    async def _drop(self, worker: _Worker) -> None:
        if self._worker is worker:
            self._worker = None
        with contextlib.suppress(ProcessLookupError):
            worker.proc.kill()
        await worker.stop()

    async def close(self) -> None:
        await self.inline.close()
        if self._worker is not None:
            worker, self._worker = self._worker, None
            await worker.stop()


def scraper_for(cfg: Config, on_exit: Callable[[], None] | None = None,
                pace: Pace = one_turn) -> Scraper | ProcessScraper:
    """The scraper ``scrape.worker`` asks for."""
    return Scraper(cfg) if cfg.scrape.worker == "inline" else ProcessScraper(cfg, on_exit, pace)


async def _requests(online: list[Target], request_for: RequestFor | None,
                    give_way: Callable[[], Awaitable[None]]) -> list[Request | None]:
    """Each target's request, computed here (it reads the sources' state),
    ``give_way()`` every SLICE targets; one that raises fails that target
    only, as in ``Scraper``."""
    out: list[Request | None] = []
    for n, t in enumerate(online):
        if n and not n % SLICE:
            await give_way()
        try:
            out.append(request_for(t) if request_for else None)
        except Exception as exc:
            log_unexpected(f"reading {t.key}", exc)
            out.append(Request("", "", {}, "envoy", None, invalid=internal_error(exc)))
    return out


#: Targets compared per turn of the loop when a pass is handed to the worker.
SLICE = 1000


async def _changes(known: dict[str, tuple[Target, Request | None]],
                   items: list[tuple[Target, Request | None]], full: bool,
                   give_way: Callable[[], Awaitable[None]] = turn
                   ) -> tuple[list[str], list[tuple[str, Target, Request | None]]]:
    """The keys of a pass, and the targets the worker must be told anew;
    ``known`` becomes what the worker will know. A stats pass lists every
    target, so what it leaves out is forgotten on both sides (the worker
    does the same on its side, in the same order)."""
    keys: list[str] = []
    updates: list[tuple[str, Target, Request | None]] = []
    for n, (t, req) in enumerate(items):
        if n and not n % SLICE:
            await give_way()
        key = t.key
        keys.append(key)
        was = known.get(key)
        if was is None or was[0] is not t or was[1] != req:
            updates.append((key, t, req))
    if full:
        kept = set(keys)
        for key in [k for k in known if k not in kept]:
            del known[key]
    for key, t, req in updates:
        known[key] = (t, req)
    return keys, updates


def _portable(req: Request | None) -> Request | None:
    """A request as it crosses to the worker: its headers a plain dict."""
    return None if req is None else replace(req, headers=dict(req.headers))


def _reason(outcome: object) -> str:
    if isinstance(outcome, WorkerGone):
        return f"not read: {outcome}"
    if isinstance(outcome, BaseException):
        return f"not read: the scrape worker failed ({type(outcome).__name__})"
    return "not read: the scrape worker ended the pass without this target"


async def _nothing() -> None:
    return None


__all__ = ["GRACE", "ProcessScraper", "WorkerGone", "scraper_for"]
