"""Evidence from the samples of one round of the ``prometheus`` source (pure).

Invariant: one ``DataplaneEvidence`` per dataplane, built as the direct
scraper's store would build it, so the gate cannot tell the difference; a
number Prometheus cannot give is never taken for traffic. The rules (window
counts, coverage, state): docs/sources.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from passguard.envoy.names import FAMILIES, Family, family_of, listener_family
from passguard.envoy.stats import Counters
from passguard.sources.promql import CLUSTER_LABEL, FACT, LISTENER_LABEL, PART, TCP_LABEL
from passguard.sources.promwire import PrometheusError, Sample
from passguard.sources.settings import PrometheusSourceConfig
from passguard.store.snapshot import DataplaneEvidence, State
from passguard.targets import Target

_ENVOY_FIELDS = {
    "envoy_cluster_upstream_cx_total": 0, "envoy_cluster_upstream_cx_active": 1,
    "envoy_cluster_upstream_cx_tx_bytes_total": 2, "envoy_cluster_upstream_cx_rx_bytes_total": 3,
    "envoy_cluster_upstream_cx_connect_fail": 4, "envoy_cluster_upstream_cx_overflow": 5,
    "envoy_tcp_downstream_cx_no_route": 6, "envoy_listener_no_filter_chain_match": 6,
}
_AGENT_FIELDS = {
    "passguard_passthrough_connections_total": 0,
    "passguard_passthrough_active_connections": 1,
    "passguard_passthrough_bytes_total:sent": 2,
    "passguard_passthrough_bytes_total:received": 3,
    "passguard_passthrough_connect_failures_total": 4,
    "passguard_passthrough_overflow_total": 5,
    "passguard_passthrough_blocked_connections_total": 6,
}
_FAMILY_BY_NAME: dict[str, Family] = {f: f for f in FAMILIES}
# How per-dataplane facts from several rows (label variants) combine.
_FACT_MIN = frozenset({"first_seen", "started", "up", "agent_min_up"})


def _count(value: float) -> int:
    """An increase as a whole number of connections: rounded *up* (Prometheus's
    extrapolation gives fractions; any increase above zero is traffic)."""
    if value <= 1e-6:
        return 0
    return math.ceil(value - 1e-6)


@dataclass
class _Series:
    """One passthrough connection counter (Envoy: a cluster; agents: a family)."""

    family: Family
    increase: float = 0.0
    first: float = 0.0
    born_later: bool = False


@dataclass
class _Dataplane:
    mesh: str
    dataplane: str
    service: str = ""
    facts: dict[str, float] = field(default_factory=dict)
    series: dict[str, _Series] = field(default_factory=dict)
    blocked: dict[Family, float] = field(default_factory=dict)
    latest: dict[Family, list[float]] = field(default_factory=dict)
    bad: list[str] = field(default_factory=list)


@dataclass
class RoundResult:
    evidence: list[DataplaneEvidence]
    warnings: list[str]


class _Rows:
    """The rows of one round, gathered per dataplane (and what could not be placed)."""

    def __init__(self, cfg: PrometheusSourceConfig) -> None:
        self.lab = cfg.labels
        self.envoy = cfg.metrics == "envoy"
        self.dps: dict[tuple[str, str], _Dataplane] = {}
        self.unlabelled = 0
        self.unknown_names: set[str] = set()

    def dp_of(self, labels: Mapping[str, str]) -> _Dataplane | None:
        lab = self.lab
        mesh, name = labels.get(lab.mesh, ""), labels.get(lab.dataplane, "")
        if not mesh or not name:
            self.unlabelled += 1
            return None
        d = self.dps.get((mesh, name))
        if d is None:
            d = self.dps[(mesh, name)] = _Dataplane(mesh, name)
        if not d.service and labels.get(lab.service):
            d.service = labels[lab.service]
        return d

    def family_of_row(self, labels: Mapping[str, str]) -> tuple[str, Family] | None:
        """(series name, family) of a row: Envoy's cluster/listener name, or the
        agents' family label."""
        if self.envoy:
            for label, rule in ((CLUSTER_LABEL, family_of), (TCP_LABEL, family_of),
                                (LISTENER_LABEL, listener_family)):
                value = labels.get(label)
                if value:
                    return f"{label}={value}", rule(value)
            self.unknown_names.add("(no cluster or listener label)")
            return None
        value = labels.get("family", "")
        fam = _FAMILY_BY_NAME.get(value)
        if fam is None:
            self.unknown_names.add(repr(value))
            return None
        return value, fam

    def add_facts(self, rows: list[Sample]) -> None:
        for row in rows:
            d = self.dp_of(row.labels)
            name = row.labels.get(FACT, "")
            if d is None or not name:
                continue
            if not math.isfinite(row.value):
                d.bad.append(f"{name} is {row.value}")
                continue
            old = d.facts.get(name)
            if old is None:
                d.facts[name] = row.value
            else:
                d.facts[name] = min(old, row.value) if name in _FACT_MIN else max(old, row.value)

    def add_window(self, rows: list[Sample]) -> None:
        envoy = self.envoy
        for row in rows:
            d = self.dp_of(row.labels)
            part = row.labels.get(PART, "")
            if d is None or not part:
                continue
            named = self.family_of_row(row.labels)
            if named is None:
                continue
            key, fam = named
            if part != "born_later" and (not math.isfinite(row.value) or row.value < 0):
                d.bad.append(f"{part} ({key}) is {row.value}")
                continue
            if part == "blocked":
                d.blocked[fam] = (d.blocked.get(fam, 0.0) + row.value if envoy
                                  else max(d.blocked.get(fam, 0.0), row.value))
                continue
            ser = d.series.setdefault(key, _Series(fam))
            if part == "increase":
                ser.increase = ser.increase + row.value if envoy else max(ser.increase, row.value)
            elif part == "first":
                ser.first = ser.first + row.value if envoy else max(ser.first, row.value)
            elif part == "born_later":
                ser.born_later = True

    def add_latest(self, rows: list[Sample]) -> None:
        envoy = self.envoy
        for row in rows:
            d = self.dp_of(row.labels)
            if d is None:
                continue
            named = self.family_of_row(row.labels)
            metric = row.labels.get("__name__", "")
            if not envoy and metric == "passguard_passthrough_bytes_total":
                metric += ":" + row.labels.get("direction", "")
            idx = (_ENVOY_FIELDS if envoy else _AGENT_FIELDS).get(metric)
            if named is None or idx is None:
                continue
            if not math.isfinite(row.value) or row.value < 0:
                d.bad.append(f"{metric} ({named[0]}) is {row.value}")
                continue
            values = d.latest.setdefault(named[1], [0.0] * 7)
            values[idx] += row.value

    def warnings(self) -> list[str]:
        """What was ignored; raises when nothing carried the dataplane labels."""
        warnings: list[str] = []
        if self.unlabelled:
            which = f"{self.lab.mesh!r} and {self.lab.dataplane!r}"
            if not self.dps:
                raise PrometheusError(
                    f"{self.unlabelled} series of passthrough stats were found, but none "
                    f"carries the labels {which} (labels.mesh, labels.dataplane): set them to "
                    "the label names that Prometheus gives the dataplanes")
            warnings.append(f"{self.unlabelled} result rows lack the label {which}: ignored")
        if self.unknown_names:
            warnings.append("rows without a usable family ignored: "
                            + ", ".join(sorted(self.unknown_names)))
        return warnings


def build_evidence(cfg: PrometheusSourceConfig, window_rows: list[Sample],
                   latest_rows: list[Sample], fact_rows: list[Sample], *, now: float,
                   window: float, threshold: float) -> RoundResult:
    """Turn the three query results into one DataplaneEvidence per dataplane (pure)."""
    rows = _Rows(cfg)
    rows.add_facts(fact_rows)
    rows.add_window(window_rows)
    rows.add_latest(latest_rows)
    warnings = rows.warnings()
    out = [_evidence(cfg, d, now=now, window=window, threshold=threshold)
           for d in rows.dps.values()]
    return RoundResult([e for e in out if e is not None], warnings)


def _evidence(cfg: PrometheusSourceConfig, d: _Dataplane, *, now: float,
              window: float, threshold: float) -> DataplaneEvidence | None:
    f = d.facts
    agent = cfg.metrics == "passguard"
    newest = max((f[k] for k in ("newest_now", "newest") if k in f), default=None)
    if newest is None and not d.bad:
        # Only in `latest` or `window` (a query raced a scrape): next round.
        return None
    if cfg.forget_after is not None and newest is not None and now - newest > cfg.forget_after:
        return None
    offline = False
    last_success = newest
    if agent:
        ok = f.get("agent_success")
        last_success = None if ok is None or newest is None else min(ok, newest)
    error: str | None = None
    state: State
    if d.bad:
        state, error = "failed", "Prometheus returned a non-number: " + ", ".join(d.bad[:3])
    elif agent and "up" not in f and "newest_now" in f:
        # The agent exports this dataplane's counters but no target_up:
        # that is how an agent publishes a dataplane its CP reports offline.
        state, offline = "offline", True
    elif f.get("up", 1.0) == 0.0:
        state = "failed"
        error = ("the passguard agent cannot read it (passguard_target_up == 0)"
                 if agent else "Prometheus's last scrape of it failed (up == 0)")
    elif last_success is None or now - last_success > threshold:
        state = "stale"
    else:
        state = "fresh"
    target = Target(url=cfg.url, mesh=d.mesh, dataplane=d.dataplane, service=d.service,
                    offline=offline)

    covered, reason, started_inside = _coverage(cfg, f, d, now=now, window_start=now - window,
                                                threshold=threshold)
    conns: dict[Family, float] = {}
    for ser in d.series.values():
        # A counter that appeared after its dataplane was watched: its first
        # value is traffic; so is every value of a proxy that started inside.
        counted = ser.increase + (ser.first if ser.born_later or started_inside else 0.0)
        conns[ser.family] = conns.get(ser.family, 0.0) + counted
    win: dict[Family, Counters] = {}
    if not d.bad:
        # A dataplane whose scrape fails now keeps what Prometheus saw before
        # (as the direct scraper keeps a failed target's history).
        for fam in sorted(set(conns) | set(d.blocked) | set(d.latest)):
            win[fam] = Counters(cx_total=_count(conns.get(fam, 0.0)),
                                no_route=_count(d.blocked.get(fam, 0.0)))
    latest = {fam: Counters(*(round(v) for v in values)) for fam, values in d.latest.items()}
    if d.bad:
        # Unknown, not "traffic": numbers Prometheus cannot give are not evidence.
        latest = {fam: c._replace(cx_active=0) for fam, c in latest.items()}
    return DataplaneEvidence(
        target=target, state=state, covered=covered, gap_reason=reason, window=win,
        active_connections=sum(c.cx_active for c in latest.values()), latest=latest,
        uptime=f.get("uptime"), last_success=last_success, last_attempt=now, error=error,
        scrape_duration=None)


def _coverage(cfg: PrometheusSourceConfig, f: Mapping[str, float], d: _Dataplane, *,
              now: float, window_start: float, threshold: float
              ) -> tuple[bool, str | None, bool]:
    """(covered, why not, whether the proxy started inside the window)."""
    # Seen for less than one subquery step: its only samples are the newest.
    first_seen = f.get("first_seen", f.get("newest_now", f.get("newest")))
    if first_seen is None:
        return False, "Prometheus holds no sample of it in the window", False
    restarted = f.get("restarts", 0.0) > 0
    if restarted:
        # Samples missing from what the scrape interval promises: a gap (so
        # do an agent that could not read the dataplane for a while).
        span = now - max(first_seen, window_start - threshold)
        missing = span / cfg.scrape_interval + 1 - f.get("samples", 0.0)
        if missing * cfg.scrape_interval > threshold or f.get("agent_min_up", 1.0) == 0.0:
            return (False, "the proxy restarted during a gap in Prometheus's samples: what it "
                           "did before the restart may be missing", False)
    if first_seen <= window_start:
        return True, None, False
    started = f.get("started")
    if not restarted and started is not None and started >= window_start:
        return True, None, True
    if all(ser.first <= 0 for ser in d.series.values() if not ser.born_later):
        return True, None, False
    return (False, f"its counters include traffic from before Prometheus first saw it "
                   f"({now - first_seen:.0f}s ago, within the {now - window_start:.0f}s window)",
            False)
