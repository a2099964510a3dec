"""PromQL for the ``prometheus`` source: the three instant queries of a round.

Invariant: a round costs three requests whatever the number of dataplanes
(aggregated queries, never one per dataplane); parts of a union query are told
apart by the ``PART``/``FACT`` labels. What each query reads: docs/sources.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from passguard.envoy.names import DEFAULT_CLUSTERS_PATTERN, DEFAULT_OUTBOUND_PORT, listener_pattern
from passguard.sources.settings import PrometheusSourceConfig, parse_selector, quote

# The subquery resolution is the scrape interval, but never more than this
# many steps per range: Prometheus holds (series × steps) samples per query.
MAX_STEPS = 240
# Labels this module adds to tell the parts of a union query apart.
PART = "passguard_part"
FACT = "passguard_fact"


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


@dataclass(frozen=True)
class _Parts:
    """What the two ``metrics:`` kinds differ in; the rest of a round is shared."""

    agg: str  # how duplicate/sibling series of one family combine
    by_series: str
    by_blocked: str
    conns: str  # the passthrough connection counters
    blocked: tuple[str, ...]  # the refused-connection counters
    up: str
    presence: str  # one series per dataplane: when Prometheus read it
    latest: str
    facts: tuple[tuple[str, str], ...]


def _envoy_parts(cfg: PrometheusSourceConfig, extra: list[str], k: str, g: str, r: str,
                 clusters_pattern: str, outbound_port: int) -> _Parts:
    """Envoy's own series, grouped by cluster/listener name."""
    lab = cfg.labels
    cl = quote(clusters_pattern)
    agg = "sum"  # one family = several clusters (MeshPassthrough matches): summed later
    conns = _sel("envoy_cluster_upstream_cx_total", [f"{CLUSTER_LABEL}=~{cl}", *extra])
    listeners = quote(listener_pattern(clusters_pattern, outbound_port))
    blocked: tuple[str, ...] = (
        _sel("envoy_tcp_downstream_cx_no_route", [f"{TCP_LABEL}=~{cl}", *extra]),
        _sel("envoy_listener_no_filter_chain_match", [f"{LISTENER_LABEL}=~{listeners}",
                                                      *extra]),
    )
    uptime = _sel("envoy_server_uptime", extra)
    stats = _sel("", [
        "__name__=~" + quote("envoy_cluster_upstream_cx_(?:total|active|tx_bytes_total"
                             "|rx_bytes_total|connect_fail|overflow)"),
        f"{CLUSTER_LABEL}=~{cl}", *extra])
    return _Parts(
        agg=agg, by_series=f"{g}, {CLUSTER_LABEL}",
        by_blocked=f"{g}, {TCP_LABEL}, {LISTENER_LABEL}", conns=conns, blocked=blocked,
        # `up` of every job: only the targets that are dataplanes.
        up=_sel("up", [f'{lab.mesh}!=""', f'{lab.dataplane}!=""', *extra]),
        # One series per dataplane tells when Prometheus read it; the
        # passthrough counters stand in where envoy_server_uptime is dropped.
        presence=f"({uptime} or on ({k}) {conns})",
        latest=(f"{agg} by ({g}, {CLUSTER_LABEL}, {TCP_LABEL}, {LISTENER_LABEL}, __name__) "
                f"({stats} or {blocked[0]} or {blocked[1]})"),
        facts=(
            ("samples", f"max by ({g}) (count_over_time({uptime}[{r}]) "
                        f"or on ({k}) count_over_time({conns}[{r}]))"),
            ("restarts", f"max by ({g}) (resets({conns}[{r}]) or resets({uptime}[{r}]))"),
            # The current incarnation's start (Envoy refreshes the uptime at
            # each stats flush, so this errs late: towards "inside the window").
            ("started", f"min by ({g}) (timestamp({uptime}) - {uptime})"),
            ("uptime", f"max by ({g}) (last_over_time({uptime}[{r}]))"),
        ))


def _agent_parts(extra: list[str], k: str, g: str, r: str) -> _Parts:
    """The passguard agents' own series, by family."""
    agg = "max"  # duplicates (two agents, HA pairs) are the same counter
    conns = _sel("passguard_passthrough_connections_total", extra)
    up = _sel("passguard_target_up", extra)
    stats = _sel("", [
        "__name__=~" + quote("passguard_passthrough_(?:connections_total|active_connections"
                             "|bytes_total|blocked_connections_total"
                             "|connect_failures_total|overflow_total)"), *extra])
    last_ok = _sel("passguard_last_successful_scrape_timestamp_seconds", extra)
    return _Parts(
        agg=agg, by_series=f"{g}, family", by_blocked=f"{g}, family", conns=conns,
        blocked=(_sel("passguard_passthrough_blocked_connections_total", extra),), up=up,
        # Offline dataplanes have counters but no passguard_target_up.
        presence=f"({up} or on ({k}) {conns})",
        latest=f"{agg} by ({g}, family, direction, __name__) ({stats})",
        facts=(
            ("samples", f"max by ({g}) (count_over_time({up}[{r}]) "
                        f"or on ({k}) count_over_time({conns}[{r}]))"),
            ("restarts", f"max by ({g}) (resets({conns}[{r}]))"),
            ("agent_success", f"max by ({g}) (last_over_time({last_ok}[{r}]))"),
            # 0: the agent could not read the dataplane at some point in R.
            ("agent_min_up", f"min by ({g}) (min_over_time({up}[{r}]))"),
        ))


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
    p = (_envoy_parts(cfg, extra, k, g, r, clusters_pattern, outbound_port)
         if cfg.metrics == "envoy" else _agent_parts(extra, k, g, r))
    conns, agg = p.conns, p.agg
    first_seen = f"min_over_time(timestamp({p.presence})[{r}:{s}])"
    facts = [
        *p.facts,
        ("newest_now", f"max by ({g}) (timestamp({p.presence}))"),
        ("newest", f"max by ({g}) (max_over_time(timestamp({p.presence})[{r}:{s}]))"),
        ("first_seen", f"min by ({g}) ({first_seen})"),
        ("up", f"min by ({g}) ({p.up})"),
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
                               f"or increase({x}[{r}])" for x in p.blocked)
    window_q = " or ".join([
        _tag(PART, "increase", f"{agg} by ({p.by_series}) ({increase})"),
        _tag(PART, "first", f"{agg} by ({p.by_series}) ({first})"),
        _tag(PART, "born_later", f"{agg} by ({p.by_series}) ({born_later})"),
        _tag(PART, "blocked", f"{agg} by ({p.by_blocked}) ({blocked_expr})"),
    ])
    facts_q = " or ".join(_tag(FACT, name, expr) for name, expr in facts)
    return Queries(window=window_q, latest=p.latest, facts=facts_q,
                   range_seconds=range_s, step_seconds=step_s)
