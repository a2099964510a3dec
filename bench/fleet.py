"""Fleet simulator: thousands of Envoy admin APIs served by one process, for benchmarks.

passguard must scrape every sidecar of a mesh every ``scrape.interval``; to
measure that at the scale of a real mesh (10,000 proxies, 5,000 services)
without 10,000 Envoys, this module serves one Envoy-admin-compatible API per
simulated sidecar under ``http://127.0.0.1:PORT/dp/N`` (N = 0 .. targets-1):

``/dp/N/stats``             Envoy's text format, sorted like Envoy; ``filter=<regex>``,
                            ``usedonly``, ``type=`` and ``format=prometheus`` honoured
``/dp/N/stats/prometheus``  Envoy's Prometheus exposition (tag-extracted names)
``/dp/N/clusters``          text, or ``?format=json``, with the ORIGINAL_DST hosts
``/dp/N/ready``             ``LIVE``
``/dp/N/server_info``       a minimal JSON document

Fidelity.  Every stat name, its type (counter / gauge / histogram), the
order of the lines, the line grammar, what ``usedonly`` hides and how the
Prometheus names and labels are derived were taken from a real Envoy 1.40
(``passguard.demo.sidecar.EnvoyProcess``, ``GET /stats?type=Counters|Gauges|
Histograms``; a STATIC cluster and an ORIGINAL_DST cluster carry the very
same 107 per-cluster stats).  ``tests/bench/test_fleet.py`` starts a real
Envoy next to the simulator and compares the two, so the tables below cannot
drift silently.  What is *not* simulated: per-service outbound listeners and
their HTTP connection managers (a real Kuma sidecar has them, which makes
real bodies larger still), the admin's own counters moving with each request,
``/stats?format=json``, and Envoy's harness-only ``proxy_proto.*`` stats.

Scale.  Each target is a handful of numbers (its traffic pattern, its boot
time, its destinations); counters are computed from the clock at request
time, so 10,000 targets cost no timers and almost no memory.  The static part
of every body is rendered once per (clusters, generation) template; a request
only formats the few live numbers (passthrough counters, ``server.uptime``).
A ``filter`` is matched against the template once, and the resulting plan
(which lines, already rendered) is cached per (format, filter, usedonly,
type): a filtered answer never builds the whole body.

Run ``python bench/fleet.py --targets 10000 --clusters 500`` (prints ``READY
http://127.0.0.1:PORT/dp/ 10000``), or ``--measure all`` to benchmark it;
``start_fleet()`` is the in-process API for tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import re
import signal
import socket
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, NamedTuple, Self, cast, get_args
from urllib.parse import quote

import aiohttp
from aiohttp import web

from passguard.demo.kuma_names import IpFamily, families_of, passthrough_cluster_name
from passguard.envoy.names import DEFAULT_CLUSTERS_PATTERN, Family, family_of, stats_filter
from passguard.envoy.stats import ZERO, Counters, StatsReading

FleetGeneration = Literal["legacy", "unified", "0.6", "1.1"]
FLEET_GENERATIONS: tuple[FleetGeneration, ...] = get_args(FleetGeneration)
Pattern = Literal["idle", "steady", "bursty", "restarting"]
PATTERNS: tuple[Pattern, ...] = get_args(Pattern)
DEFAULT_MIX: dict[Pattern, float] = {"idle": 0.7, "steady": 0.2, "bursty": 0.05, "restarting": 0.05}
Kind = Literal["counter", "gauge", "histogram"]
_KINDS: tuple[Kind, ...] = get_args(Kind)

ENVOY_VERSION = "9e5580933739775e8bce696a57a2e1bc99368f23/1.40.0/Clean/RELEASE/BoringSSL"

# --------------------------------------------------------------------------- Envoy's stat names
#
# Copied from a real Envoy 1.40 (see the module docstring); the test compares
# them with a live one.

# cluster.<stat name>.*  (107 per cluster, whatever the cluster type)
def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_CLUSTER_COUNTERS = _words("""
assignment_stale assignment_timeout_received assignment_use_cached bind_errors
default.total_match_count lb_healthy_panic lb_local_cluster_not_ok
lb_recalculate_zone_structures lb_subsets_created lb_subsets_fallback
lb_subsets_fallback_panic lb_subsets_removed lb_subsets_selected lb_zone_cluster_too_small
lb_zone_no_capacity_left lb_zone_routing_all_directly lb_zone_routing_cross_zone
lb_zone_routing_sampled membership_change original_dst_host_invalid
retry_or_shadow_abandoned update_attempt update_empty update_failure update_no_rebuild
update_success upstream_cx_close_notify upstream_cx_connect_attempts_exceeded
upstream_cx_connect_fail upstream_cx_connect_timeout upstream_cx_connect_with_0_rtt
upstream_cx_destroy upstream_cx_destroy_local upstream_cx_destroy_local_with_active_rq
upstream_cx_destroy_remote upstream_cx_destroy_remote_with_active_rq
upstream_cx_destroy_with_active_rq upstream_cx_http1_total upstream_cx_http2_total
upstream_cx_http3_total upstream_cx_idle_timeout upstream_cx_max_duration_reached
upstream_cx_max_requests upstream_cx_none_healthy upstream_cx_overflow
upstream_cx_pool_overflow upstream_cx_preconnect_skipped upstream_cx_protocol_error
upstream_cx_rx_bytes_total upstream_cx_total upstream_cx_tx_bytes_total
upstream_flow_control_backed_up_total upstream_flow_control_drained_total
upstream_flow_control_paused_reading_total upstream_flow_control_resumed_reading_total
upstream_http3_broken upstream_internal_redirect_failed_total
upstream_internal_redirect_succeeded_total upstream_rq_0rtt upstream_rq_active_overflow
upstream_rq_cancelled upstream_rq_completed upstream_rq_maintenance_mode
upstream_rq_max_duration_reached upstream_rq_pending_failure_eject
upstream_rq_pending_overflow upstream_rq_pending_total upstream_rq_per_try_idle_timeout
upstream_rq_per_try_timeout upstream_rq_retry upstream_rq_retry_backoff_exponential
upstream_rq_retry_backoff_ratelimited upstream_rq_retry_limit_exceeded
upstream_rq_retry_overflow upstream_rq_retry_success upstream_rq_rx_reset
upstream_rq_rx_reset_no_error upstream_rq_timeout upstream_rq_total upstream_rq_tx_reset
""")
_CLUSTER_GAUGES = _words("""
circuit_breakers.default.cx_open circuit_breakers.default.cx_pool_open
circuit_breakers.default.rq_open circuit_breakers.default.rq_pending_open
circuit_breakers.default.rq_retry_open circuit_breakers.high.cx_open
circuit_breakers.high.cx_pool_open circuit_breakers.high.rq_open
circuit_breakers.high.rq_pending_open circuit_breakers.high.rq_retry_open
lb_subsets_active max_host_weight membership_degraded membership_excluded
membership_healthy membership_total upstream_cx_active upstream_cx_rx_bytes_buffered
upstream_cx_tx_bytes_buffered upstream_queue_overloaded upstream_rq_active
upstream_rq_pending_active version warming_state
""")
_CLUSTER_HISTOGRAMS = ("upstream_cx_connect_ms", "upstream_cx_length_ms", "upstream_rq_per_cx")

# tcp.<stat prefix>.*  (the tcp_proxy filter of each passthrough listener)
_TCP_COUNTERS = _words("""
downstream_cx_drain_close downstream_cx_no_route downstream_cx_overload_close
downstream_cx_rx_bytes_total downstream_cx_total downstream_cx_tx_bytes_total
downstream_flow_control_paused_reading_total downstream_flow_control_resumed_reading_total
early_data_received_count_total idle_timeout max_downstream_connection_duration
route_delayed_total upstream_flush_total
""")
_TCP_GAUGES = _words("downstream_cx_rx_bytes_buffered downstream_cx_tx_bytes_buffered "
                     "upstream_flush_active")

# listener.<address or stat prefix>.*  ({w}: one per worker thread)
_LISTENER_COUNTERS = _words("""
downstream_cx_destroy downstream_cx_overflow downstream_cx_overload_reject downstream_cx_total
downstream_cx_transport_socket_connect_timeout downstream_global_cx_overflow
downstream_listener_filter_error downstream_listener_filter_remote_close
downstream_pre_cx_timeout extension_config_missing network_extension_config_missing
no_filter_chain_match worker_{w}.downstream_cx_total
""")
_LISTENER_GAUGES = _words("downstream_cx_active downstream_pre_cx_active "
                          "worker_{w}.downstream_cx_active")
_LISTENER_HISTOGRAMS = ("connections_accepted_per_socket_event", "downstream_cx_length_ms")

# Everything else a sidecar prints: "prefix." then kind:suffix[=value][!] tokens,
# "!" marking a stat Envoy reports under usedonly although it is zero (it was
# set).  {clusters}, {listeners} and {workers} are filled in per template,
# {w} expands to one stat per worker thread.  Values of admin counters are a
# snapshot: the simulator does not count its own requests.
_GLOBAL_STATS = """
cluster_manager. g:active_clusters={clusters} c:cluster_added={clusters} c:cluster_modified
  c:cluster_removed c:cluster_updated={clusters} c:cluster_updated_via_merge
  c:update_merge_cancelled c:update_out_of_merge_window g:warming_clusters!
envoy.overload_actions. c:reset_high_memory_stream.count
filesystem. c:flushed_by_timer c:reopen_failed c:write_buffered c:write_completed
  c:write_failed g:write_total_buffered
http.admin. g:downstream_cx_active=1 c:downstream_cx_delayed_close_timeout
  c:downstream_cx_destroy=5 c:downstream_cx_destroy_active_rq c:downstream_cx_destroy_local
  c:downstream_cx_destroy_local_active_rq c:downstream_cx_destroy_remote=5
  c:downstream_cx_destroy_remote_active_rq c:downstream_cx_drain_close
  g:downstream_cx_http1_active=1 g:downstream_cx_http1_soft_drain c:downstream_cx_http1_total=6
  g:downstream_cx_http2_active c:downstream_cx_http2_total g:downstream_cx_http3_active
  c:downstream_cx_http3_total c:downstream_cx_idle_timeout c:downstream_cx_max_duration_reached
  c:downstream_cx_max_requests_reached c:downstream_cx_overload_disable_keepalive
  c:downstream_cx_protocol_error g:downstream_cx_rx_bytes_buffered=131
  c:downstream_cx_rx_bytes_total=884 g:downstream_cx_ssl_active c:downstream_cx_ssl_total
  c:downstream_cx_total=6 g:downstream_cx_tx_bytes_buffered c:downstream_cx_tx_bytes_total=149202
  g:downstream_cx_upgrades_active c:downstream_cx_upgrades_total
  c:downstream_flow_control_paused_reading_total c:downstream_flow_control_resumed_reading_total
  c:downstream_rq_1xx c:downstream_rq_2xx=6 c:downstream_rq_3xx c:downstream_rq_4xx
  c:downstream_rq_5xx g:downstream_rq_active=1 c:downstream_rq_completed=6
  c:downstream_rq_failed_path_normalization c:downstream_rq_header_timeout
  c:downstream_rq_http1_total=6 c:downstream_rq_http2_total c:downstream_rq_http3_total
  c:downstream_rq_idle_timeout c:downstream_rq_max_duration_reached
  c:downstream_rq_non_relative_path c:downstream_rq_overload_close
  c:downstream_rq_redirected_with_normalized_path c:downstream_rq_rejected_via_ip_detection
  c:downstream_rq_response_before_rq_complete c:downstream_rq_rx_reset c:downstream_rq_timeout
  c:downstream_rq_too_large c:downstream_rq_too_many_premature_resets c:downstream_rq_total=6
  c:downstream_rq_tx_reset c:downstream_rq_ws_on_non_ws_route c:rs_too_large
http.async-client. c:no_cluster c:no_route c:passthrough_internal_redirect_bad_location
  c:passthrough_internal_redirect_no_route c:passthrough_internal_redirect_predicate
  c:passthrough_internal_redirect_too_many_redirects
  c:passthrough_internal_redirect_unsafe_scheme c:rq_direct_response c:rq_overload_local_reply
  c:rq_redirect c:rq_reset_after_downstream_response_started c:rq_total
http1. c:dropped_headers_with_underscores c:metadata_not_supported_error
  c:requests_rejected_with_underscores_in_headers c:response_flood
listener.admin. g:downstream_cx_active=1 c:downstream_cx_destroy=5 c:downstream_cx_overflow
  c:downstream_cx_overload_reject c:downstream_cx_total=6
  c:downstream_cx_transport_socket_connect_timeout c:downstream_global_cx_overflow
  c:downstream_listener_filter_error c:downstream_listener_filter_remote_close
  g:downstream_pre_cx_active! c:downstream_pre_cx_timeout c:http.admin.downstream_rq_1xx
  c:http.admin.downstream_rq_2xx=6 c:http.admin.downstream_rq_3xx c:http.admin.downstream_rq_4xx
  c:http.admin.downstream_rq_5xx c:http.admin.downstream_rq_completed=6
  g:main_thread.downstream_cx_active=1 c:main_thread.downstream_cx_total=6
  c:no_filter_chain_match
listener_manager. c:listener_added={listeners} c:listener_create_failure
  c:listener_create_success={listeners} c:listener_in_place_updated c:listener_modified
  c:listener_removed c:listener_stopped g:total_filter_chains_draining
  g:total_listeners_active={listeners} g:total_listeners_draining g:total_listeners_warming!
  g:workers_pinned g:workers_started=1
main_thread. c:watchdog_mega_miss c:watchdog_miss
runtime. g:admin_overrides_active g:deprecated_feature_seen_since_process_start
  c:deprecated_feature_use c:load_error c:load_success=2 g:num_keys! g:num_layers!
  c:override_dir_exists c:override_dir_not_exists=2
server. g:compilation_settings.fips_mode! g:concurrency={workers}
  g:days_until_first_cert_expiring=4294967295 c:debug_assertion_failures
  c:dropped_stat_flushes c:dynamic_unknown_fields! c:envoy_bug_failures c:envoy_notifications
  g:hot_restart_epoch g:live=1 c:main_thread.watchdog_mega_miss c:main_thread.watchdog_miss
  g:memory_allocated=6051040 g:memory_heap_size=10485760 g:memory_physical_size=13560638
  g:parent_connections g:seconds_until_first_ocsp_response_expiring g:state!
  c:static_unknown_fields! g:stats_recent_lookups=2661 g:total_connections!
  g:version=10376576 c:wip_protos! c:worker_{w}.watchdog_mega_miss c:worker_{w}.watchdog_miss
thread_local_cluster_manager. g:main_thread.clusters_inflated={clusters}
  g:worker_{w}.clusters_inflated={clusters}
workers. c:watchdog_mega_miss c:watchdog_miss
"""
# server.uptime is the one live global stat; (name, samples, value in ms) of the
# global histograms, recorded once at start-up or by admin requests.
_UPTIME = "server.uptime"
_GLOBAL_HISTOGRAMS: tuple[tuple[str, int, float], ...] = (
    ("http.admin.downstream_cx_length_ms", 5, 2.05),
    ("http.admin.downstream_rq_time", 6, 0.0),
    ("listener.admin.connections_accepted_per_socket_event", 6, 1.05),
    ("listener.admin.downstream_cx_length_ms", 5, 2.05),
    ("overload.refresh_interval_delay", 0, 0.0),
    ("server.initialization_time_ms", 1, 21.5),
)
_QUANTILES = ("0", "25", "50", "75", "90", "95", "99", "99.5", "99.9", "100")
# Envoy's default Prometheus histogram buckets.
_BUCKETS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
            300000, 600000, 1800000, 3600000)

# Kuma binds the transparent-proxy listeners here (kuma-init's redirect ports).
_OUTBOUND_PORT, _INBOUND_PORT = 15001, 15006
_ANY = {"ipv4": "0.0.0.0", "ipv6": "::"}

# --------------------------------------------------------------------------- state of one proxy


@dataclass(frozen=True, slots=True)
class HostState:
    """One ORIGINAL_DST host (an external destination) of a passthrough cluster."""

    address: str
    port: int
    cx_total: int
    cx_active: int = 0
    connect_fail: int = 0

    @property
    def endpoint(self) -> str:
        """``93.184.216.34:443`` / ``[2606:4700::6810:84e5]:443``, as Envoy prints it."""
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ClusterState:
    """What a cluster's counters say (a passthrough cluster at one instant, or a
    service cluster of the template).  ``overflow`` and ``no_route`` stay 0 in
    the traffic patterns (passthrough is on, far below its 1024-connection
    circuit breaker); they are here so every stat passguard reads is rendered
    from one place."""

    cx_total: int = 0
    cx_active: int = 0
    tx_bytes: int = 0
    rx_bytes: int = 0
    connect_fail: int = 0
    overflow: int = 0
    no_route: int = 0
    hosts: tuple[HostState, ...] = ()

    @property
    def counters(self) -> Counters:
        """The passguard view of this cluster (``passguard.envoy.stats.Counters``)."""
        return Counters(self.cx_total, self.cx_active, self.tx_bytes, self.rx_bytes,
                        self.connect_fail, self.overflow, self.no_route)

    @property
    def touched(self) -> bool:
        # A connection was handled since the proxy started: Envoy's "used" flag.
        return self.cx_total + self.no_route > 0


IDLE = ClusterState()


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Ground truth of one simulated proxy at time ``t``: what its admin answers."""

    t: float
    uptime: int
    names: tuple[str, ...]  # stat names of the outbound passthrough clusters
    clusters: tuple[ClusterState, ...]  # same order as ``names``

    @property
    def counters(self) -> dict[str, Counters]:
        """Per passthrough cluster (stat name)."""
        return {n: c.counters for n, c in zip(self.names, self.clusters, strict=True)}

    @property
    def families(self) -> dict[Family, Counters]:
        """Summed per family, like ``StatsParser`` does; every family of the generation
        is present (zero when idle)."""
        out: dict[Family, Counters] = {}
        for name, c in zip(self.names, self.clusters, strict=True):
            fam = family_of(name)
            out[fam] = out.get(fam, ZERO) + c.counters
        return out

    def reading(self) -> StatsReading:
        """What ``StatsParser.parse`` must return for a filtered ``/stats``."""
        return StatsReading(float(self.uptime), self.families)

    @property
    def destinations(self) -> dict[str, int]:
        """``ip:port`` → connections (``cx_total``) through passthrough since the proxy started."""
        out: dict[str, int] = {}
        for c in self.clusters:
            for h in c.hosts:
                out[h.endpoint] = out.get(h.endpoint, 0) + h.cx_total
        return out


# --------------------------------------------------------------------------- traffic model


@dataclass(frozen=True, slots=True)
class Destination:
    """An external service one simulated proxy talks to through passthrough."""

    cluster: int  # index into the template's outbound passthrough clusters
    address: str
    port: int
    rate: float  # new connections per second while the target is active
    hold: int = 0  # connections kept open while active
    fail_every: int = 0  # every n-th connection attempt fails to connect (0: none)


@dataclass(frozen=True, slots=True)
class TargetSpec:
    """Everything needed to compute a proxy's counters at any time: no timers, no state.

    * ``idle``: no passthrough traffic at all.
    * ``steady``: each destination gets ``rate`` connections per second, forever.
    * ``bursty``: at ``rate`` only during the first ``burst`` seconds of every
      ``period`` (counted from boot); flat in between.
    * ``restarting``: like steady, but the proxy restarts every ``period``
      seconds (from ``boot``): uptime, counters and hosts go back to zero.
    """

    pattern: Pattern
    boot: float  # wall-clock time the proxy (first) started
    period: float = 0.0
    burst: float = 0.0
    destinations: tuple[Destination, ...] = ()
    tx_per_cx: int = 517  # bytes each connection sends (a TLS ClientHello and a request)
    rx_per_cx: int = 4380  # and receives

    def snapshot(self, t: float, names: tuple[str, ...]) -> Snapshot:
        boot = self.boot
        if self.pattern == "restarting" and self.period > 0 and t > boot:
            boot += math.floor((t - boot) / self.period) * self.period
        age = max(0.0, t - boot)
        # Seconds of traffic since boot, and whether traffic flows right now.
        if self.pattern == "idle":
            busy, on = 0.0, False
        elif self.pattern == "bursty" and self.period > 0:
            rounds, into = divmod(age, self.period)
            busy, on = rounds * self.burst + min(self.burst, into), into < self.burst
        else:
            busy, on = age, True
        acc = [[0, 0, 0, 0, 0] for _ in names]
        hosts: list[list[HostState]] = [[] for _ in names]
        for d in self.destinations:
            n = int(d.rate * busy)
            if n <= 0:
                continue  # ORIGINAL_DST creates a host on its first connection only
            fail = n // d.fail_every if d.fail_every else 0
            ok = n - fail
            active = min(d.hold, ok) if on else 0
            a = acc[d.cluster]
            a[0] += n
            a[1] += active
            a[2] += ok * self.tx_per_cx
            a[3] += ok * self.rx_per_cx
            a[4] += fail
            hosts[d.cluster].append(HostState(d.address, d.port, n, active, fail))
        clusters = tuple(
            ClusterState(a[0], a[1], a[2], a[3], a[4], hosts=tuple(h)) if a[0] else IDLE
            for a, h in zip(acc, hosts, strict=True)
        )
        return Snapshot(t, int(age), names, clusters)


# Where sidecars go when they leave the mesh: public services (IPv4, IPv6) and ports.
_IPV4_POOL = ("93.184.216.34", "140.82.112.3", "151.101.1.69", "104.16.132.229",
              "52.94.236.248", "142.250.74.46", "13.107.42.14", "35.186.224.25",
              "54.239.28.85", "185.199.108.153", "199.232.69.194", "3.5.140.2")
_IPV6_POOL = ("2606:2800:220:1:248:1893:25c8:1946", "2a00:1450:4001:82b::200e",
              "2606:4700::6810:84e5", "2620:1ec:bdf::10", "2a04:4e42::81")
_PORTS = (443, 443, 443, 443, 80, 5432, 6379, 9200, 27017)


def parse_mix(text: str) -> dict[Pattern, float]:
    """``idle=0.7,steady=0.2,...`` → weights (patterns left out weigh 0)."""
    mix: dict[Pattern, float] = {}
    for item in text.split(","):
        name, sep, weight = item.strip().partition("=")
        if not sep or name not in PATTERNS:
            raise ValueError(f"bad pattern weight {item!r}: want NAME=WEIGHT, NAME in {PATTERNS}")
        w = float(weight)
        if w < 0 or not math.isfinite(w):
            raise ValueError(f"bad weight for {name}: {weight!r}")
        mix[name] = w
    if sum(mix.values()) <= 0:
        raise ValueError("pattern weights sum to zero")
    return mix


def assign_patterns(count: int, mix: Mapping[Pattern, float], seed: int) -> list[Pattern]:
    """Exact shares (largest remainder), shuffled by the seed: 20 targets at
    5% restarting give exactly one restarting target, not "maybe none"."""
    total = sum(mix.values())
    shares = {p: count * w / total for p, w in mix.items()}
    quota = {p: int(s) for p, s in shares.items()}
    left = count - sum(quota.values())
    for p in sorted(shares, key=lambda p: (-(shares[p] - quota[p]), PATTERNS.index(p)))[:left]:
        quota[p] += 1
    out = [p for p in PATTERNS for _ in range(quota.get(p, 0))]
    random.Random(f"{seed}:patterns").shuffle(out)
    return out


def make_spec(n: int, pattern: Pattern, families: Sequence[IpFamily], seed: int,
              t0: float) -> TargetSpec:
    """Target ``n``'s traffic, deterministic from (seed, n)."""
    rng = random.Random(f"{seed}:{n}")
    boot = t0 - rng.uniform(600.0, 14 * 86400.0)
    if pattern == "idle":
        return TargetSpec("idle", boot)
    period = burst = 0.0
    if pattern == "bursty":
        period, burst = rng.uniform(120.0, 900.0), rng.uniform(5.0, 30.0)
    elif pattern == "restarting":
        period = rng.uniform(120.0, 600.0)
        boot = t0 - rng.uniform(0.0, period)  # the phase of the restart cycle
    dests: list[Destination] = []
    seen: set[tuple[str, int]] = set()
    for _ in range(rng.randint(1, 4)):
        fam = 1 if len(families) > 1 and rng.random() < 0.15 else 0
        address = rng.choice(_IPV6_POOL if families[fam] == "ipv6" else _IPV4_POOL)
        port = rng.choice(_PORTS)
        if (address, port) in seen:
            continue
        seen.add((address, port))
        if pattern == "bursty":
            rate, hold = rng.uniform(2.0, 20.0), rng.randint(0, 3)
        elif pattern == "restarting":
            rate, hold = rng.uniform(0.1, 2.0), int(rng.random() < 0.3)
        else:
            rate, hold = rng.uniform(0.02, 1.0), int(rng.random() < 0.3)
        fail_every = rng.choice((10, 20, 50)) if rng.random() < 0.1 else 0
        dests.append(Destination(fam, address, port, rate, hold, fail_every))
    return TargetSpec(pattern, boot, period, burst, tuple(dests))


# --------------------------------------------------------------------------- stats template

StateFn = Callable[[ClusterState], tuple[int, bool]]  # (value, used)
ValueFn = Callable[[Snapshot], tuple[int, bool]]
CountFn = Callable[[Snapshot], int]


def _touched_zero(s: ClusterState) -> tuple[int, bool]:
    return 0, s.touched


def _destroyed(s: ClusterState) -> tuple[int, bool]:
    return s.cx_total - s.cx_active, s.cx_total > s.cx_active


def _hosts(s: ClusterState) -> tuple[int, bool]:
    return len(s.hosts), bool(s.hosts)


# How the cluster stats that move follow from a ClusterState (checked against a
# real Envoy after N passthrough connections: the test compares usedonly sets).
_CLUSTER_FIELDS: dict[str, StateFn] = {
    "upstream_cx_total": lambda s: (s.cx_total, s.cx_total > 0),
    "upstream_cx_active": lambda s: (s.cx_active, s.cx_total > 0),
    "upstream_rq_active": lambda s: (s.cx_active, s.cx_total > 0),
    "upstream_cx_tx_bytes_total": lambda s: (s.tx_bytes, s.tx_bytes > 0),
    "upstream_cx_rx_bytes_total": lambda s: (s.rx_bytes, s.rx_bytes > 0),
    "upstream_cx_connect_fail": lambda s: (s.connect_fail, s.connect_fail > 0),
    "upstream_cx_overflow": lambda s: (s.overflow, s.overflow > 0),
    "upstream_cx_destroy": _destroyed,
    "upstream_cx_destroy_remote": _destroyed,
    "upstream_cx_destroy_remote_with_active_rq": _destroyed,
    "upstream_cx_destroy_with_active_rq": _destroyed,
    # tcp_proxy counts each connection as one upstream "request".
    "upstream_rq_total": lambda s: (s.cx_total, s.cx_total > 0),
    "upstream_rq_pending_total": lambda s: (s.cx_total, s.cx_total > 0),
    "upstream_rq_pending_active": _touched_zero,
    "upstream_cx_rx_bytes_buffered": _touched_zero,
    "circuit_breakers.default.cx_open": _touched_zero,
    "circuit_breakers.default.rq_open": _touched_zero,
    "circuit_breakers.default.rq_pending_open": _touched_zero,
    "membership_change": _hosts,
    "membership_healthy": _hosts,
    "membership_total": _hosts,
    "membership_degraded": lambda s: (0, bool(s.hosts)),
    "membership_excluded": lambda s: (0, bool(s.hosts)),
    "default.total_match_count": lambda s: (max(s.cx_total, len(s.hosts)),
                                            s.cx_total > 0 or bool(s.hosts)),
    "warming_state": lambda s: (0, True),
}
_TCP_FIELDS: dict[str, StateFn] = {
    "downstream_cx_total": lambda s: (s.cx_total + s.no_route, s.touched),
    "downstream_cx_no_route": lambda s: (s.no_route, s.no_route > 0),
    # Downstream receives what the application sends: the upstream's tx.
    "downstream_cx_rx_bytes_total": lambda s: (s.tx_bytes, s.tx_bytes > 0),
    "downstream_cx_tx_bytes_total": lambda s: (s.rx_bytes, s.rx_bytes > 0),
    "downstream_cx_rx_bytes_buffered": _touched_zero,
}


def _share(total: int, w: int, workers: int) -> int:
    """Worker ``w``'s part of ``total`` connections (the kernel spreads them)."""
    return total // workers + (1 if w < total % workers else 0)


def _listener_fields(workers: int) -> dict[str, StateFn]:
    fields: dict[str, StateFn] = {
        "downstream_cx_total": lambda s: (s.cx_total + s.no_route, s.touched),
        "downstream_cx_active": lambda s: (s.cx_active, s.touched),
        "downstream_cx_destroy": lambda s: (s.cx_total + s.no_route - s.cx_active,
                                            s.cx_total + s.no_route > s.cx_active),
        "downstream_pre_cx_active": _touched_zero,
    }
    for w in range(workers):
        def total(s: ClusterState, w: int = w) -> tuple[int, bool]:
            return _share(s.cx_total + s.no_route, w, workers), s.touched

        def active(s: ClusterState, w: int = w) -> tuple[int, bool]:
            return _share(s.cx_active, w, workers), s.touched

        fields[f"worker_{w}.downstream_cx_total"] = total
        fields[f"worker_{w}.downstream_cx_active"] = active
    return fields


# Histograms that record with traffic: (sample value in ms or count, samples).
_HistFn = Callable[[ClusterState], int]
_CLUSTER_HISTS: dict[str, tuple[float, _HistFn]] = {
    "upstream_cx_connect_ms": (2.05, lambda s: s.cx_total - s.connect_fail),
    "upstream_cx_length_ms": (1250.0, lambda s: s.cx_total - s.cx_active),
}
_LISTENER_HISTS: dict[str, tuple[float, _HistFn]] = {
    "connections_accepted_per_socket_event": (1.05, lambda s: s.cx_total + s.no_route),
    "downstream_cx_length_ms": (1250.0, lambda s: s.cx_total + s.no_route - s.cx_active),
}


@dataclass(slots=True)
class Stat:
    """One line of ``/stats``: static (rendered once) or live (``fn``/``count``)."""

    name: str
    kind: Kind
    value: int = 0
    used: bool = False
    fn: ValueFn | None = None  # live counter/gauge
    sample: float = 0.0  # histograms: every sample has this value
    count: int = 0  # histograms: samples recorded (static)
    count_fn: CountFn | None = None  # live histogram
    prom: tuple[str, str, str] = ("", "", "")  # (tag-extracted name, metric, labels)


def _live(fn: StateFn, j: int) -> ValueFn:
    def value(snap: Snapshot) -> tuple[int, bool]:
        return fn(snap.clusters[j])
    return value


def _live_count(fn: _HistFn, j: int) -> CountFn:
    def count(snap: Snapshot) -> int:
        return fn(snap.clusters[j])
    return count


def _uptime(snap: Snapshot) -> tuple[int, bool]:
    return snap.uptime, True


def _block(prefix: str, counters: Iterable[str], gauges: Iterable[str],
           hists: Iterable[str], fields: Mapping[str, StateFn],
           hist_fields: Mapping[str, tuple[float, _HistFn]],
           state: ClusterState | None, j: int) -> list[Stat]:
    """The stats under ``prefix``: static from ``state``, or live from the
    snapshot's passthrough cluster ``j`` when ``state`` is None."""
    out: list[Stat] = []
    for kind, names in (("counter", counters), ("gauge", gauges)):
        for suffix in names:
            st = Stat(prefix + suffix, cast(Kind, kind))
            fn = fields.get(suffix)
            if fn is not None:
                if state is None:
                    st.fn = _live(fn, j)
                else:
                    st.value, st.used = fn(state)
            out.append(st)
    for suffix in hists:
        st = Stat(prefix + suffix, "histogram")
        spec = hist_fields.get(suffix)
        if spec is not None:
            st.sample = spec[0]
            if state is None:
                st.count_fn = _live_count(spec[1], j)
            else:
                st.count = spec[1](state)
        out.append(st)
    return out


def _global_stats(clusters: int, listeners: int, workers: int) -> list[Stat]:
    out: list[Stat] = []
    prefix = ""
    values = {"clusters": clusters, "listeners": listeners, "workers": workers}
    for token in _GLOBAL_STATS.split():
        if token.endswith("."):
            prefix = token
            continue
        kind, _, rest = token.partition(":")
        used_at_zero = rest.endswith("!")
        name, _, value = rest.rstrip("!").partition("=")
        v = int(value.format(**values)) if value else 0
        for w in range(workers) if "{w}" in name else (0,):
            out.append(Stat(prefix + name.replace("{w}", str(w)),
                            "counter" if kind == "c" else "gauge", v, v != 0 or used_at_zero))
    out.append(Stat(_UPTIME, "gauge", fn=_uptime))
    for name, count, sample in _GLOBAL_HISTOGRAMS:
        out.append(Stat(name, "histogram", sample=sample, count=count))
    return out


# Envoy's default tag extraction, for the name shapes a sidecar has (Envoy
# source/common/config/well_known_names.cc; 1.40 also extracts the worker of
# thread_local_cluster_manager.worker_N): the tag-extracted name sorts the
# Prometheus groups, the tags become labels in extraction order.
_ADDRESS = r"(?:\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}|\[[a-fA-F_\d]+\])_\d+"
_RE_CODE_CLASS = re.compile(r"_rq_((\d))xx$")
_RE_LISTENER_HTTP = re.compile(r"^listener\..*?\.http\.(([^.]+)\.)")
_RE_WORKER = re.compile(rf"^(?:listener\.(?:{_ADDRESS}|[^.]+)\.|server\.|listener_manager\."
                        rf"|thread_local_cluster_manager\.)worker_((\d+)\.)")
_RE_LISTENER = re.compile(rf"^listener\.(({_ADDRESS}|[^.]+)\.)")
_TOKENIZED = (("tcp.", "envoy_tcp_prefix"), ("cluster.", "envoy_cluster_name"))


def prometheus_series(name: str) -> tuple[str, str, str]:
    """(tag-extracted name, metric name, labels) Envoy's ``/stats/prometheus`` uses
    for the stat ``name``."""
    tags: list[tuple[str, str]] = []

    def cut(m: re.Match[str] | None, tag: str) -> None:
        nonlocal name
        if m is not None:
            tags.append((tag, m.group(2)))
            name = name[:m.start(1)] + name[m.end(1):]

    cut(_RE_CODE_CLASS.search(name), "envoy_response_code_class")
    for prefix, tag in _TOKENIZED:
        if name.startswith(prefix):
            value, dot, rest = name[len(prefix):].partition(".")
            if dot:
                tags.append((tag, value))
                name = prefix + rest
    m = _RE_LISTENER_HTTP.match(name)
    if m is not None:
        cut(m, "envoy_http_conn_manager_prefix")
    elif name.startswith("http."):
        value, dot, rest = name[5:].partition(".")
        if dot:
            tags.append(("envoy_http_conn_manager_prefix", value))
            name = "http." + rest
    cut(_RE_WORKER.match(name), "envoy_worker_id")
    m = _RE_LISTENER.match(name)
    if m is not None and m.group(2) != "admin":
        cut(m, "envoy_listener_address")
    metric = "envoy_" + re.sub(r"[^A-Za-z0-9_]", "_", name)
    labels = ",".join(f'{k}="{v}"' for k, v in tags)
    return name, metric, labels


class ClusterInfo(NamedTuple):
    """A cluster as ``/clusters`` lists it."""

    name: str  # Envoy cluster name (outbound:passthrough:ipv4)
    stat_name: str  # observability name (outbound_passthrough_ipv4)
    eds: bool  # added via the API (Kuma's EDS service clusters)
    live: int  # index of the live passthrough cluster, -1 for static ones
    state: ClusterState  # static clusters only


class Passthrough(NamedTuple):
    """An outbound passthrough cluster of the generation, with its listener."""

    cluster: str
    stat_name: str
    family: IpFamily
    listener: str  # listener.<this>.* stat prefix


def _outbound_names(generation: FleetGeneration, family: IpFamily) -> tuple[str, str]:
    name = passthrough_cluster_name(generation, family)
    # Kuma's altStatName: the name with ':' → '_'.
    return name, name.replace(":", "_")


def _inbound_names(generation: FleetGeneration, family: IpFamily) -> tuple[str, str] | None:
    if generation == "0.6":
        return None  # 0.6 had no inbound passthrough
    if generation == "1.1":
        return "inbound:passthrough", "inbound_passthrough"
    if generation == "unified":
        name = f"self_transparentproxy_passthrough_inbound_{family}"
        return name, name
    return f"inbound:passthrough:{family}", f"inbound_passthrough_{family}"


def _listener_prefix(generation: FleetGeneration, family: IpFamily, port: int,
                     unified_name: str) -> str:
    """Kuma sets a listener statPrefix only with unified naming; otherwise Envoy
    uses the address with ':' → '_' (``0.0.0.0_15001``, ``[__]_15001``)."""
    if generation == "unified":
        return unified_name
    host = _ANY[family]
    shown = f"[{host}]" if family == "ipv6" else host
    return f"{shown}_{port}".replace(":", "_")


_SERVICES = ("web", "api", "orders", "payments", "users", "catalog", "search", "cart", "auth",
             "billing", "inventory", "shipping", "reviews", "ledger", "notify", "gateway")
_SERVICE_PORTS = (8080, 80, 3000, 9090, 5432, 8443)


def service_cluster_name(i: int) -> str:
    """Kuma's Kubernetes service cluster naming: ``<service>_<namespace>_svc_<port>``."""
    return (f"{_SERVICES[i % len(_SERVICES)]}-{i:04d}_team-{i % 23:02d}_svc_"
            f"{_SERVICE_PORTS[i % len(_SERVICE_PORTS)]}")


def _service_state(i: int, port: int) -> ClusterState:
    """A service cluster's (static) counters: 1–3 endpoints, most services called."""
    h = (i * 2654435761) & 0xFFFFFFFF
    endpoints = 1 + h % 3
    cx = 0 if h % 10 < 3 else h % 50000
    per = [cx // endpoints + (1 if e < cx % endpoints else 0) for e in range(endpoints)]
    hosts = tuple(HostState(f"10.{(i >> 8) & 255}.{i & 255}.{10 + e}", port, per[e],
                            1 if per[e] else 0) for e in range(endpoints))
    active = sum(x.cx_active for x in hosts)
    return ClusterState(cx, active, cx * 1870, cx * 23410, hosts=hosts)


# --------------------------------------------------------------------------- rendering


class _Live:
    """A piece of a body that depends on the snapshot."""

    __slots__ = ()

    def render(self, snap: Snapshot) -> bytes:
        raise NotImplementedError


Part = bytes | _Live


def _chunks(parts: Sequence[Part], snap: Snapshot) -> list[bytes]:
    return [p if isinstance(p, bytes) else p.render(snap) for p in parts]


def _join(parts: Sequence[Part], snap: Snapshot) -> bytes:
    return b"".join(_chunks(parts, snap))


class _Scalar(_Live):
    __slots__ = ("fn", "head", "usedonly")

    def __init__(self, head: bytes, fn: ValueFn, usedonly: bool) -> None:
        self.head, self.fn, self.usedonly = head, fn, usedonly

    def render(self, snap: Snapshot) -> bytes:
        value, used = self.fn(snap)
        if self.usedonly and not used:
            return b""
        return b"%s%d\n" % (self.head, value)


def _recorded(sample: float) -> bytes:
    """Envoy's text histogram: P<q>(interval,cumulative); nothing new this interval."""
    v = _num(sample)
    return " ".join(f"P{q}(nan,{v})" for q in _QUANTILES).encode()


def _num(x: float) -> str:
    return str(int(x)) if x == int(x) else repr(x)


class _TextHist(_Live):
    __slots__ = ("count", "head", "recorded", "usedonly")

    def __init__(self, head: bytes, count: CountFn, sample: float, usedonly: bool) -> None:
        self.head, self.count, self.usedonly = head, count, usedonly
        self.recorded = _recorded(sample) + b"\n"

    def render(self, snap: Snapshot) -> bytes:
        if self.count(snap) > 0:
            return self.head + self.recorded
        return b"" if self.usedonly else self.head + b"No recorded values\n"


def _prom_hist_lines(metric: str, labels: str, sample: float, count: int) -> bytes:
    sep = "," if labels else ""
    lines = [f'{metric}_bucket{{{labels}{sep}le="{_num(le)}"}} {count if sample <= le else 0}\n'
             for le in _BUCKETS]
    lines.append(f'{metric}_bucket{{{labels}{sep}le="+Inf"}} {count}\n')
    lines.append(f"{metric}_sum{{{labels}}} {_num(round(count * sample, 6))}\n")
    lines.append(f"{metric}_count{{{labels}}} {count}\n")
    return "".join(lines).encode()


class _PromHist(_Live):
    __slots__ = ("count", "labels", "metric", "sample", "usedonly")

    def __init__(self, st: Stat, usedonly: bool) -> None:
        assert st.count_fn is not None
        self.count, self.sample, self.usedonly = st.count_fn, st.sample, usedonly
        _, self.metric, self.labels = st.prom

    def render(self, snap: Snapshot) -> bytes:
        n = self.count(snap)
        if n == 0 and self.usedonly:
            return b""
        return _prom_hist_lines(self.metric, self.labels, self.sample, n)


class _Group(_Live):
    """A Prometheus ``# TYPE`` group with live members: the header only when a
    member is shown (usedonly can hide them all)."""

    __slots__ = ("header", "parts")

    def __init__(self, header: bytes, parts: list[Part]) -> None:
        self.header, self.parts = header, parts

    def render(self, snap: Snapshot) -> bytes:
        body = _join(self.parts, snap)
        return self.header + body if body else b""


class _Parts:
    """Collects parts, merging consecutive static bytes into one."""

    def __init__(self) -> None:
        self.parts: list[Part] = []
        self._buf: list[bytes] = []

    def add(self, part: Part) -> None:
        if isinstance(part, bytes):
            if part:
                self._buf.append(part)
        else:
            self._flush()
            self.parts.append(part)

    def _flush(self) -> None:
        if self._buf:
            self.parts.append(b"".join(self._buf))
            self._buf = []

    def done(self) -> list[Part]:
        self._flush()
        return self.parts


class BadRequest(ValueError):
    """A query Envoy would answer 400 to."""


_TYPES: dict[str, frozenset[Kind]] = {
    "All": frozenset(_KINDS),
    "Counters": frozenset(("counter",)),
    "Gauges": frozenset(("gauge",)),
    "Histograms": frozenset(("histogram",)),
    "TextReadouts": frozenset(),
}
PlanKey = tuple[str, str | None, bool, str]


class Template:
    """Every body of a sidecar with ``clusters`` service clusters of one Kuma
    generation, pre-rendered; a target only contributes its Snapshot."""

    PLAN_CACHE = 64  # distinct (format, filter, usedonly, type) kept

    def __init__(self, clusters: int, generation: FleetGeneration = "legacy",
                 workers: int = 2) -> None:
        if generation not in FLEET_GENERATIONS:
            raise ValueError(f"generation must be one of {FLEET_GENERATIONS}")
        self.generation, self.workers = generation, workers
        fams = families_of(generation)
        passthrough: list[Passthrough] = []
        infos: list[ClusterInfo] = []
        stats: list[Stat] = []
        listeners = 0
        lfields = _listener_fields(workers)
        lcounters = [s.replace("{w}", str(w)) for s in _LISTENER_COUNTERS
                     for w in (range(workers) if "{w}" in s else (0,))]
        lgauges = [s.replace("{w}", str(w)) for s in _LISTENER_GAUGES
                   for w in (range(workers) if "{w}" in s else (0,))]
        for j, fam in enumerate(fams):
            name, stat = _outbound_names(generation, fam)
            lprefix = _listener_prefix(generation, fam, _OUTBOUND_PORT, stat)
            passthrough.append(Passthrough(name, stat, fam, lprefix))
            infos.append(ClusterInfo(name, stat, False, j, IDLE))
            stats += _block(f"cluster.{stat}.", _CLUSTER_COUNTERS, _CLUSTER_GAUGES,
                            _CLUSTER_HISTOGRAMS, _CLUSTER_FIELDS, _CLUSTER_HISTS, None, j)
            stats += _block(f"tcp.{stat}.", _TCP_COUNTERS, _TCP_GAUGES, (), _TCP_FIELDS,
                            {}, None, j)
            stats += _block(f"listener.{lprefix}.", lcounters, lgauges, _LISTENER_HISTOGRAMS,
                            lfields, _LISTENER_HISTS, None, j)
            listeners += 1
            inbound = _inbound_names(generation, fam)
            if inbound is not None:
                iname, istat = inbound
                iprefix = _listener_prefix(generation, fam, _INBOUND_PORT, istat)
                infos.append(ClusterInfo(iname, istat, False, -1, IDLE))
                stats += _block(f"cluster.{istat}.", _CLUSTER_COUNTERS, _CLUSTER_GAUGES,
                                _CLUSTER_HISTOGRAMS, _CLUSTER_FIELDS, _CLUSTER_HISTS, IDLE, -1)
                stats += _block(f"tcp.{istat}.", _TCP_COUNTERS, _TCP_GAUGES, (),
                                _TCP_FIELDS, {}, IDLE, -1)
                stats += _block(f"listener.{iprefix}.", lcounters, lgauges,
                                _LISTENER_HISTOGRAMS, lfields, _LISTENER_HISTS, IDLE, -1)
                listeners += 1
        # Kuma's system clusters, then one cluster per service of the mesh.
        static = [("ads_cluster", ClusterState(1, 1, 90211, 5400012, hosts=(
                      HostState("10.0.0.2", 5678, 1, 1),)), False),
                  ("access_log_sink", ClusterState(hosts=(HostState("127.0.0.1", 1234, 0),)),
                   False),
                  ("kuma:envoy:admin", ClusterState(hosts=(HostState("127.0.0.1", 9901, 0),)),
                   False),
                  ("localhost:8080", _service_state(0, 8080), False)]
        for i in range(clusters):
            port = _SERVICE_PORTS[i % len(_SERVICE_PORTS)]
            static.append((service_cluster_name(i), _service_state(i + 1, port), True))
        cluster_hists = dict(_CLUSTER_HISTS)
        cluster_hists["upstream_rq_per_cx"] = (1.05, lambda s: s.cx_total - s.cx_active)
        for name, state, eds in static:
            stat = name.replace(":", "_")
            infos.append(ClusterInfo(name, stat, eds, -1, state))
            stats += _block(f"cluster.{stat}.", _CLUSTER_COUNTERS, _CLUSTER_GAUGES,
                            _CLUSTER_HISTOGRAMS, _CLUSTER_FIELDS, cluster_hists, state, -1)
        stats += _global_stats(len(infos), listeners, workers)
        self.passthrough: tuple[Passthrough, ...] = tuple(passthrough)
        self.names: tuple[str, ...] = tuple(p.stat_name for p in passthrough)
        self.stats = stats
        # Text: counters and gauges sorted by name, then histograms sorted.
        self._text_order = (sorted((s for s in stats if s.kind != "histogram"),
                                   key=lambda s: s.name.encode())
                            + sorted((s for s in stats if s.kind == "histogram"),
                                     key=lambda s: s.name.encode()))
        self._prom_groups: dict[Kind, list[tuple[str, list[Stat]]]] | None = None
        # /clusters lists clusters in hash-map order: a fixed shuffle stands for it.
        self.clusters = infos
        self._cluster_order = list(infos)
        random.Random(f"clusters:{clusters}:{generation}").shuffle(self._cluster_order)
        self._plans: OrderedDict[PlanKey, list[Part]] = OrderedDict()
        self._regex: dict[str, re.Pattern[str]] = {}

    # -- /stats

    def _groups(self) -> dict[Kind, list[tuple[str, list[Stat]]]]:
        """Prometheus: per kind, groups sorted by tag-extracted name, members by
        name.  Built on first use: tag extraction is most of a template's cost."""
        if self._prom_groups is None:
            for st in self.stats:
                st.prom = prometheus_series(st.name)
            by_kind: dict[Kind, list[tuple[str, list[Stat]]]] = {}
            for kind in _KINDS:
                groups: dict[str, list[Stat]] = {}
                for st in self.stats:
                    if st.kind == kind:
                        groups.setdefault(st.prom[0], []).append(st)
                by_kind[kind] = [(g, sorted(groups[g], key=lambda s: s.name.encode()))
                                 for g in sorted(groups, key=str.encode)]
            self._prom_groups = by_kind
        return self._prom_groups

    def plan(self, fmt: Literal["text", "prometheus"], filter_regex: str | None,
             usedonly: bool, type_: str = "All") -> list[Part]:
        """The parts of a ``/stats`` answer; built once per key, then cached."""
        if type_ not in _TYPES:
            raise BadRequest("invalid &type= param")
        key: PlanKey = (fmt, filter_regex or None, usedonly, type_)
        parts = self._plans.get(key)
        if parts is not None:
            self._plans.move_to_end(key)
            return parts
        rx = self._compile(filter_regex) if filter_regex else None
        kinds = _TYPES[type_]
        build = self._text_plan if fmt == "text" else self._prom_plan
        parts = build(rx, usedonly, kinds)
        self._plans[key] = parts
        if len(self._plans) > self.PLAN_CACHE:
            self._plans.popitem(last=False)
        return parts

    def _compile(self, regex: str) -> re.Pattern[str]:
        rx = self._regex.get(regex)
        if rx is None:
            try:
                rx = re.compile(regex)
            except re.error as exc:
                raise BadRequest(f"Invalid re2 regex: {exc}") from None
            if len(self._regex) > 4 * self.PLAN_CACHE:
                self._regex.clear()
            self._regex[regex] = rx
        return rx

    def _text_plan(self, rx: re.Pattern[str] | None, usedonly: bool,
                   kinds: frozenset[Kind]) -> list[Part]:
        out = _Parts()
        for st in self._text_order:
            if st.kind in kinds and (rx is None or rx.search(st.name) is not None):
                out.add(_text_part(st, usedonly))
        return out.done()

    def _prom_plan(self, rx: re.Pattern[str] | None, usedonly: bool,
                   kinds: frozenset[Kind]) -> list[Part]:
        out = _Parts()
        for kind in _KINDS:
            if kind not in kinds:
                continue
            for _, members in self._groups()[kind]:
                chosen = [m for m in members if rx is None or rx.search(m.name) is not None]
                if not chosen:
                    continue
                group = _Parts()
                for m in chosen:
                    group.add(_prom_part(m, usedonly))
                parts = group.done()
                header = f"# TYPE {chosen[0].prom[1]} {kind}\n".encode()
                if not usedonly:
                    # Every member prints: no need to hold the header back.
                    out.add(header)
                    for p in parts:
                        out.add(p)
                elif all(isinstance(p, bytes) for p in parts):
                    if parts:  # usedonly may have hidden every member
                        out.add(header + b"".join(cast(list[bytes], parts)))
                else:
                    out.add(_Group(header, parts))
        return out.done()

    def stats_chunks(self, snap: Snapshot, fmt: Literal["text", "prometheus"],
                     filter_regex: str | None = None, usedonly: bool = False,
                     type_: str = "All") -> list[bytes]:
        """The ``/stats`` body as chunks: mostly the plan's own pre-rendered bytes,
        so a big body is sent without being copied into one buffer first."""
        return _chunks(self.plan(fmt, filter_regex, usedonly, type_), snap)

    def render_stats(self, snap: Snapshot, fmt: Literal["text", "prometheus"],
                     filter_regex: str | None = None, usedonly: bool = False,
                     type_: str = "All") -> bytes:
        return b"".join(self.stats_chunks(snap, fmt, filter_regex, usedonly, type_))

    # -- /clusters

    def clusters_chunks(self, snap: Snapshot, fmt: Literal["text", "json"]) -> list[bytes]:
        key: PlanKey = ("clusters-" + fmt, None, False, "")
        parts = self._plans.get(key)
        if parts is None:
            parts = self._clusters_text() if fmt == "text" else self._clusters_json()
            self._plans[key] = parts
        return _chunks(parts, snap)

    def render_clusters(self, snap: Snapshot, fmt: Literal["text", "json"]) -> bytes:
        return b"".join(self.clusters_chunks(snap, fmt))

    def _clusters_text(self) -> list[Part]:
        out = _Parts()
        for info in self._cluster_order:
            if info.live >= 0:
                out.add(_ClusterText(info))
            else:
                out.add(_cluster_text(info, info.state))
        return out.done()

    def _clusters_json(self) -> list[Part]:
        # Render the whole document once with a placeholder per live cluster,
        # then cut it there: the static clusters never go through json again.
        marks: dict[str, ClusterInfo] = {}
        items: list[Any] = []
        for info in self._cluster_order:
            if info.live >= 0:
                mark = f"@@live-cluster-{info.live}@@"
                marks[mark] = info
                items.append(mark)
            else:
                items.append(_cluster_json(info, info.state))
        doc = json.dumps({"cluster_statuses": items}, indent=1)
        out = _Parts()
        for piece in re.split(r'("@@live-cluster-\d+@@")', doc):
            live = marks.get(piece.strip('"'))
            out.add(_ClusterJson(live) if live is not None else piece.encode())
        return out.done()


def _text_part(st: Stat, usedonly: bool) -> Part:
    head = f"{st.name}: ".encode()
    if st.kind == "histogram":
        if st.count_fn is not None:
            return _TextHist(head, st.count_fn, st.sample, usedonly)
        if st.count > 0:
            return head + _recorded(st.sample) + b"\n"
        return b"" if usedonly else head + b"No recorded values\n"
    if st.fn is not None:
        return _Scalar(head, st.fn, usedonly)
    return b"" if usedonly and not st.used else b"%s%d\n" % (head, st.value)


def _prom_part(st: Stat, usedonly: bool) -> Part:
    _, metric, labels = st.prom
    if st.kind == "histogram":
        if st.count_fn is not None:
            return _PromHist(st, usedonly)
        if usedonly and st.count == 0:
            return b""
        return _prom_hist_lines(metric, labels, st.sample, st.count)
    head = f"{metric}{{{labels}}} ".encode()
    if st.fn is not None:
        return _Scalar(head, st.fn, usedonly)
    return b"" if usedonly and not st.used else b"%s%d\n" % (head, st.value)


_THRESHOLDS = (("max_connections", 1024), ("max_pending_requests", 1024),
               ("max_requests", 1024), ("max_retries", 3))


def _cluster_text(info: ClusterInfo, state: ClusterState) -> bytes:
    n = info.name
    lines = [f"{n}::observability_name::{info.stat_name}"]
    for prio in ("default_priority", "high_priority"):
        lines += [f"{n}::{prio}::{k}::{v}" for k, v in _THRESHOLDS]
    lines.append(f"{n}::added_via_api::{'true' if info.eds else 'false'}")
    for h in state.hosts:
        p = f"{n}::{h.endpoint}::"
        # ORIGINAL_DST hosts are named after the cluster and the address, glued
        # together (Envoy does exactly this); EDS endpoints have no hostname.
        hostname = "" if info.eds or info.live < 0 else n + h.endpoint
        lines += [f"{p}cx_active::{h.cx_active}", f"{p}cx_connect_fail::{h.connect_fail}",
                  f"{p}cx_total::{h.cx_total}", f"{p}rq_active::{h.cx_active}",
                  f"{p}rq_error::{h.connect_fail}", f"{p}rq_pending_active::0",
                  f"{p}rq_success::0", f"{p}rq_timeout::0", f"{p}rq_total::{h.cx_total}",
                  f"{p}hostname::{hostname}", f"{p}health_flags::healthy", f"{p}weight::1",
                  f"{p}region::", f"{p}zone::", f"{p}sub_zone::", f"{p}canary::false",
                  f"{p}priority::0", f"{p}success_rate::-1",
                  f"{p}local_origin_success_rate::-1"]
    return ("\n".join(lines) + "\n").encode()


def _metric(name: str, value: int, gauge: bool = False) -> dict[str, str]:
    # Proto3 JSON: zero values are left out, uint64 is a string, COUNTER is the default.
    out: dict[str, str] = {"type": "GAUGE"} if gauge else {}
    if value:
        out["value"] = str(value)
    out["name"] = name
    return out


def _cluster_json(info: ClusterInfo, state: ClusterState) -> dict[str, Any]:
    out: dict[str, Any] = {"name": info.name}
    if info.eds:
        out["added_via_api"] = True
    if state.hosts:
        hosts = []
        for h in state.hosts:
            host: dict[str, Any] = {
                "address": {"socket_address": {"address": h.address, "port_value": h.port}},
                "stats": [_metric("cx_connect_fail", h.connect_fail),
                          _metric("cx_total", h.cx_total), _metric("rq_error", h.connect_fail),
                          _metric("rq_success", 0), _metric("rq_timeout", 0),
                          _metric("rq_total", h.cx_total),
                          _metric("cx_active", h.cx_active, True),
                          _metric("rq_active", h.cx_active, True),
                          _metric("rq_pending_active", 0, True)],
                "health_status": {"eds_health_status": "HEALTHY"},
                "weight": 1,
            }
            if not info.eds and info.live >= 0:
                host["hostname"] = info.name + h.endpoint
            host["locality"] = {}
            hosts.append(host)
        out["host_statuses"] = hosts
    thresholds: list[dict[str, Any]] = [dict(_THRESHOLDS),
                                        {"priority": "HIGH", **dict(_THRESHOLDS)}]
    out["circuit_breakers"] = {"thresholds": thresholds}
    out["observability_name"] = info.stat_name
    return out


class _ClusterText(_Live):
    __slots__ = ("info",)

    def __init__(self, info: ClusterInfo) -> None:
        self.info = info

    def render(self, snap: Snapshot) -> bytes:
        return _cluster_text(self.info, snap.clusters[self.info.live])


class _ClusterJson(_Live):
    __slots__ = ("info",)

    def __init__(self, info: ClusterInfo) -> None:
        self.info = info

    def render(self, snap: Snapshot) -> bytes:
        doc = json.dumps(_cluster_json(self.info, snap.clusters[self.info.live]), indent=1)
        # Nested two levels deep in the document rendered with indent=1.
        return doc.replace("\n", "\n  ").encode()


# --------------------------------------------------------------------------- the fleet

_HEADERS = {"Cache-Control": "no-cache, max-age=0", "X-Content-Type-Options": "nosniff"}
_STREAM_ABOVE = 1 << 20  # bodies larger than this are streamed, not joined
_SLICE = 1 << 18
_HELP = (b"invalid path. admin commands are:\n  /clusters: upstream cluster status\n"
         b"  /ready: print server state, return 200 if LIVE, otherwise return 503\n"
         b"  /server_info: print server version/status information\n"
         b"  /stats: print server stats\n  /stats/prometheus: print server stats in "
         b"prometheus format\n")


@dataclass
class Fleet:
    """A running simulator; see ``start_fleet``."""

    template: Template
    specs: list[TargetSpec]
    clock: Callable[[], float] = time.time
    host: str = "127.0.0.1"
    port: int = 0
    _runner: web.AppRunner | None = field(default=None, repr=False)

    @property
    def targets(self) -> int:
        return len(self.specs)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT/dp/``: append a target number for its base URL."""
        return f"http://{self.host}:{self.port}/dp/"

    def base_url(self, n: int) -> str:
        """Admin base URL of target ``n`` (what passguard's ``targets[].url`` takes)."""
        if not 0 <= n < len(self.specs):
            raise IndexError(f"target {n} not in 0..{len(self.specs) - 1}")
        return f"{self.url}{n}"

    def pattern(self, n: int) -> Pattern:
        return self.specs[n].pattern

    def expected(self, n: int, t: float | None = None) -> Snapshot:
        """Ground truth of target ``n`` at time ``t`` (default: the fleet's clock now);
        the admin answers exactly this at that instant."""
        return self.specs[n].snapshot(self.clock() if t is None else t, self.template.names)

    # -- HTTP

    def app(self) -> web.Application:
        app = web.Application()
        r = app.router
        r.add_get(r"/dp/{n:\d+}/stats", self._stats)
        r.add_get(r"/dp/{n:\d+}/stats/prometheus", self._prometheus)
        r.add_get(r"/dp/{n:\d+}/clusters", self._clusters)
        r.add_get(r"/dp/{n:\d+}/ready", self._ready)
        r.add_get(r"/dp/{n:\d+}/server_info", self._server_info)
        r.add_route("*", r"/dp/{n:\d+}{tail:.*}", self._unknown)
        return app

    def _snapshot(self, request: web.Request) -> Snapshot:
        n = int(request.match_info["n"])
        if n >= len(self.specs):
            raise web.HTTPNotFound(text=f"no simulated target {n} (fleet has {self.targets})\n")
        return self.specs[n].snapshot(self.clock(), self.template.names)

    @staticmethod
    def _reply(body: bytes, snap: Snapshot, status: int = 200,
               content_type: str = "text/plain") -> web.Response:
        # x-fleet-time: the instant the counters were computed for, so a
        # benchmark can compare what it scraped with expected(n, t) exactly.
        headers = {**_HEADERS, "x-fleet-time": repr(snap.t)}
        return web.Response(body=body, status=status, content_type=content_type,
                            charset="UTF-8" if content_type == "text/plain" else None,
                            headers=headers)

    async def _send(self, request: web.Request, chunks: list[bytes], snap: Snapshot,
                    content_type: str = "text/plain") -> web.StreamResponse:
        size = sum(map(len, chunks))
        if size <= _STREAM_ABOVE:
            return self._reply(b"".join(chunks), snap, content_type=content_type)
        # Tens of megabytes: write the pre-rendered chunks in slices instead of
        # joining them (a copy, and page faults on a fresh 40 MB buffer, per
        # request); drain() between slices keeps the transport's buffer small.
        resp = web.StreamResponse(headers={**_HEADERS, "x-fleet-time": repr(snap.t)})
        resp.content_type = content_type
        if content_type == "text/plain":
            resp.charset = "UTF-8"
        resp.content_length = size
        await resp.prepare(request)
        for chunk in chunks:
            view = memoryview(chunk)
            for start in range(0, len(view), _SLICE):
                await resp.write(view[start:start + _SLICE])
        await resp.write_eof()
        return resp

    async def _stats_reply(self, request: web.Request, fmt: str) -> web.StreamResponse:
        snap = self._snapshot(request)
        q = request.query
        if fmt not in ("text", "prometheus"):
            if fmt == "json":
                text = "format=json is not simulated by bench/fleet.py (use text or prometheus)\n"
            else:
                text = "usage: /stats?format=(html|active-html|json|prometheus|text)\n\n"
            return self._reply(text.encode(), snap, 400)
        try:
            chunks = self.template.stats_chunks(
                snap, cast(Literal["text", "prometheus"], fmt), q.get("filter"),
                # Envoy takes the parameter's presence: usedonly=false still hides.
                "usedonly" in q, q.get("type", "All"))
        except BadRequest as exc:
            return self._reply(str(exc).encode(), snap, 400)
        return await self._send(request, chunks, snap)

    async def _stats(self, request: web.Request) -> web.StreamResponse:
        return await self._stats_reply(request, request.query.get("format", "text"))

    async def _prometheus(self, request: web.Request) -> web.StreamResponse:
        return await self._stats_reply(request, "prometheus")

    async def _clusters(self, request: web.Request) -> web.StreamResponse:
        snap = self._snapshot(request)
        if request.query.get("format") == "json":
            return await self._send(request, self.template.clusters_chunks(snap, "json"), snap,
                                    content_type="application/json")
        return await self._send(request, self.template.clusters_chunks(snap, "text"), snap)

    async def _ready(self, request: web.Request) -> web.Response:
        return self._reply(b"LIVE\n", self._snapshot(request))

    async def _server_info(self, request: web.Request) -> web.Response:
        snap = self._snapshot(request)
        n = request.match_info["n"]
        info = {
            "version": ENVOY_VERSION,
            "state": "LIVE",
            "uptime_current_epoch": f"{snap.uptime}s",
            "uptime_all_epochs": f"{snap.uptime}s",
            "hot_restart_version": "disabled",
            "command_line_options": {"concurrency": self.template.workers,
                                     "base_id": "0", "mode": "Serve"},
            "node": {"id": f"default.dp-{n}", "cluster": f"dp-{n}"},
        }
        return self._reply(json.dumps(info, indent=1).encode(), snap,
                           content_type="application/json")

    async def _unknown(self, request: web.Request) -> web.Response:
        return self._reply(_HELP, self._snapshot(request), 404)

    # -- life cycle

    async def start(self) -> None:
        # No access log: at thousands of requests per second it would be the
        # bottleneck.  The backlog absorbs a scraper opening hundreds of
        # connections at once.
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        # Bind the socket ourselves: port 0 gives a free port we can read back.
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(4096)
            sock.setblocking(False)
            self.port = sock.getsockname()[1]
            await web.SockSite(self._runner, sock, backlog=4096).start()
        except BaseException:
            sock.close()
            await self.stop()
            raise

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()


async def start_fleet(
    targets: int,
    clusters: int = 500,
    *,
    generation: FleetGeneration = "legacy",
    seed: int = 0,
    patterns: Mapping[Pattern, float] | str | None = None,
    overrides: Mapping[int, TargetSpec] | None = None,
    clock: Callable[[], float] = time.time,
    host: str = "127.0.0.1",
    port: int = 0,
    workers: int = 2,
) -> Fleet:
    """Build and start a fleet of ``targets`` simulated sidecars with ``clusters``
    service clusters each; ``await fleet.stop()`` (or ``async with``) ends it.

    ``patterns`` weighs the traffic patterns (default ``DEFAULT_MIX``);
    ``overrides`` replaces chosen targets' specs (tests pin exact traffic);
    ``clock`` is the time counters are computed for (tests freeze it)."""
    if targets < 1 or clusters < 0:
        raise ValueError("need targets >= 1 and clusters >= 0")
    mix = parse_mix(patterns) if isinstance(patterns, str) else dict(patterns or DEFAULT_MIX)
    template = _template(clusters, generation, workers)
    fams = families_of(generation)
    t0 = clock()
    specs = [make_spec(n, p, fams, seed, t0)
             for n, p in enumerate(assign_patterns(targets, mix, seed))]
    for n, spec in (overrides or {}).items():
        specs[n] = spec
    fleet = Fleet(template, specs, clock, host, port)
    await fleet.start()
    return fleet


_TEMPLATES: dict[tuple[int, str, int], Template] = {}


def _template(clusters: int, generation: FleetGeneration, workers: int) -> Template:
    """Templates are immutable apart from their plan cache: share them."""
    key = (clusters, generation, workers)
    if key not in _TEMPLATES:
        _TEMPLATES[key] = Template(clusters, generation, workers)
    return _TEMPLATES[key]


# --------------------------------------------------------------------------- measurement

_SCRIPT = Path(__file__).resolve()


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _load(session: aiohttp.ClientSession, url: str, targets: int, suffix: str,
                duration: float, concurrency: int, rate: float = 0.0) -> tuple[int, int]:
    """Round-robin GETs over all targets for ``duration`` s: (requests, bytes).
    With ``rate``, request i starts at i/rate s (a scraper's steady pace)."""
    counter = iter(range(1 << 62))
    done = [0, 0]
    start = time.monotonic()
    end = start + duration

    async def worker() -> None:
        while time.monotonic() < end:
            i = next(counter)
            if rate:
                await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            n = i % targets
            async with session.get(f"{url}{n}{suffix}") as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"target {n}: HTTP {resp.status}: {body[:200]!r}")
            done[0] += 1
            done[1] += len(body)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done[0], done[1]


async def measure(args: argparse.Namespace) -> int:
    """Start the simulator as a child process, load it with an aiohttp client,
    and report throughput, CPU of both sides and the simulator's RSS."""
    cmd = [sys.executable, str(_SCRIPT), "--targets", str(args.targets),
           "--clusters", str(args.clusters), "--generation", args.generation,
           "--seed", str(args.seed), "--port", "0"]
    if args.patterns:
        cmd += ["--patterns", args.patterns]
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 600)).decode()
        if not line.startswith("READY "):
            raise RuntimeError(f"simulator did not start: {line!r}")
        url = line.split()[1]
        print(f"simulator pid {proc.pid}: {args.targets} targets x {args.clusters} clusters "
              f"({args.generation}), RSS after start {_proc_rss_mb(proc.pid):.1f} MiB")
        filt = "/stats?filter=" + quote(stats_filter(DEFAULT_CLUSTERS_PATTERN), safe="")
        modes = {"filtered": filt, "unfiltered": "/stats", "clusters": "/clusters",
                 "prometheus": "/stats/prometheus"}
        chosen = list(modes) if args.measure == "all" else [args.measure]
        if args.measure == "memory":
            chosen = []
        connector = aiohttp.TCPConnector(limit=args.concurrency, limit_per_host=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            # Warm-up: build the plans once (the first answer for a new filter
            # matches it against the whole template).
            for suffix in modes.values():
                await _load(session, url, 1, suffix, 0.01, 1)
            for mode in chosen:
                srv0, cli0, t0 = _proc_cpu(proc.pid), time.process_time(), time.monotonic()
                n, nbytes = await _load(session, url, args.targets, modes[mode],
                                        args.duration, args.concurrency, args.rate)
                wall = time.monotonic() - t0
                srv, cli = _proc_cpu(proc.pid) - srv0, time.process_time() - cli0
                print(f"{mode:>10}: {n} requests in {wall:.1f}s = {n / wall:,.0f} req/s, "
                      f"{nbytes / n:,.0f} B/answer, {nbytes / wall / 1e6:,.1f} MB/s; CPU "
                      f"simulator {100 * srv / wall:.0f}% vs client {100 * cli / wall:.0f}%; "
                      f"simulator capacity ~{n / max(srv, 1e-9):,.0f} req per CPU-second")
            # Every target answered at least once (filtered), so any per-target
            # cost would show in the RSS now.
            srv0 = _proc_cpu(proc.pid)
            t0 = time.monotonic()
            for start in range(0, args.targets, 1000):
                await asyncio.gather(*(_one(session, f"{url}{n}{filt}")
                                       for n in range(start, min(start + 1000, args.targets))))
            wall = time.monotonic() - t0
            print(f"full pass over {args.targets} targets (filtered): {wall:.2f}s, simulator "
                  f"CPU {_proc_cpu(proc.pid) - srv0:.2f}s; RSS now "
                  f"{_proc_rss_mb(proc.pid):.1f} MiB")
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()
    return 0


async def _one(session: aiohttp.ClientSession, url: str) -> None:
    async with session.get(url) as resp:
        await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}")


# --------------------------------------------------------------------------- CLI


async def serve(args: argparse.Namespace) -> int:
    fleet = await start_fleet(args.targets, args.clusters, generation=args.generation,
                              seed=args.seed, patterns=args.patterns, host=args.host,
                              port=args.port, workers=args.workers)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY {fleet.url} {fleet.targets}", flush=True)
    try:
        await stop.wait()
    finally:
        await fleet.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python bench/fleet.py",
        description="Serve thousands of simulated Envoy admin APIs (Kuma sidecars) "
                    "under http://HOST:PORT/dp/N.")
    p.add_argument("--targets", type=int, default=1000, help="simulated sidecars (default 1000)")
    p.add_argument("--clusters", type=int, default=500,
                   help="service clusters per sidecar (default 500)")
    p.add_argument("--port", type=int, default=0, help="TCP port (default: any free one)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--generation", choices=FLEET_GENERATIONS, default="legacy",
                   help="Kuma naming generation of the passthrough clusters")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--patterns", default=None,
                   help="traffic mix, e.g. idle=0.7,steady=0.2,bursty=0.05,restarting=0.05")
    p.add_argument("--workers", type=int, default=2, help="Envoy worker threads simulated")
    p.add_argument("--measure", choices=("filtered", "unfiltered", "clusters", "prometheus",
                                         "memory", "all"),
                   help="instead of serving: start a simulator child and benchmark it")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per --measure mode")
    p.add_argument("--concurrency", type=int, default=64, help="client connections (--measure)")
    p.add_argument("--rate", type=float, default=0.0,
                   help="--measure at this many requests/s instead of as fast as possible "
                        "(passguard's pace: targets / scrape interval, 10000/15 = 667)")
    args = p.parse_args(argv)
    if args.patterns:
        try:
            parse_mix(args.patterns)
        except ValueError as exc:
            p.error(str(exc))
    if args.targets < 1 or args.clusters < 0:
        p.error("--targets must be >= 1 and --clusters >= 0")
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(measure(args) if args.measure else serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
