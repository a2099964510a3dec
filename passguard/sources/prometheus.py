"""Source ``prometheus``: passthrough evidence read from PromQL instead of scraping.

For installations where something else (passguard agents, or Prometheus
scraping kuma-dp / Envoy) already collects the proxies' stats. ``collect(now)``
is one round of three aggregated instant queries (``promql``), decoded by
``promwire`` and turned into one ``DataplaneEvidence`` per dataplane by
``promevidence``. Invariant: never raises on Prometheus problems: the last
round's dataplanes come back ``failed`` (unknown to the gate). Details, limits
and costs: docs/sources.md.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Mapping

import aiohttp

from passguard.envoy.names import DEFAULT_CLUSTERS_PATTERN, DEFAULT_OUTBOUND_PORT
from passguard.httpclient import (
    ClientTLS,
    HttpProblem,
    auth_headers,
    exchange,
    http_problem,
    read_bounded,
)
from passguard.sources.promevidence import RoundResult, build_evidence
from passguard.sources.promql import build_queries, duration
from passguard.sources.promwire import PrometheusError, Sample, decode_vector
from passguard.sources.settings import PrometheusSourceConfig, check_config
from passguard.store.snapshot import DataplaneEvidence

log = logging.getLogger(__name__)


class PrometheusSource:
    """Evidence from one Prometheus-compatible API.  ``collect(now)`` is one round
    (never raises on Prometheus problems); ``close()`` releases the HTTP session."""

    def __init__(self, cfg: PrometheusSourceConfig, window: float, stale_after: float, *,
                 clusters_pattern: str = DEFAULT_CLUSTERS_PATTERN,
                 outbound_port: int = DEFAULT_OUTBOUND_PORT) -> None:
        problems = check_config(cfg)
        if problems:
            raise ValueError("; ".join(f"{k}: {m}" for k, m in problems))
        self.cfg = cfg
        self.base = cfg.url.rstrip("/")
        self.window = window
        # A dataplane is stale after three of *that Prometheus's* scrape
        # intervals, and never sooner than passguard's own threshold.
        self.threshold = max(stale_after, 3 * cfg.scrape_interval)
        self.queries = build_queries(cfg, window, self.threshold, clusters_pattern,
                                     outbound_port)
        self.last_error: str | None = None
        self.last_success: float | None = None  # wall time of the last complete round
        self.last_attempt: float | None = None
        self.last_duration: float | None = None
        self.consecutive_failures = 0
        self.warnings: list[str] = []
        self._last: dict[str, DataplaneEvidence] = {}
        self._session: aiohttp.ClientSession | None = None
        self._tls = ClientTLS(cfg.ca_file, cfg.insecure_skip_verify)
        self._ssl: ssl.SSLContext | bool = True  # True: the system's roots
        self._lock = asyncio.Lock()

    @property
    def query_url(self) -> str:
        return f"{self.base}/api/v1/query"

    async def collect(self, now: float) -> list[DataplaneEvidence]:
        """One round: the evidence of every dataplane Prometheus knows in the window.

        On any Prometheus problem, the dataplanes of the last good round come back
        ``failed`` with the error (unknown to the gate) and ``last_error`` is set."""
        async with self._lock:
            self.last_attempt = now
            start = time.monotonic()
            try:
                result = await self._round(now)
            except PrometheusError as exc:
                return self._failed(now, str(exc))
            except Exception as exc:  # a bug must not take the daemon down
                log.exception("Prometheus source %s failed unexpectedly", self.base)
                return self._failed(now, f"internal error: {type(exc).__name__}: {exc}")
            finally:
                self.last_duration = time.monotonic() - start
            if self.last_error is not None:
                log.info("Prometheus %s answers again", self.base)
            self.last_error = None
            self.consecutive_failures = 0
            self.last_success = now
            self.warnings = result.warnings
            for w in result.warnings:
                log.warning("Prometheus %s: %s", self.base, w)
            self._last = {e.target.key: e for e in result.evidence}
            return result.evidence

    def _failed(self, now: float, message: str) -> list[DataplaneEvidence]:
        if message != self.last_error:
            log.warning("Prometheus %s: %s (its %d dataplanes are unknown)", self.base, message,
                        len(self._last))
        self.last_error = message
        self.consecutive_failures += 1
        out = []
        for e in self._last.values():
            if e.state == "offline":
                out.append(e)
                continue
            out.append(DataplaneEvidence(
                target=e.target, state="failed", covered=False, gap_reason=None, window={},
                active_connections=0,
                latest={f: c._replace(cx_active=0) for f, c in e.latest.items()},
                uptime=e.uptime, last_success=e.last_success, last_attempt=now,
                error=f"Prometheus: {message}", scrape_duration=None))
        return out

    async def _round(self, now: float) -> RoundResult:
        try:
            headers = {"Accept": "application/json", **dict(self.cfg.headers),
                       **auth_headers(self.cfg.token_file, self.cfg.username,
                                      self.cfg.password_file)}
            self._ssl = self._tls.context() if self.base.startswith("https:") else True
        except HttpProblem as exc:
            raise PrometheusError(str(exc)) from None
        q = self.queries
        try:
            # Concurrently; the first failure cancels the other two.
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._query(expr, now, headers, what))
                         for expr, what in ((q.window, "window query"),
                                            (q.latest, "latest query"),
                                            (q.facts, "facts query"))]
        except ExceptionGroup as eg:
            raise eg.exceptions[0] from None
        window_rows, latest_rows, fact_rows = (t.result() for t in tasks)
        return await asyncio.to_thread(
            build_evidence, self.cfg, window_rows, latest_rows, fact_rows, now=now,
            window=self.window, threshold=self.threshold)

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # trust_env=False: an HTTP(S)_PROXY meant for the internet must not
            # receive the Prometheus credentials.
            self._session = aiohttp.ClientSession(
                # force_close: three requests a round; a pooled connection
                # Prometheus has since dropped would report a confusing error.
                connector=aiohttp.TCPConnector(limit=8, force_close=True), trust_env=False)
        return self._session

    async def _query(self, expr: str, now: float, headers: Mapping[str, str],
                     what: str) -> list[Sample]:
        form = {"query": expr, "time": f"{now:.3f}",
                "timeout": duration(self.cfg.timeout)}
        where = f"POST {self.query_url} ({what})"
        try:
            async with exchange(self._http(), "POST", self.query_url,
                                timeout=self.cfg.timeout, grace=1, origin=self.base, what=where,
                                data=form, headers=headers, ssl=self._ssl) as resp:
                body = await read_bounded(resp, self.cfg.max_response_bytes,
                                          f"{where}: Prometheus", "max_response_bytes")
                status = resp.status
        except HttpProblem as exc:
            raise PrometheusError(str(exc)) from None
        if status == 404:
            raise PrometheusError(
                f"{where}: HTTP 404: no Prometheus query API there; url must be the API base "
                "(with the path prefix for Mimir/Thanos, e.g. http://mimir/prometheus)")
        if status != 200:
            hint = None
            if status == 401:
                hint = ("the token from token_file was refused" if self.cfg.token_file else
                        "the basic auth credentials were refused" if self.cfg.username else
                        "it wants credentials: set token_file, or username and password_file")
            raise PrometheusError(await asyncio.to_thread(http_problem, where, status, body,
                                                          None, hint))
        # Megabytes for a big mesh: decoded off the event loop (the gate's
        # HTTP server shares it).
        return await asyncio.to_thread(decode_vector, body, where)

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()



__all__ = [
    "PrometheusError",
    "PrometheusSource",
    "PrometheusSourceConfig",
    "build_evidence",
]
