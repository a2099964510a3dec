"""Prometheus exposition: passguard's own counters, plus the latest snapshot.

Nothing here does I/O: a scrape of passguard never waits on a proxy, a lock or
the database. The per-dataplane series come from ``passguard.exposition``
(rendered once per snapshot, off the critical path of gate requests); the
rest is a prometheus_client registry with custom collectors that read the
sources' last-pass attributes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.openmetrics.exposition import UNDERSCORES
from prometheus_client.registry import Collector

from passguard import __version__
from passguard.exposition import Format, SnapshotExposition
from passguard.pacing import Pace
from passguard.sources.kuma import KumaSource
from passguard.sources.prometheus import PrometheusSource
from passguard.store.snapshot import Snapshot

# `_created` series double the exposition for no use here (the counters that
# matter come from Envoy, with their own reset semantics).
disable_created_metrics()  # type: ignore[no-untyped-call]


class DiscoveryCollector(Collector):
    """Health of each control plane (source ``kuma``): read from the sources'
    last-pass attributes, no I/O."""

    def __init__(self, sources: Callable[[], Sequence[object]]) -> None:
        self._sources = sources

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("passguard_kuma_discovery_up",
                               "1 if the last discovery pass from this control plane succeeded",
                               labels=["url"])
        last = GaugeMetricFamily("passguard_kuma_last_successful_discovery_timestamp_seconds",
                                 "Unix time of the last complete discovery pass", labels=["url"])
        prom_up = GaugeMetricFamily("passguard_prometheus_source_up",
                                    "1 if the last round of queries to this Prometheus succeeded",
                                    labels=["url"])
        for src in self._sources():
            if isinstance(src, KumaSource):
                fam = up
                last_ok = src.last_success
                if last_ok is not None:
                    last.add_metric([src.cfg.url], last_ok)
            elif isinstance(src, PrometheusSource):
                fam = prom_up
            else:
                continue
            ok = src.last_error is None and src.last_success is not None
            fam.add_metric([src.cfg.url], 1.0 if ok else 0.0)
        yield up
        yield last
        yield prom_up


class Metrics:
    """The daemon's own registry (never the global one: tests run several daemons)."""

    def __init__(self, snapshot: Callable[[], Snapshot],
                 sources: Callable[[], Sequence[object]] = list,
                 pace: Pace | None = None) -> None:
        self.snapshot = SnapshotExposition(snapshot, *(() if pace is None else (pace,)))
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(DiscoveryCollector(sources))
        self.decisions = Counter("passguard_gate_decisions", "Gate decisions",
                                 ["mesh", "verdict", "mode"], registry=self.registry)
        self.reloads = Counter("passguard_config_reloads", "Configuration reloads",
                               ["outcome"], registry=self.registry)
        for outcome in ("success", "failure"):
            self.reloads.labels(outcome)
        # A failed certificate rotation keeps the old one serving until it expires.
        self.tls_reloads = Counter("passguard_tls_certificate_reloads",
                                   "Serving certificate changes: swapped in, or refused "
                                   "with the previous one kept", ["outcome"],
                                   registry=self.registry)
        for outcome in ("success", "failure"):
            self.tls_reloads.labels(outcome)
        self.cycle_seconds = Gauge("passguard_scrape_cycle_duration_seconds",
                                   "Wall time of the last complete scrape cycle, "
                                   "scrape.spread included",
                                   registry=self.registry)
        self.persist_failures = Counter("passguard_state_write_failures",
                                        "Scrape cycles whose evidence could not be written "
                                        "to the state database", registry=self.registry)
        # process_* (CPU, memory, open files) of passguard itself.
        ProcessCollector(registry=self.registry)
        self.worker_exits = Counter(
            "passguard_scrape_worker_exits",
            "Times the scrape worker process exited or stopped answering and was "
            "replaced (scrape.worker: process)", registry=self.registry)
        self.audit_failures = Counter("passguard_audit_write_failures",
                                      "Decisions whose audit entry could not be written",
                                      registry=self.registry)
        self.clusters_skipped = Gauge(
            "passguard_destinations_skipped_dataplanes",
            "Dataplanes whose /clusters the last destinations pass did not read: no "
            "passthrough connection since their last read", registry=self.registry)
        self.connections_refused = Counter(
            "passguard_http_connections_refused",
            "HTTP connections answered 503 and closed because limits.max_connections "
            "were open", registry=self.registry)
        self.connections_silent = Counter(
            "passguard_http_connections_silent",
            "HTTP connections closed because they sent nothing within "
            "limits.first_byte_timeout", registry=self.registry)
        self.rate_limited = Counter(
            "passguard_http_requests_rate_limited",
            "Requests answered 429: a caller no token or client certificate vouches for "
            "went past limits.unverified_rate", ["route"], registry=self.registry)
        for route in ("/v1/check", "/v1/admission"):
            self.rate_limited.labels(route)
        self.audit_pruned = Counter(
            "passguard_audit_pruned",
            "Audit entries deleted: reason=age past audit.retention, reason=size to keep "
            "the audit within audit.max_bytes (entries lost before their retention)",
            ["reason"], registry=self.registry)
        for reason in ("age", "size"):
            self.audit_pruned.labels(reason)
        build = Gauge("passguard_build_info", "passguard version", ["version"],
                      registry=self.registry)
        build.labels(__version__).set(1)

    async def exposition(self, accept: str) -> tuple[tuple[bytes, bytes], str]:
        """The body of ``GET /metrics`` for this Accept header, as the
        dataplanes' part and ours to be written one after the other (joined,
        megabytes were copied once more), and its content type."""
        encoder, content_type = choose_encoder(accept)
        fmt = Format(openmetrics=content_type.startswith("application/openmetrics-text"),
                     escaping=_escaping(content_type))
        dataplanes = await self.snapshot.get(fmt)
        # Ours last: the OpenMetrics encoder ends its part with `# EOF`.
        return (dataplanes, encoder(self.registry)), content_type


def _escaping(content_type: str) -> str:
    """The name escaping prometheus_client chose (it says so in the content type)."""
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key == "escaping":
            return value
    return UNDERSCORES
