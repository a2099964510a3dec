"""The daemon: one poller that owns all I/O, one web server that reads snapshots.

Lifecycle: restore the persisted window → listen → scrape every
``scrape.interval`` (APScheduler job that never overlaps itself) → on SIGHUP or
``POST /-/reload`` re-read the config (a bad one is refused, the old one keeps
running) → on SIGTERM/SIGINT stop the scheduler, let the running cycle finish
its write, close the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiohttp import web
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from passguard import config as config_mod
from passguard.config import Config
from passguard.errors import ConfigError, PassguardError
from passguard.foreground import Foreground
from passguard.gate import service
from passguard.heap import Freezer
from passguard.metrics import Metrics
from passguard.pacing import AUTO_CLUSTERS_RATE, AUTO_SCRAPE_RATE, spread_for
from passguard.policy.model import MeshState
from passguard.scrape_process import scraper_for
from passguard.scraper import ClustersRead
from passguard.sdnotify import Notifier
from passguard.sources.sourceset import SourceSet
from passguard.startup import fd_budget_warning, now_for_scheduler, open_shadows, open_state
from passguard.store.destinations import Destination
from passguard.store.snapshot import Snapshot
from passguard.store.store import Store
from passguard.targets import Target
from passguard.web import tls as tls_mod
from passguard.web.auth import TokenStore
from passguard.web.connections import ConnectionCap
from passguard.web.listener import Listener
from passguard.web.routes import build_app, probe_answer
from passguard.web.tls import CertReloader

log = logging.getLogger(__name__)
JOB_ID = "scrape"
#: How long another thread may hold the GIL before the event loop can take it
#: back (Python's default: 5 ms). The database writes run in threads; each
#: time the loop makes a system call (every request makes several) such a
#: thread may take the GIL, and with 5 ms per hand-back a request waited tens
#: of milliseconds behind a cycle's write (the GIL "convoy": under load, 538
#: requests over 10 ms in 30 s with the default, 345 with 0.5 ms).
SWITCH_INTERVAL = 0.0005
#: A TLS handshake not done by then is aborted (asyncio's default is 60 s): a
#: client that stalls in it holds a connection of the cap for this long at most.
TLS_HANDSHAKE_TIMEOUT = 10.0
#: How often audit entries past ``audit.retention`` or ``audit.max_bytes`` are deleted.
AUDIT_RETENTION_EVERY = 60.0
#: listen() backlog, and how many connections are accepted in one go. The
#: kernel holds the backlog: it costs no descriptor, and a refused connection
#: is closed before the next is accepted (passguard/web/listener.py).
LISTEN_BACKLOG = 100


class Daemon:
    def __init__(self, config: Config, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        # What is opened is closed in the reverse order, by stop(): one stack.
        self._stack = contextlib.AsyncExitStack()
        self.db, self.audit = open_state(config.state_path)
        self._stack.push_async_callback(asyncio.to_thread, self.db.close)
        self._stack.push_async_callback(asyncio.to_thread, self.audit.close)
        self.tokens = TokenStore(config.auth.tokens_file) if config.auth.tokens_file else None
        # As the file says it: config.listen becomes the bound port when it is 0,
        # and a reload is compared with the file, not with that.
        self._file_listen = config.listen
        self._reloads: set[asyncio.Future[str | None]] = set()
        self.store = Store(config.window, config.stale_after, self.db)
        self.sources = SourceSet(config)
        self.foreground = Foreground()  # requests in flight, for bulk work to give way
        self.metrics = Metrics(lambda: self.store.snapshot,
                               lambda: [*self.sources.sources, *self.sources.prometheus],
                               self.foreground.pace)
        self.scraper = scraper_for(config, self.metrics.worker_exits.inc, self.foreground.pace)
        # Each dataplane's /metrics lines are written as its evidence is.
        self.store.on_evidence = self.metrics.snapshot.lines.warm
        self.store.write_pacer = self.foreground.pace_thread
        self.shadows = open_shadows(config.state_path, self.db, self.audit)
        self._stack.push_async_callback(asyncio.to_thread, self.shadows.close)
        # Closers look the methods up at stop time, not now.
        self._stack.push_async_callback(lambda: self._close_sources())
        self.metrics.registry.register(self.shadows.collector(
            lambda: {t.mesh for t in self.store.targets.values()}, lambda: self.config.window))
        self.tls = CertReloader(config.auth.tls, self._use_tls,
                                lambda ok: self.metrics.tls_reloads.labels(
                                    "success" if ok else "failure").inc()) \
            if config.auth.tls else None
        self.notifier = Notifier.from_env()
        self.scheduler: AsyncIOScheduler | None = None
        self._scraping = False  # scrape, destinations and discovery jobs too
        self.runner: web.AppRunner | None = None
        self._listener: Listener | None = None
        self.connections: ConnectionCap | None = None
        self.stopping = asyncio.Event()
        self._cycle_lock = asyncio.Lock()
        self.heap = Freezer()
        self._reload_lock = asyncio.Lock()
        self._announced_ready = False

    # -- scraping -------------------------------------------------------------

    def _refresh_targets(self) -> None:
        self.store.set_targets(self.sources.targets(), drop_missing=self.sources.complete())

    async def _refresh_targets_paced(self) -> None:
        """``_refresh_targets`` as pieces of one turn each (10,000: 5 ms to list, 6 to set)."""
        await asyncio.sleep(0)
        listed, complete = self.sources.targets(), self.sources.complete()
        await asyncio.sleep(0)
        self.store.set_targets(listed, drop_missing=complete)
        await asyncio.sleep(0)

    async def cycle(self) -> None:
        """One scrape of every target; the snapshot is replaced when it is done."""
        async with self._cycle_lock:
            start = time.monotonic()
            await self._refresh_targets_paced()
            targets = list(self.store.targets.values())
            scrape = self.config.scrape
            spread = spread_for(len(targets), scrape.spread, scrape.interval, scrape.timeout,
                                AUTO_SCRAPE_RATE)
            results, extra = await asyncio.gather(
                self.scraper.cycle(targets, self.sources.request_for, spread,
                                   self.store.record_one),
                self.sources.collect(time.time()))
            self.store.finish_cycle()
            now = time.time()
            try:
                await self.store.persist(now)
            except Exception as exc:  # kept in memory, the gate answers; counted, logged
                self.metrics.persist_failures.inc()
                log.error("could not write state to %s: %s", self.config.state_path, exc)
            # Evidence was computed as results came in: this only assembles it.
            await self.store.publish(
                await self.store.assemble_paced(now, extra, self.foreground.pace()),
                self._prepare)
            self.heap.after_cycle()
            self.metrics.cycle_seconds.set(time.monotonic() - start)
            failed = sum(1 for r in results if r.error)
            log.debug("cycle: %d targets, %d failed, %.3fs", len(results), failed,
                      time.monotonic() - start)
            self._maybe_ready()

    def _maybe_ready(self) -> None:
        if not self._announced_ready and self.store.snapshot.ready and self.runner is not None:
            self._announced_ready = True
            self.notifier.ready()
            log.info("ready")

    async def destinations_cycle(self) -> None:
        """Read every target's ``/clusters``: the inventory of external destinations.
        A dataplane whose /stats show no passthrough connection since its last
        read is skipped (Store.quiet_since_clusters_read): most are idle."""
        targets, skipped = await self.store.clusters_due(self.foreground.pace())
        self.metrics.clusters_skipped.set(skipped)
        dests = self.config.destinations
        spread = spread_for(len(targets), dests.spread, dests.interval,
                            self.config.scrape.timeout, AUTO_CLUSTERS_RATE)
        marks: dict[str, tuple[float, tuple[int, int]] | None] = {}
        changed: list[tuple[str, Destination]] = []

        def started(t: Target) -> None:
            marks[t.key] = self.store.clusters_mark(t.key)

        def done(read: ClustersRead) -> None:
            # Recorded as each read ends, like the scrapes (its views computed then).
            t, at, found, err = read
            if found is not None:
                changed.extend(self.store.record_destinations([(t, at, found)]))
            else:
                log.debug("destinations of %s: %s", t.key, err)
            self.store.set_clusters_mark(t.key, marks.get(t.key) if found is not None else None)

        await self.scraper.clusters_pass(targets, self.sources.request_for, spread, started, done)
        # Writing the changes and replacing the snapshot waits for a running
        # cycle, which would otherwise publish its older views after this.
        async with self._cycle_lock:
            now = time.time()
            try:
                await self.store.persist_destinations(changed, now)
            except Exception as exc:
                self.metrics.persist_failures.inc()
                log.error("could not write destinations to %s: %s", self.config.state_path, exc)
            await self._evaluate_shadows(now)
            await self.store.publish(self.store.snapshot.with_destinations(
                self.store.views(now)), self._prepare)

    async def _evaluate_shadows(self, now: float) -> None:
        """After the destinations are written (a crash in between evaluates
        the same increments again, never counts one twice): see passguard/shadows.py."""
        try:
            await self.shadows.evaluate(self.store.book.all(), self.store.targets.values(),
                                        self.mesh_states(), now)
        except Exception as exc:
            self.metrics.persist_failures.inc()
            log.error("could not evaluate shadows into %s: %s", self.config.state_path, exc)

    async def _prepare(self, snap: Snapshot) -> None:
        # The snapshot being replaced says what the gate is being asked.
        await service.prepare_all(snap, self.sources.mesh_states(), self.foreground.pace(),
                                  self.store.snapshot)

    def mesh_states(self) -> dict[str, MeshState]:
        """The control planes' current policy sets, per mesh (the gate's "before")."""
        return self.sources.mesh_states()

    def _job(self, func: Callable[[], Any], every: float, job_id: str,
             first: object | None = None) -> None:
        """Every periodic duty is a job of the one scheduler, with one rule: never
        two runs of a job at once, and a run that cannot start on time is
        skipped, not queued (each duty reads or writes state that the next run
        reads again)."""
        assert self.scheduler is not None
        self.scheduler.add_job(func, "interval", seconds=every, id=job_id,
                               replace_existing=True, max_instances=1, coalesce=True,
                               misfire_grace_time=max(1, int(every)),
                               **({"next_run_time": first} if first is not None else {}))

    def _schedule(self) -> None:
        """(Re)declare the jobs the config asks for; a reload calls it again."""
        assert self.scheduler is not None
        for job in self.scheduler.get_jobs():
            if job.id.startswith("discovery-"):
                job.remove()  # the sources were replaced: their jobs go with them
        self._job(self._audit_retention, AUDIT_RETENTION_EVERY, "audit-retention",
                  now_for_scheduler())
        if self.tls is not None:
            self._job(self._tls_reload, self.tls.cfg.reload_interval, "tls-reload")
        if self._scraping:
            self._job(self.cycle, self.config.scrape.interval, JOB_ID, now_for_scheduler())
            self._job(self.destinations_cycle, self.config.destinations.interval,
                      "destinations")
            # start() discovered once already: the next pass after an interval.
            for i, src in enumerate(self.sources.kuma):
                self._job(src.discover, src.cfg.discovery_interval, f"discovery-{i}")

    def own_the_process(self) -> None:
        """What `passguard run` and the benchmark's driver set once started (not
        start(): tests run many daemons per process): the heap frozen and the
        collector's full passes left to the hourly thaw (passguard.heap), the
        GIL interval."""
        self.heap.take_over()
        sys.setswitchinterval(SWITCH_INTERVAL)

    async def _tls_reload(self) -> None:
        """Re-read the certificate files when they changed (auth.tls.reload_interval)."""
        if self.tls is not None:
            self.tls.settle(await asyncio.to_thread(self.tls.poll))

    # -- reload -----------------------------------------------------------------

    async def reload(self) -> str | None:
        """Re-read the config file; return the error when it is refused."""
        async with self._reload_lock:
            # Before the first READY=1, a reload must not announce readiness.
            announce = self._announced_ready
            if announce:
                self.notifier.reloading()
            try:
                if self.config_path is None:
                    raise ConfigError(["no config file to reload (started without -c)"])
                new = config_mod.load(self.config_path)
                problems = config_mod.restart_changes(
                    replace(self.config, listen=self._file_listen), new)
                if (problem := self._bound_auth_error(new)) is not None:
                    problems.append(problem)
                if problems:
                    raise ConfigError(problems)
                # A tokens file that does not parse refuses the whole reload.
                tokens = TokenStore(new.auth.tokens_file) if new.auth.tokens_file else None
                # New certificate settings must serve (a test handshake) before
                # anything is applied; unchanged ones are left to the timer.
                loaded = None
                if self.tls is not None and new.auth.tls is not None \
                        and new.auth.tls != self.tls.cfg:
                    loaded = await asyncio.to_thread(tls_mod.load, new.auth.tls)
            except ConfigError as exc:
                self.metrics.reloads.labels("failure").inc()
                log.error("reload refused, keeping the running configuration: %s", exc)
                if announce:
                    self.notifier.ready()
                return str(exc)
            old_log_format = self.config.log_format
            await self._apply(new)
            self.tokens = tokens
            if self.tls is not None:
                if loaded is not None:
                    self.tls.use(loaded)
                else:
                    # A reload is when an operator expects rotated files to be
                    # read; a broken pair is the timer's failure, not the config's.
                    self.tls.settle(await asyncio.to_thread(self.tls.poll))
            self.metrics.reloads.labels("success").inc()
            log.info("configuration reloaded from %s", self.config_path)
            if new.log_format != old_log_format:
                log.warning("log.format changed to %s: it applies at the next restart",
                            new.log_format)
            if announce:
                self.notifier.ready()
            return None

    def bound(self) -> list[tuple[str, int]]:
        """The addresses the listening sockets hold (empty before start)."""
        if self._listener is None:
            return []
        return [(str(a[0]), int(a[1])) for a in
                (sock.getsockname() for sock in self._listener.sockets)]

    def _bound_auth_error(self, new: Config) -> str | None:
        """The auth rule, for ``new``'s auth, against the sockets actually
        bound: a reload does not move them, so the file's address proves nothing."""
        bound = self.bound()
        if not bound:
            listen = self.config.listen
            problem = config_mod.auth_rule_error(str(listen), listen.is_loopback, new.auth)
        else:
            loopback = all(ipaddress.ip_address(host).is_loopback for host, _ in bound)
            where = ", ".join(str(config_mod.Listen(host, port)) for host, port in bound)
            problem = config_mod.auth_rule_error(where, loopback, new.auth)
        return None if problem is None else f"auth: the running socket {problem}"

    def _use_tls(self, context: ssl.SSLContext) -> None:
        if self._listener is not None:
            self._listener.set_tls(context)

    async def _apply(self, new: Config) -> None:
        old = self.config
        # restart_changes() refused any other listen; this keeps the bound port.
        new = replace(new, listen=old.listen)
        async with self._cycle_lock:
            if (new.scrape, new.passthrough_clusters) != (old.scrape, old.passthrough_clusters):
                await self.scraper.close()
                self.scraper = scraper_for(new, self.metrics.worker_exits.inc,
                                           self.foreground.pace)
            old_sources = self.sources
            self.sources = SourceSet(new)
            self.sources.inherit(old_sources)
            self.store.configure(new.window, new.stale_after)
            self.config = new
            # Readers see the new window and targets at once, not a cycle later
            # (READY=1 follows this, so it must describe the new config).
            self._refresh_targets()
            self.store.build_snapshot(time.time())
            if self.connections is not None:
                self.connections.resize(new.limits.max_connections,
                                        new.limits.first_byte_timeout)
        await old_sources.close()
        if self.scheduler is not None:
            self._schedule()

    # -- lifecycle ----------------------------------------------------------------

    async def start(self, schedule: bool = True) -> None:
        """Restore, listen, and (unless a test drives cycles itself) start scraping."""
        # Discover first: the restored evidence of CP-discovered dataplanes
        # must find its targets (each pass is bounded by its own timeout).
        await self.sources.discover()
        restored = await asyncio.to_thread(self.store.restore)
        await asyncio.to_thread(self.shadows.restore)
        if restored:
            self._refresh_targets()
            self.store.build_snapshot(time.time())
            log.info("restored evidence of %d dataplanes from %s", restored,
                     self.config.state_path)
        # keepalive_timeout also bounds a client that never finishes its headers
        # (aiohttp starts it at connect): no slowloris holds a socket for an hour.
        self.runner = web.AppRunner(build_app(self), access_log=None, handle_signals=False,
                                    keepalive_timeout=self.config.limits.keepalive_timeout)
        await self.runner.setup()
        listen = self.config.listen
        # Our own listener instead of a web.TCPSite: the connection cap is
        # applied at accept (aiohttp has none).
        assert self.runner.server is not None
        self.connections = ConnectionCap(
            self.runner.server, self.config.limits.max_connections,
            self.metrics.connections_refused.inc,
            first_byte_timeout=self.config.limits.first_byte_timeout,
            probe=lambda path: probe_answer(self, path),
            on_silent=self.metrics.connections_silent.inc)
        self._stack.push_async_callback(lambda: self._close_web())
        self._listener = await Listener.open(
            self.connections, listen.host, listen.port, backlog=LISTEN_BACKLOG,
            tls=self.tls.context if self.tls else None,
            tls_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
        if listen.port == 0:  # tests ask for any free port: record the real one
            self.config = replace(self.config, listen=replace(
                listen, port=self._listener.sockets[0].getsockname()[1]))
        # The file's check saw a name; this sees what it resolved to.
        if (problem := self._bound_auth_error(self.config)) is not None:
            raise PassguardError(problem)
        log.info("listening on %s%s", "https://" if self.tls else "http://", self.config.listen)
        if (warning := fd_budget_warning(self.config)) is not None:
            log.warning("%s", warning)
        # One scheduler runs every periodic duty (tests that drive cycles
        # themselves get the housekeeping jobs only).
        self._scraping = schedule
        self.scheduler = AsyncIOScheduler()
        self._schedule()
        self.scheduler.start()
        self._stack.push_async_callback(lambda: self._stop_scheduler())
        self._maybe_ready()

    async def _audit_retention(self) -> None:
        """Drop audit entries older than ``audit.retention``, every minute: a
        minute's entries at a time go in a few short transactions
        (``AuditLog.prune``), where an hour's took seconds under load."""
        if not self.stopping.is_set():
            try:
                await asyncio.to_thread(self.audit.enforce, self.config.audit.retention,
                                        self.config.audit.max_bytes, self._audit_pruned)
            except Exception as exc:
                log.error("audit retention failed: %s", exc)

    def _audit_pruned(self, reason: str, removed: int) -> None:
        """Counted as each step of ``AuditLog.enforce`` ends: a later one may fail."""
        self.metrics.audit_pruned.labels(reason).inc(removed)
        if removed and reason == "age":
            log.info("audit: %d entries older than the retention removed", removed)
        elif removed:
            log.warning("audit: %d oldest entries removed to stay within audit.max_bytes "
                        "(%d bytes)", removed, self.config.audit.max_bytes)

    async def stop(self) -> None:
        """Everything start (and __init__) opened, closed in the reverse order."""
        self.notifier.stopping()
        self.stopping.set()
        await self._stack.aclose()
        log.info("stopped")

    async def _stop_scheduler(self) -> None:
        # Let a cycle in flight finish (its database write included: nothing
        # half-recorded) before the scheduler goes; shutting the scheduler down
        # first cancelled the cycle, with an ERROR in the log at every stop.
        async with self._cycle_lock:
            if self.scheduler is not None:
                self.scheduler.shutdown(wait=False)
                self.scheduler = None

    async def _close_web(self) -> None:
        if self._listener is not None:
            self._listener.close()  # no new connections; cleanup() ends the open ones
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        if self._listener is not None:
            await self._listener.wait_closed()
            self._listener = None

    async def _close_sources(self) -> None:
        # The current ones: a reload replaces both.
        await self.scraper.close()
        await self.sources.close()

    def _reload_in_background(self) -> None:
        # Keep a reference: a task nobody holds may be collected mid-run.
        task = asyncio.ensure_future(self.reload())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload_in_background)
        try:
            await self.start()
        except BaseException:
            # e.g. the listen address is taken: close what was opened (the
            # databases among it) and let the CLI name the problem.
            await self.stop()
            raise
        self.own_the_process()
        if interval := self.notifier.watchdog_interval():
            # A job like every duty: a stuck event loop stops the pings too.
            self._job(self.notifier.watchdog, interval, "watchdog")
        try:
            await self.stopping.wait()
        finally:
            log.info("stopping")
            await self.stop()

