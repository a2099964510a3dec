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
import logging
import signal
import time
from dataclasses import replace
from pathlib import Path

from aiohttp import web
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from passguard import config as config_mod
from passguard.audit import AuditLog
from passguard.config import Config
from passguard.errors import ConfigError
from passguard.metrics import Metrics
from passguard.scraper import Scraper
from passguard.sdnotify import Notifier
from passguard.sources.static import StaticSource
from passguard.store.persistence import StateDB
from passguard.store.store import Store
from passguard.targets import Target
from passguard.web.auth import TokenStore
from passguard.web.routes import build_app
from passguard.web.tls import CertReloader

log = logging.getLogger(__name__)
JOB_ID = "scrape"


class Daemon:
    def __init__(self, config: Config, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.db = StateDB(config.state_path)
        self.audit = AuditLog(config.state_path)
        self.tokens = TokenStore(config.auth.tokens_file) if config.auth.tokens_file else None
        self.tls = CertReloader(config.auth.tls) if config.auth.tls else None
        self._background: list[asyncio.Task[None]] = []
        self.store = Store(config.window, config.stale_after, self.db)
        self.scraper = Scraper(config)
        self.sources = [StaticSource(s) for s in config.sources]
        self.metrics = Metrics(lambda: self.store.snapshot)
        self.notifier = Notifier.from_env()
        self.scheduler: AsyncIOScheduler | None = None
        self.runner: web.AppRunner | None = None
        self.stopping = asyncio.Event()
        self._cycle_lock = asyncio.Lock()
        self._reload_lock = asyncio.Lock()
        self._announced_ready = False

    # -- scraping -------------------------------------------------------------

    def targets(self) -> list[Target]:
        out: dict[str, Target] = {}
        for src in self.sources:
            for t in src.targets():
                if t.key in out and out[t.key].url != t.url:
                    log.warning("dataplane %s is listed twice (%s and %s); keeping the first",
                                t.key, out[t.key].url, t.url)
                    continue
                out.setdefault(t.key, t)
        return list(out.values())

    async def cycle(self) -> None:
        """One scrape of every target; the snapshot is replaced when it is done."""
        async with self._cycle_lock:
            start = time.monotonic()
            self.store.set_targets(self.targets())
            results = await self.scraper.cycle(list(self.store.targets.values()))
            updates = self.store.record(results)
            now = time.time()
            try:
                await self.store.persist(updates, now)
            except Exception as exc:
                # The evidence stays in memory and the gate keeps answering;
                # the failure is counted and logged for the operator.
                self.metrics.persist_failures.inc()
                log.error("could not write state to %s: %s", self.config.state_path, exc)
            self.store.build_snapshot(now)
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

    def _schedule(self) -> None:
        assert self.scheduler is not None
        self.scheduler.add_job(
            self.cycle, "interval", seconds=self.config.scrape.interval, id=JOB_ID,
            replace_existing=True, max_instances=1, coalesce=True,
            # A cycle that cannot start on time is skipped, not queued: the next
            # one reads the same cumulative counters.
            misfire_grace_time=max(1, int(self.config.scrape.interval)),
            next_run_time=_now_for_scheduler(),
        )

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
                # A tokens file that does not parse refuses the whole reload.
                tokens = TokenStore(new.auth.tokens_file) if new.auth.tokens_file else None
            except ConfigError as exc:
                self.metrics.reloads.labels("failure").inc()
                log.error("reload refused, keeping the running configuration: %s", exc)
                if announce:
                    self.notifier.ready()
                return str(exc)
            await self._apply(new)
            self.tokens = tokens
            self.metrics.reloads.labels("success").inc()
            log.info("configuration reloaded from %s", self.config_path)
            if announce:
                self.notifier.ready()
            return None

    async def _apply(self, new: Config) -> None:
        old = self.config
        if new.listen != old.listen:
            log.warning("listen changed from %s to %s: takes effect after a restart",
                        old.listen, new.listen)
            new = replace(new, listen=old.listen)
        if new.state_path != old.state_path:
            log.warning("state.path changed: takes effect after a restart")
            new = replace(new, state_path=old.state_path)
        async with self._cycle_lock:
            if (new.scrape, new.passthrough_clusters) != (old.scrape, old.passthrough_clusters):
                await self.scraper.close()
                self.scraper = Scraper(new)
            self.sources = [StaticSource(s) for s in new.sources]
            self.store.window = new.window
            self.store.stale_after = new.stale_after
            self.config = new
            if self.runner is not None:
                for app in (self.runner.app,):
                    app._client_max_size = new.limits.max_body_bytes
        if self.scheduler is not None and new.scrape.interval != old.scrape.interval:
            self._schedule()

    # -- lifecycle ----------------------------------------------------------------

    async def start(self, schedule: bool = True) -> None:
        """Restore, listen, and (unless a test drives cycles itself) start scraping."""
        restored = await asyncio.to_thread(self.store.restore)
        if restored:
            self.store.set_targets(self.targets())
            self.store.build_snapshot(time.time())
            log.info("restored evidence of %d dataplanes from %s", restored,
                     self.config.state_path)
        self.runner = web.AppRunner(build_app(self), access_log=None, handle_signals=False)
        await self.runner.setup()
        listen = self.config.listen
        site = web.TCPSite(self.runner, listen.host, listen.port, reuse_address=True,
                           ssl_context=self.tls.context if self.tls else None)
        await site.start()
        if listen.port == 0:  # tests ask for any free port: record the real one
            server = site._server
            sockets = getattr(server, "sockets", None) or []
            if sockets:
                self.config = replace(self.config, listen=replace(
                    listen, port=sockets[0].getsockname()[1]))
        log.info("listening on %s%s", "https://" if self.tls else "http://", self.config.listen)
        if self.tls is not None:
            self._background.append(asyncio.create_task(self.tls.run(self.stopping)))
        self._background.append(asyncio.create_task(self._audit_retention()))
        if schedule:
            self.scheduler = AsyncIOScheduler()
            self._schedule()
            self.scheduler.start()
        self._maybe_ready()

    async def _audit_retention(self) -> None:
        """Drop audit entries older than ``audit.retention``, hourly."""
        while not self.stopping.is_set():
            try:
                removed = await asyncio.to_thread(
                    self.audit.prune, time.time() - self.config.audit.retention)
                if removed:
                    log.info("audit: %d entries older than the retention removed", removed)
            except Exception as exc:
                log.error("audit retention failed: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), 3600)

    async def stop(self) -> None:
        self.notifier.stopping()
        self.stopping.set()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
            self.scheduler = None
        # Let a cycle in flight finish its database write: nothing half-recorded.
        async with self._cycle_lock:
            await self.scraper.close()
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        await asyncio.to_thread(self.db.close)
        await asyncio.to_thread(self.audit.close)
        log.info("stopped")

    async def watchdog(self) -> None:
        interval = self.notifier.watchdog_interval()
        if not interval:
            return
        while not self.stopping.is_set():
            self.notifier.watchdog()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), interval)

    async def run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        await self.start()
        dog = asyncio.create_task(self.watchdog())
        try:
            await self.stopping.wait()
        finally:
            log.info("stopping")
            await self.stop()
            await dog


def _now_for_scheduler() -> object:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc)  # noqa: UP017 - APScheduler 3 wants a tz-aware datetime


def run(config_path: Path) -> int:
    config = config_mod.load(config_path)
    daemon = Daemon(config, config_path)
    asyncio.run(daemon.run_forever())
    return 0
