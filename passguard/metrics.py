"""Prometheus exposition: a custom collector over the latest snapshot.

``collect()`` only reads the immutable snapshot the poller published: a scrape
of passguard never waits on a proxy, a lock or the database. Destinations are
never labels here (cardinality): they live in the JSON API.
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
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from passguard import __version__
from passguard.sources.kuma import KumaSource
from passguard.sources.prometheus import PrometheusSource
from passguard.store.snapshot import STATES, Snapshot, mesh_summary

DP_LABELS = ["mesh", "service", "dataplane", "family"]

# `_created` series double the exposition for no use here (the counters that
# matter come from Envoy, with their own reset semantics).
disable_created_metrics()  # type: ignore[no-untyped-call]


class SnapshotCollector(Collector):
    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        conns = CounterMetricFamily("passguard_passthrough_connections",
                                    "Connections opened through the passthrough clusters "
                                    "(Envoy upstream_cx_total)", labels=DP_LABELS)
        active = GaugeMetricFamily("passguard_passthrough_active_connections",
                                   "Passthrough connections open at the latest scrape",
                                   labels=DP_LABELS)
        nbytes = CounterMetricFamily("passguard_passthrough_bytes",
                                     "Bytes through the passthrough clusters",
                                     labels=[*DP_LABELS, "direction"])
        blocked = CounterMetricFamily("passguard_passthrough_blocked_connections",
                                      "Connections refused by the passthrough listener "
                                      "(downstream_cx_no_route)", labels=DP_LABELS)
        fails = CounterMetricFamily("passguard_passthrough_connect_failures",
                                    "Passthrough upstream connect failures", labels=DP_LABELS)
        overflow = CounterMetricFamily("passguard_passthrough_overflow",
                                       "Passthrough circuit breaker overflows", labels=DP_LABELS)
        up = GaugeMetricFamily("passguard_target_up", "1 if the last scrape succeeded",
                               labels=["mesh", "dataplane"])
        duration = GaugeMetricFamily("passguard_target_scrape_duration_seconds",
                                     "Duration of the last scrape", labels=["mesh", "dataplane"])
        last_ok = GaugeMetricFamily("passguard_last_successful_scrape_timestamp_seconds",
                                    "Unix time of the last successful scrape",
                                    labels=["mesh", "dataplane"])
        for dp in snap.dataplanes:
            if dp.origin != "scrape":
                # Its series already live in the Prometheus it came from:
                # exporting them again would double them there.
                continue
            t = dp.target
            for fam, c in sorted(dp.latest.items()):
                lv = [t.mesh, t.service, t.dataplane, fam]
                conns.add_metric(lv, c.cx_total)
                active.add_metric(lv, c.cx_active)
                nbytes.add_metric([*lv, "sent"], c.tx_bytes)
                nbytes.add_metric([*lv, "received"], c.rx_bytes)
                blocked.add_metric(lv, c.no_route)
                fails.add_metric(lv, c.connect_fail)
                overflow.add_metric(lv, c.overflow)
            if dp.state == "offline":
                continue
            up.add_metric([t.mesh, t.dataplane], 1.0 if dp.state == "fresh" else 0.0)
            if dp.scrape_duration is not None:
                duration.add_metric([t.mesh, t.dataplane], dp.scrape_duration)
            if dp.last_success is not None:
                last_ok.add_metric([t.mesh, t.dataplane], dp.last_success)
        yield from (conns, active, nbytes, blocked, fails, overflow, up, duration, last_ok)

        window = GaugeMetricFamily("passguard_mesh_passthrough_connections_window",
                                   "Passthrough connections inside the gate window",
                                   labels=["mesh"])
        states = GaugeMetricFamily("passguard_mesh_dataplanes", "Dataplanes by scrape state",
                                   labels=["mesh", "state"])
        for mesh in snap.meshes():
            summary = mesh_summary(mesh, snap.for_mesh(mesh))
            window.add_metric([mesh], summary["connections"])
            for state in STATES:
                states.add_metric([mesh, state], summary["dataplanes"][state])
        yield window
        yield states


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
                 sources: Callable[[], Sequence[object]] = list) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(snapshot))
        self.registry.register(DiscoveryCollector(sources))
        self.decisions = Counter("passguard_gate_decisions", "Gate decisions",
                                 ["mesh", "verdict", "mode"], registry=self.registry)
        self.reloads = Counter("passguard_config_reloads", "Configuration reloads",
                               ["outcome"], registry=self.registry)
        for outcome in ("success", "failure"):
            self.reloads.labels(outcome)
        self.cycle_seconds = Gauge("passguard_scrape_cycle_duration_seconds",
                                   "Wall time of the last complete scrape cycle",
                                   registry=self.registry)
        self.persist_failures = Counter("passguard_state_write_failures",
                                        "Scrape cycles whose evidence could not be written "
                                        "to the state database", registry=self.registry)
        # process_* (CPU, memory, open files) of passguard itself.
        ProcessCollector(registry=self.registry)
        self.audit_failures = Counter("passguard_audit_write_failures",
                                      "Decisions whose audit entry could not be written",
                                      registry=self.registry)
        build = Gauge("passguard_build_info", "passguard version", ["version"],
                      registry=self.registry)
        build.labels(__version__).set(1)
