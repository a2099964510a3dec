"""Source ``prometheus``: passthrough evidence read from PromQL instead of scraping.

For installations where something else already collects the proxies' stats
(DESIGN §5): passguard agents next to the proxies, or kuma-dp / Envoy
``/stats/prometheus`` scraped by the organisation's Prometheus, Thanos, Mimir
or VictoriaMetrics (anything that answers Prometheus's ``POST /api/v1/query``).
``collect(now)`` runs one round of three aggregated instant queries — never
one per dataplane: 10,000 dataplanes cost the same three requests — and
returns one ``DataplaneEvidence`` per dataplane, what the direct scraper's
store would build, so the gate cannot tell the difference.

Series read (``metrics:``)
--------------------------
* ``envoy`` — Envoy's own names, as ``/stats/prometheus`` and kuma-dp's
  ``:5670/metrics`` give them: ``envoy_cluster_upstream_cx_total``,
  ``_cx_active`` (and the bytes, connect-fail and overflow counters) with
  ``envoy_cluster_name`` =~ the passthrough cluster pattern;
  ``envoy_tcp_downstream_cx_no_route`` (``envoy_tcp_prefix``) and
  ``envoy_listener_no_filter_chain_match`` (``envoy_listener_address``) for
  refused connections; ``envoy_server_uptime`` for the proxy's age; ``up``.
  Results are grouped by cluster/listener name and the family
  (``ipv4``/``ipv6``/``legacy``/``matched``) is derived in Python by
  ``passguard.envoy.names`` (``family_of``, ``listener_family``).
* ``passguard`` — the agents' own series (``passguard_passthrough_*`` with
  ``mesh``/``service``/``dataplane``/``family``, ``passguard_target_up``,
  ``passguard_last_successful_scrape_timestamp_seconds``).  Duplicate series
  (two agents, an HA Prometheus pair behind Thanos) are merged with ``max``.

Dataplanes are identified by the labels named in ``labels`` (defaults
``mesh``, ``dataplane``, ``service``: what Kuma's documented
``kuma_sd_configs`` relabelling gives, from ``__meta_kuma_mesh``,
``__meta_kuma_dataplane`` and ``__meta_kuma_service``).

Evidence, per dataplane (R = window + tolerance, tolerance = the stale threshold)
----------------------------------------------------------------------------------
* **Connections in the window**, per passthrough counter: exact (no
  extrapolation) when it has no reset in R, ``last_over_time(x[R]) -
  min_over_time(x[R])``; across a reset Prometheus's ``increase(x[R])``, which
  handles the reset but extrapolates to the range ends, so it can give
  fractional or slightly inflated values: counts are rounded *up* (any increase
  above zero is traffic).  A counter that *appeared* after its dataplane was
  first seen (Envoy's ``usedonly``, kuma-dp, a new MeshPassthrough cluster: an
  absent counter is zero) also counts its first value, which ``increase()``
  misses.  Like the direct scraper, up to the tolerance before the window may
  be counted: the safe side.
* **Active connections**: the latest sample (DESIGN: "a passthrough
  connection is active at the latest sample"), not the maximum over the
  window: a connection that closed inside the window was opened inside it
  (and counted) or belongs to the past, exactly as with direct scraping.
* **Coverage** (DESIGN §3), from when Prometheus first saw the dataplane
  (``min_over_time(timestamp(uptime or on(...) cx_total)[R:step])``):

  1. seen since before the window began → covered;
  2. else, no restart in R and the proxy started inside the window (latest
     ``timestamp(envoy_server_uptime) - envoy_server_uptime``) → covered, and
     the first values of its counters count as traffic;
  3. else its passthrough counters read zero (or had no series) at its first
     sample → covered;
  4. otherwise not covered ("traffic from before Prometheus first saw it")
     until one window has passed.

  A restart in R (a counter or ``envoy_server_uptime`` went down) *and* a gap
  (fewer samples than ``scrape_interval`` promises by more than the
  tolerance; for agents also ``passguard_target_up`` at 0 in R) makes it
  uncovered: what the old incarnation did after its last sample is lost, the
  blind spot Prometheus's own ``increase()`` has.
* **State**: ``failed`` when its scrape is known to fail (``up == 0``;
  ``passguard_target_up == 0`` for agents: the window evidence gathered before
  is kept, as the direct scraper keeps a failed target's history) or
  Prometheus returned a non-number for it (no evidence kept); ``stale`` when
  its newest sample (for agents: the agent's last successful read) is older
  than the threshold ``max(stale_after, 3 × scrape_interval)``; ``offline``
  (agents only) when the agent exports its counters but no
  ``passguard_target_up`` (that is how an agent publishes a dataplane its CP
  reports offline); otherwise ``fresh``.  A dataplane stays listed while it
  has a sample in R (or until ``forget_after``): a pod that is gone is stale,
  hence unknown to the gate, until its samples leave the window.
* **Prometheus unreachable, refusing, or answering garbage** (including an
  answer with ``warnings``: Thanos/Mimir partial responses) → every dataplane
  of the last successful round comes back ``failed`` with the error and no
  window counts (unknown, not "traffic"); ``last_error`` says why; never an
  exception.

Limits: a dataplane Prometheus never saw does not exist here (no CP
discovery); rule 2 needs ``envoy_server_uptime`` (agents do not export it, so
with ``metrics: passguard`` a dataplane first seen with non-zero counters
waits one window); ``scrape_interval`` must not be below the real scrape
interval of those series (fresh dataplanes would flap to stale) nor far above
it (gaps would go unnoticed); two jobs scraping the same Envoy
(``/stats/prometheus`` *and* kuma-dp) double the counts: pick one with
``extra_selector``; refused connections (informational, the gate does not
read them) use ``increase()`` plus the last value of counters born in R, so
they can be overcounted for a dataplane Prometheus has just started to watch.
Cost: the subqueries hold about (connection counters + dataplanes) × R/step
samples in Prometheus (``--query.max-samples``).  Measured on a 2-CPU machine
with Prometheus 2.42, 10,000 dataplanes (90,000 series, window 60 s, step
5 s): the three queries take 5.7 s, 1.4 s and 4.8 s (run concurrently) and
answer ~34 MB of JSON, which passguard decodes and turns into evidence in ~3 s
of worker-thread time (off the event loop).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from passguard.envoy.names import (
    DEFAULT_CLUSTERS_PATTERN,
    DEFAULT_OUTBOUND_PORT,
    FAMILIES,
    Family,
    family_of,
    listener_family,
    listener_pattern,
)
from passguard.envoy.stats import Counters
from passguard.errors import PassguardError
from passguard.httpclient import (
    ClientTLS,
    HttpProblem,
    auth_headers,
    exchange,
    http_problem,
    read_bounded,
)
from passguard.sources.settings import (
    PrometheusLabels,
    PrometheusSourceConfig,
    check_config,
    parse_selector,
    quote,
)
from passguard.store.snapshot import DataplaneEvidence, State
from passguard.targets import Target

log = logging.getLogger(__name__)


# The subquery resolution is the scrape interval, but never more than this
# many steps per range: Prometheus holds (series × steps) samples per query.
MAX_STEPS = 240
# Labels this module adds to tell the parts of a union query apart.
PART = "passguard_part"
FACT = "passguard_fact"


class PrometheusError(PassguardError):
    """Prometheus could not be asked, refused, or answered something unusable."""


def duration(seconds: float) -> str:
    """A PromQL duration in whole milliseconds (2.x has no fractional durations)."""
    return f"{max(1, round(seconds * 1000))}ms"


def _sel(metric: str, matchers: Sequence[str]) -> str:
    return f"{metric}{{{', '.join(matchers)}}}" if matchers else metric


def _tag(label: str, value: str, expr: str) -> str:
    return f'label_replace({expr}, "{label}", "{value}", "", "")'


# Labels that name a passthrough cluster or listener in Envoy's series; the
# family is derived from them in Python, with passguard.envoy.names' rules.
CLUSTER_LABEL = "envoy_cluster_name"
TCP_LABEL = "envoy_tcp_prefix"
LISTENER_LABEL = "envoy_listener_address"


@dataclass(frozen=True)
class Queries:
    """The three instant queries of a round (all evaluated at the same time).

    ``window``: per passthrough series (PART): ``increase`` (exact when no
    reset), ``first`` (first value), ``born_later`` (present only for counters
    that appeared after their dataplane was first seen), ``blocked``;
    ``latest``: the latest value of every passthrough stat (by ``__name__``);
    ``facts``: per dataplane (FACT): newest_now, newest, first_seen, samples,
    restarts, up, and started/uptime (Envoy) or agent_success/agent_min_up."""

    window: str
    latest: str
    facts: str
    range_seconds: float
    step_seconds: float


def build_queries(cfg: PrometheusSourceConfig, window: float, tolerance: float,
                  clusters_pattern: str = DEFAULT_CLUSTERS_PATTERN,
                  outbound_port: int = DEFAULT_OUTBOUND_PORT) -> Queries:
    """PromQL for one config.  ``tolerance`` widens the range before the window
    (the stale threshold, as the direct scraper counts short gaps whole).

    Only instant queries; the subqueries (``[R:step]``) are few and run over
    one series per dataplane or over the connection counters only, so a
    round costs three requests whatever the number of dataplanes."""
    extra = list(parse_selector(cfg.extra_selector))
    lab = cfg.labels
    k = f"{lab.mesh}, {lab.dataplane}"
    g = f"{k}, {lab.service}"
    range_s = window + tolerance
    step_s = max(cfg.scrape_interval, range_s / MAX_STEPS)
    r, s = duration(range_s), duration(step_s)
    cl = quote(clusters_pattern)
    facts: list[tuple[str, str]] = []
    if cfg.metrics == "envoy":
        agg = "sum"  # one family = several clusters (MeshPassthrough matches): summed later
        by_series = f"{g}, {CLUSTER_LABEL}"
        by_blocked = f"{g}, {TCP_LABEL}, {LISTENER_LABEL}"
        conns = _sel("envoy_cluster_upstream_cx_total", [f"{CLUSTER_LABEL}=~{cl}", *extra])
        listeners = quote(listener_pattern(clusters_pattern, outbound_port))
        blocked: tuple[str, ...] = (
            _sel("envoy_tcp_downstream_cx_no_route", [f"{TCP_LABEL}=~{cl}", *extra]),
            _sel("envoy_listener_no_filter_chain_match", [f"{LISTENER_LABEL}=~{listeners}",
                                                          *extra]),
        )
        uptime = _sel("envoy_server_uptime", extra)
        # `up` of every job: only the targets that are dataplanes.
        up = _sel("up", [f'{lab.mesh}!=""', f'{lab.dataplane}!=""', *extra])
        # One series per dataplane tells when Prometheus read it; the
        # passthrough counters stand in where envoy_server_uptime is dropped.
        presence = f"({uptime} or on ({k}) {conns})"
        stats = _sel("", [
            "__name__=~" + quote("envoy_cluster_upstream_cx_(?:total|active|tx_bytes_total"
                                 "|rx_bytes_total|connect_fail|overflow)"),
            f"{CLUSTER_LABEL}=~{cl}", *extra])
        latest = (f"{agg} by ({g}, {CLUSTER_LABEL}, {TCP_LABEL}, {LISTENER_LABEL}, __name__) "
                  f"({stats} or {blocked[0]} or {blocked[1]})")
        facts += [
            ("samples", f"max by ({g}) (count_over_time({uptime}[{r}]) "
                        f"or on ({k}) count_over_time({conns}[{r}]))"),
            ("restarts", f"max by ({g}) (resets({conns}[{r}]) or resets({uptime}[{r}]))"),
            # The current incarnation's start (Envoy refreshes the uptime at
            # each stats flush, so this errs late: towards "inside the window").
            ("started", f"min by ({g}) (timestamp({uptime}) - {uptime})"),
            ("uptime", f"max by ({g}) (last_over_time({uptime}[{r}]))"),
        ]
    else:
        agg = "max"  # duplicates (two agents, HA pairs) are the same counter
        by_series = by_blocked = f"{g}, family"
        conns = _sel("passguard_passthrough_connections_total", extra)
        blocked = (_sel("passguard_passthrough_blocked_connections_total", extra),)
        up = _sel("passguard_target_up", extra)
        # Offline dataplanes have counters but no passguard_target_up.
        presence = f"({up} or on ({k}) {conns})"
        stats = _sel("", [
            "__name__=~" + quote("passguard_passthrough_(?:connections_total|active_connections"
                                 "|bytes_total|blocked_connections_total"
                                 "|connect_failures_total|overflow_total)"), *extra])
        latest = f"{agg} by ({g}, family, direction, __name__) ({stats})"
        last_ok = _sel("passguard_last_successful_scrape_timestamp_seconds", extra)
        facts += [
            ("samples", f"max by ({g}) (count_over_time({up}[{r}]) "
                        f"or on ({k}) count_over_time({conns}[{r}]))"),
            ("restarts", f"max by ({g}) (resets({conns}[{r}]))"),
            ("agent_success", f"max by ({g}) (last_over_time({last_ok}[{r}]))"),
            # 0: the agent could not read the dataplane at some point in R.
            ("agent_min_up", f"min by ({g}) (min_over_time({up}[{r}]))"),
        ]
    first_seen = f"min_over_time(timestamp({presence})[{r}:{s}])"
    facts += [
        ("newest_now", f"max by ({g}) (timestamp({presence}))"),
        ("newest", f"max by ({g}) (max_over_time(timestamp({presence})[{r}:{s}]))"),
        ("first_seen", f"min by ({g}) ({first_seen})"),
        ("up", f"min by ({g}) ({up})"),
    ]
    # Counters whose first sample came after both the range start and their
    # dataplane's first sample: absent before, so zero before (usedonly, a
    # new MeshPassthrough cluster): their first value is window traffic.
    born_later = (f"min_over_time(timestamp({conns})[{r}:{s}]) > on ({k}) group_left () "
                  f"clamp_min(min by ({k}) ({first_seen}), time() - {range_s:.3f})")
    # Exact (no extrapolation) when the counter has no reset in R; across a
    # reset, Prometheus's increase() (reset-aware, extrapolated).
    increase = (f"last_over_time({conns}[{r}]) - min_over_time({conns}[{r}]) "
                f"and resets({conns}[{r}]) == 0 or increase({conns}[{r}])")
    # The first value when there is no reset (a counter only grows); across a
    # reset the largest value, so nothing is taken for zero.
    first = (f"min_over_time({conns}[{r}]) and resets({conns}[{r}]) == 0 "
             f"or max_over_time({conns}[{r}])")
    # Refused connections (informational: the gate does not read them): a
    # counter born inside R counts its last value, others increase().
    blocked_expr = " or ".join(f"(last_over_time({x}[{r}]) unless {x} offset {r}) "
                               f"or increase({x}[{r}])" for x in blocked)
    window_q = " or ".join([
        _tag(PART, "increase", f"{agg} by ({by_series}) ({increase})"),
        _tag(PART, "first", f"{agg} by ({by_series}) ({first})"),
        _tag(PART, "born_later", f"{agg} by ({by_series}) ({born_later})"),
        _tag(PART, "blocked", f"{agg} by ({by_blocked}) ({blocked_expr})"),
    ])
    facts_q = " or ".join(_tag(FACT, name, expr) for name, expr in facts)
    return Queries(window=window_q, latest=latest, facts=facts_q,
                   range_seconds=range_s, step_seconds=step_s)


# --------------------------------------------------------------------------- the wire format


@dataclass(frozen=True, slots=True)
class Sample:
    labels: Mapping[str, str]
    value: float


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def parse_vector(body: Any, what: str) -> list[Sample]:
    """The ``data.result`` of a successful instant query of type ``vector``.

    Raises PrometheusError naming the field that is wrong.  Values are kept as
    floats, ``NaN`` and ``±Inf`` included (the caller decides what they mean)."""
    if not isinstance(body, dict):
        raise PrometheusError(f"{what}: the answer must be a JSON object, got {_kind(body)}")
    status = body.get("status")
    if status == "error":
        raise PrometheusError(f"{what}: Prometheus answered an error: "
                              f"{body.get('errorType') or 'error'}: {body.get('error')}")
    if status != "success":
        raise PrometheusError(f"{what}: status must be \"success\", got {status!r}")
    warnings = body.get("warnings")
    if warnings:
        # Thanos/Mimir partial responses: some data is missing, and missing
        # samples could hide traffic.
        raise PrometheusError(f"{what}: Prometheus answered with warnings (partial data): "
                              + "; ".join(str(w) for w in warnings)[:500])
    data = body.get("data")
    if not isinstance(data, dict):
        raise PrometheusError(f"{what}: data must be an object, got {_kind(data)}")
    rtype = data.get("resultType")
    if rtype != "vector":
        raise PrometheusError(f"{what}: data.resultType must be \"vector\", got {rtype!r}")
    result = data.get("result")
    if not isinstance(result, list):
        raise PrometheusError(f"{what}: data.result must be a list, got {_kind(result)}")
    out: list[Sample] = []
    for i, item in enumerate(result):
        where = f"{what}: data.result[{i}]"
        if not isinstance(item, dict):
            raise PrometheusError(f"{where} must be an object, got {_kind(item)}")
        metric = item.get("metric")
        if not isinstance(metric, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metric.items()):
            raise PrometheusError(f"{where}.metric must map label names to strings, "
                                  f"got {_kind(metric)}")
        value = item.get("value")
        if not isinstance(value, list) or len(value) != 2:
            raise PrometheusError(f"{where}.value must be [timestamp, \"value\"], "
                                  f"got {_kind(value)}")
        ts, text = value
        if isinstance(ts, bool) or not isinstance(ts, int | float):
            raise PrometheusError(f"{where}.value[0] must be a timestamp, got {_kind(ts)}")
        if not isinstance(text, str):
            raise PrometheusError(f"{where}.value[1] must be a string, got {_kind(text)}")
        try:
            number = float(text)
        except ValueError:
            raise PrometheusError(f"{where}.value[1] is not a number: {text[:40]!r}") from None
        out.append(Sample(metric, number))
    return out


# --------------------------------------------------------------------------- evidence

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


def build_evidence(cfg: PrometheusSourceConfig, window_rows: list[Sample],
                   latest_rows: list[Sample], fact_rows: list[Sample], *, now: float,
                   window: float, threshold: float) -> RoundResult:
    """Turn the three query results into one DataplaneEvidence per dataplane (pure)."""
    lab = cfg.labels
    envoy = cfg.metrics == "envoy"
    dps: dict[tuple[str, str], _Dataplane] = {}
    unlabelled = 0
    unknown_names: set[str] = set()

    def dp_of(labels: Mapping[str, str]) -> _Dataplane | None:
        nonlocal unlabelled
        mesh, name = labels.get(lab.mesh, ""), labels.get(lab.dataplane, "")
        if not mesh or not name:
            unlabelled += 1
            return None
        d = dps.get((mesh, name))
        if d is None:
            d = dps[(mesh, name)] = _Dataplane(mesh, name)
        if not d.service and labels.get(lab.service):
            d.service = labels[lab.service]
        return d

    def family_of_row(labels: Mapping[str, str]) -> tuple[str, Family] | None:
        """(series name, family) of a row: Envoy's cluster/listener name, or the
        agents' family label."""
        if envoy:
            for label, rule in ((CLUSTER_LABEL, family_of), (TCP_LABEL, family_of),
                                (LISTENER_LABEL, listener_family)):
                value = labels.get(label)
                if value:
                    return f"{label}={value}", rule(value)
            unknown_names.add("(no cluster or listener label)")
            return None
        value = labels.get("family", "")
        fam = _FAMILY_BY_NAME.get(value)
        if fam is None:
            unknown_names.add(repr(value))
            return None
        return value, fam

    for row in fact_rows:
        d = dp_of(row.labels)
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
    for row in window_rows:
        d = dp_of(row.labels)
        part = row.labels.get(PART, "")
        if d is None or not part:
            continue
        named = family_of_row(row.labels)
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
    for row in latest_rows:
        d = dp_of(row.labels)
        if d is None:
            continue
        named = family_of_row(row.labels)
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
    warnings: list[str] = []
    if unlabelled:
        which = f"{lab.mesh!r} and {lab.dataplane!r}"
        if not dps:
            raise PrometheusError(
                f"{unlabelled} series of passthrough stats were found, but none carries the "
                f"labels {which} (labels.mesh, labels.dataplane): set them to the label names "
                "that Prometheus gives the dataplanes")
        warnings.append(f"{unlabelled} result rows lack the label {which}: ignored")
    if unknown_names:
        warnings.append("rows without a usable family ignored: "
                        + ", ".join(sorted(unknown_names)))
    out = [_evidence(cfg, d, now=now, window=window, threshold=threshold) for d in dps.values()]
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


# --------------------------------------------------------------------------- the source


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
        return await asyncio.to_thread(_decode, body, where)

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


def _decode(body: bytes, where: str) -> list[Sample]:
    doc = _json_or_none(body)
    if doc is None:
        head = body[:80].decode("utf-8", "replace").strip()
        raise PrometheusError(f"{where}: the answer is not JSON (starts {head!r}); is url "
                              "the Prometheus API base?")
    return parse_vector(doc, where)


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


__all__ = [
    "PrometheusError",
    "PrometheusLabels",
    "PrometheusSource",
    "PrometheusSourceConfig",
    "Queries",
    "Sample",
    "build_evidence",
    "build_queries",
    "check_config",
    "parse_selector",
    "parse_vector",
]
