"""Source ``kuma``: dataplanes discovered from the Kuma control plane API.

One discovery pass lists the meshes (``GET /meshes``), keeps those that match
``meshes`` (shell-style patterns: ``["*"]``, ``["prod-*", "staging"]``), and
lists each mesh's dataplanes with their insight
(``GET /meshes/{mesh}/dataplanes/_overview``; Kuma versions without that path
answer 404 there and are asked ``/meshes/{mesh}/dataplanes+insights``, the
older path with the same ``DataplaneOverview`` items).  Every list is followed
page by page (``offset``/``size``/``next``) to the end.

Each dataplane becomes a ``Target``:

* ``stats: inspect`` (default): ``url`` is the dataplane's inspect base,
  ``{cp}/meshes/{mesh}/dataplanes/{name}``; ``+ "/stats"`` and ``+
  "/clusters"`` are Kuma's inspect endpoints, which answer with the full,
  unfiltered Envoy text.  They need the CP token: ``headers_for(target)``.
* ``stats: kuma-dp``: ``url`` is ``http://{networking.address}:5670`` (port
  and path from the dataplane's or the mesh's Prometheus metrics backend when
  set) and the body is Prometheus text (``passguard.envoy.promtext``).  The CP
  token is never sent there: it would leak to whatever answers on a
  dataplane's address.  Address, port and path are data from a Dataplane
  object, i.e. from whoever may write one, so they are checked before any
  request: the address must be an IP literal (no name to resolve, nothing
  that turns into another host, port or path in a URL), not unspecified,
  multicast or link-local (cloud metadata lives at 169.254.169.254) unless
  ``allowed_cidrs`` names it, and inside ``allowed_cidrs`` when that is set;
  the port a port number and the path a plain URL path.  A dataplane that
  fails is a failed target with the reason, never read, and the others are
  unaffected (``metrics_endpoint``).

What an operator relies on, and why it is built this way:

* **A failed pass changes nothing.**  The CP being down, a 401, a slow
  answer, a page that is not the expected shape: the last known dataplanes
  are kept (per mesh: a mesh whose listing failed keeps its list while the
  others are updated), and the problem is in ``last_error`` with
  ``last_success`` telling how old the list is.  A dataplane that vanished
  from a *successful* listing is dropped, and so is a mesh that is gone.
  Dropping a target deletes its evidence downstream, so a listing that cannot
  be trusted to be complete must never be taken as the truth: a ``next`` that
  does not advance, an empty page that points further, or a ``total`` that
  does not match the distinct items received (offset pagination skips or
  repeats items when dataplanes come and go during the listing: the listing
  is retried, then refused) are errors, not a shorter list.
* **Offline** follows Kuma's own ``DataplaneInsight.IsOnline()``: online when
  *any* subscription has a ``connectTime`` and no ``disconnectTime``; no
  insight or no such subscription is offline.  "Any" is also the safe side:
  a stale open subscription left by a dead CP instance makes a proxy look
  online, so it is scraped and, if really gone, shows up as failed (unknown
  to the gate) instead of being excused as offline.  Inbound health
  (``inbound[].health.ready``, which kumactl folds into its STATUS column) is
  ignored on purpose: an unhealthy application's proxy still forwards its
  outbound passthrough traffic.
* The token file is re-read at every pass (tokens rotate); the CA file is
  re-read when it changes.
* Every request is bounded in time and size, and the whole pass is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import re
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal
from urllib.parse import parse_qs, quote, urlsplit

import aiohttp

from passguard.documents import Resource, parse_resource
from passguard.envoy.excerpt import for_log
from passguard.errors import InputError, PassguardError
from passguard.httpclient import (
    ClientTLS,
    HttpProblem,
    bearer,
    exchange,
    http_problem,
    read_bounded,
    secret,
)
from passguard.policy.model import GatewayType, MeshFlag, MeshState, Policy, Proxy, Version
from passguard.sources.settings import KumaSourceConfig, Network
from passguard.targets import Target

log = logging.getLogger(__name__)

StatsFormat = Literal["envoy", "prometheus"]

# kuma-dp's merged Prometheus endpoint (Mesh metrics backend defaults).
DEFAULT_METRICS_PORT = 5670
DEFAULT_METRICS_PATH = "/metrics"
# Paths of the dataplane list with insights, newest first.
OVERVIEW_PATHS = ("/dataplanes/_overview", "/dataplanes+insights")
# Guards against a CP (or something in front of it) that paginates forever.
MAX_PAGES = 10_000
# A listing whose `total` disagrees with what the pages held is retried this
# often before the pass gives up on that list.
LIST_ATTEMPTS = 3
# Meshes listed at once: enough to hide latency, few enough not to load the CP.
MESH_CONCURRENCY = 8
_SERVICE_TAGS = ("kuma.io/service", "service")  # "service" before Kuma 0.4
# appendMatch entries of one policy the CP lists: its own policies are not a
# request's, but still bounded (a page is bounded by max_response_bytes too).
CP_MAX_MATCHES = 100_000


class KumaApiError(PassguardError):
    """The CP could not be asked, refused, or answered something unusable."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------- wire format


@dataclass(frozen=True, slots=True)
class MeshInfo:
    name: str
    # The mesh's enabled Prometheus backend, for `stats: kuma-dp`.
    metrics_port: int | None = None
    metrics_path: str | None = None
    # networking.outbound.passthrough as the CP holds it (None: not written).
    passthrough: bool | None = None
    # Why the backend's port or path cannot be used: its dataplanes fail in
    # kuma-dp mode; the listing (and inspect mode) is unaffected.
    metrics_problem: str | None = None


@dataclass(frozen=True, slots=True)
class DataplaneInfo:
    """What passguard keeps of one ``DataplaneOverview`` (or ``Dataplane``) item."""

    mesh: str
    name: str
    address: str | None
    # `kuma.io/service` (or the pre-0.4 `service`) of each inbound, or of the
    # gateway, in order and without repeats; `service` is the first.
    services: tuple[str, ...]
    # Inbound/gateway tags (first value wins when inbounds disagree), then the
    # resource labels (`kuma.io/zone`, `k8s.kuma.io/namespace`, …) for keys
    # not already tagged: targetRef `Dataplane` + labels selects on labels,
    # `MeshSubset` on tags, and both look here.
    tags: Mapping[str, str]
    # None: the item carried no insight at all (a plain `Dataplane` list).
    online: bool | None
    gateway: bool = False
    metrics_port: int | None = None
    metrics_path: str | None = None
    # Why the dataplane's metrics port or path cannot be used (kuma-dp mode
    # fails this one target with it; nothing else depends on them).
    metrics_problem: str | None = None
    # What MeshPassthrough selection needs (docs/semantics.md): each inbound's
    # own tags (a gateway's tags as its one "inbound"), names and ports; the
    # resource labels; transparent proxying; the gateway type.
    inbounds: tuple[Mapping[str, str], ...] = ()
    inbound_names: tuple[str | None, ...] = ()
    inbound_ports: tuple[int | None, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    transparent: bool | None = None
    gateway_type: GatewayType | None = None
    # Wall time of the latest disconnect, for an offline dataplane.
    disconnected_at: float | None = None

    @property
    def service(self) -> str:
        return self.services[0] if self.services else ""

    def proxy(self) -> Proxy:
        return Proxy(self.mesh, self.name, self.inbounds, self.labels, self.inbound_names,
                     self.inbound_ports, self.transparent, False, self.gateway_type)


@dataclass(frozen=True, slots=True)
class ListPage:
    items: list[Any]
    total: int | None
    next: str | None


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise KumaApiError(f"{where} must be an object, got {_kind(value)}")
    return value


def _opt_obj(parent: dict[str, Any], key: str, where: str) -> dict[str, Any] | None:
    value = parent.get(key)
    return None if value is None else _obj(value, f"{where}.{key}")


def _opt_list(parent: dict[str, Any], key: str, where: str) -> list[Any]:
    value = parent.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise KumaApiError(f"{where}.{key} must be a list, got {_kind(value)}")
    return value


def _opt_str(parent: dict[str, Any], key: str, where: str) -> str | None:
    value = parent.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise KumaApiError(f"{where}.{key} must be a string, got {_kind(value)}")
    return value


def _req_str(parent: dict[str, Any], key: str, where: str) -> str:
    value = _opt_str(parent, key, where)
    if not value:
        raise KumaApiError(f"{where}.{key} is missing or empty")
    return value


def _opt_port(parent: dict[str, Any], key: str, where: str) -> int | None:
    value = parent.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise KumaApiError(f"{where}.{key} must be a port number, got {value!r}")
    return value


def _str_map(parent: dict[str, Any], key: str, where: str) -> dict[str, str]:
    value = parent.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise KumaApiError(f"{where}.{key} must be a mapping of strings, got {_kind(value)}"
                           if not isinstance(value, dict) else
                           f"{where}.{key} must map strings to strings")
    return value


def parse_list_page(body: Any, where: str) -> ListPage:
    """``{"items": [...], "total": N, "next": url|null}``."""
    doc = _obj(body, where)
    if "items" not in doc:
        raise KumaApiError(f"{where}: the answer has no items (not a Kuma list)")
    items = _opt_list(doc, "items", where)
    total = doc.get("total")
    if total is not None and (isinstance(total, bool) or not isinstance(total, int | float)
                              or (isinstance(total, float) and not math.isfinite(total))
                              or total < 0
                              or total != int(total)):
        raise KumaApiError(f"{where}.total must be a whole number, got {total!r}")
    return ListPage(items, None if total is None else int(total), _opt_str(doc, "next", where))


def parse_mesh_item(item: Any, where: str) -> MeshInfo:
    doc = _obj(item, where)
    name = _req_str(doc, "name", where)
    port = path = problem = None
    metrics = _opt_obj(doc, "metrics", where)
    if metrics is not None:
        # Kuma's `Mesh.metrics`: the enabled backend, if it is Prometheus.
        enabled = _opt_str(metrics, "enabledBackend", f"{where}.metrics")
        for i, backend in enumerate(_opt_list(metrics, "backends", f"{where}.metrics")):
            bwhere = f"{where}.metrics.backends[{i}]"
            b = _obj(backend, bwhere)
            if enabled and b.get("name") == enabled and b.get("type", "prometheus") == "prometheus":
                conf = _opt_obj(b, "conf", bwhere) or {}
                port, path, problem = _metrics_conf(conf, f"{bwhere}.conf")
    outbound = _opt_obj(_opt_obj(doc, "networking", where) or {}, "outbound",
                        f"{where}.networking") or {}
    flag = outbound.get("passthrough")
    if flag is not None and not isinstance(flag, bool):
        raise KumaApiError(f"{where}.networking.outbound.passthrough must be true or false, "
                           f"got {_kind(flag)}")
    return MeshInfo(name, port, path, flag, problem)


def _metrics_conf(conf: dict[str, Any], where: str
                  ) -> tuple[int | None, str | None, str | None]:
    """A Prometheus backend's ``port`` and ``path``, and why they cannot be
    used (None when they can). Not raised: only ``stats: kuma-dp`` reads
    them, and there only the dataplanes that use them fail."""
    problem = None
    try:
        port = _opt_port(conf, "port", where)
    except KumaApiError as exc:
        port, problem = None, str(exc)
    try:
        path = _opt_str(conf, "path", where)
    except KumaApiError as exc:
        path, problem = None, problem or str(exc)
    if path is not None and problem is None and (why := path_problem(path)):
        problem = f"{where}.path {why}"
    return port, path, problem


# A URL path of unreserved and sub-delimiter characters and %XX escapes: no
# query, fragment, space or control character can ride along into the URL.
_PATH = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/]|%[0-9A-Fa-f]{2})*")
MAX_PATH = 1024


def path_problem(path: str) -> str | None:
    """Why ``path`` is not a usable metrics path, or None."""
    if len(path) > MAX_PATH:
        return f"is {len(path)} characters long (at most {MAX_PATH})"
    if not _PATH.fullmatch(path):
        return (f"'{for_log(path, 64)}' is not a plain URL path (letters, digits, "
                "-._~!$&'()*+,;=:@/ and %XX escapes; no query or fragment)")
    return None


def _bounded_problem(text: str) -> str:
    # A CP's value quoted in a reason is cut and escaped like any foreign text.
    return for_log(text, 300)


def parse_policy_item(item: Any, where: str, mesh: str) -> Policy:
    """A ``MeshPassthrough`` item of ``GET /meshes/{mesh}/meshpassthroughs``
    (the Universal form: ``type``, ``mesh``, ``name``, ``labels``, ``spec``)."""
    doc = _obj(item, where)
    if doc.get("mesh", mesh) != mesh:
        raise KumaApiError(f"{where}.mesh is {doc.get('mesh')!r} in a listing of mesh {mesh!r}")
    try:
        res = parse_resource({"type": "MeshPassthrough", "mesh": mesh,
                              **{k: v for k, v in doc.items() if k != "type"}}, where,
                             max_matches=CP_MAX_MATCHES)
    except InputError as exc:
        raise KumaApiError(str(exc)) from None
    if not isinstance(res, Resource):  # pragma: no cover - the type is set above
        raise KumaApiError(f"{where}: not a MeshPassthrough")
    return res.policy()


def parse_index(body: Any) -> Version | None:
    """The API index (``GET /``): ``version``, or ``basedOnKuma`` for Kong Mesh."""
    if not isinstance(body, dict):
        return None
    for key in ("basedOnKuma", "version"):
        value = body.get(key)
        if isinstance(value, str) and (v := Version.parse(value)) is not None:
            return v
    return None


def disconnected_at(insight: Any) -> float | None:
    """The latest ``disconnectTime`` of an insight's subscriptions (RFC 3339),
    or None when there is none that parses: an offline proxy whose last
    moment is unknown is treated as offline within the window."""
    if not isinstance(insight, dict) or not isinstance(insight.get("subscriptions"), list):
        return None
    times = []
    for sub in insight["subscriptions"]:
        when = sub.get("disconnectTime") if isinstance(sub, dict) else None
        if isinstance(when, str):
            with contextlib.suppress(ValueError):
                times.append(datetime.fromisoformat(when.replace("Z", "+00:00")).timestamp())
    return max(times) if times else None


def is_online(insight: Any, where: str) -> bool:
    """Kuma's ``DataplaneInsight.IsOnline()``: any subscription connected and not
    disconnected.  Times are RFC 3339 strings in the API (objects in the
    OpenAPI schema): only their presence matters."""
    if insight is None:
        return False
    doc = _obj(insight, where)
    for i, sub in enumerate(_opt_list(doc, "subscriptions", where)):
        s = _obj(sub, f"{where}.subscriptions[{i}]")
        if s.get("connectTime") and not s.get("disconnectTime"):
            return True
    return False


def parse_dataplane_item(item: Any, where: str, mesh: str | None = None) -> DataplaneInfo:
    """A ``DataplaneOverview`` item (``_overview`` / ``+insights``), or a plain
    ``Dataplane`` item (``GET /meshes/{mesh}/dataplanes``, no insight: online
    unknown).  Raises KumaApiError naming the first field that is wrong."""
    doc = _obj(item, where)
    name = _req_str(doc, "name", where)
    item_mesh = _opt_str(doc, "mesh", where)
    if mesh is not None and item_mesh is not None and item_mesh != mesh:
        raise KumaApiError(f"{where}.mesh is {item_mesh!r} in a listing of mesh {mesh!r}")
    mesh_name = item_mesh or mesh
    if not mesh_name:
        raise KumaApiError(f"{where}.mesh is missing or empty")

    overview = "dataplane" in doc
    if overview:
        spec_where = f"{where}.dataplane"
        spec = _obj(doc["dataplane"], spec_where)
        online: bool | None = is_online(doc.get("dataplaneInsight"), f"{where}.dataplaneInsight")
    else:
        spec_where, spec, online = where, doc, None
    net_where = f"{spec_where}.networking"
    net = _opt_obj(spec, "networking", spec_where) or {}
    address = _opt_str(net, "address", net_where) or None

    services: list[str] = []
    tags: dict[str, str] = {}
    tag_sets: list[tuple[dict[str, str], str]] = []
    names: list[str | None] = []
    ports: list[int | None] = []
    for i, inbound in enumerate(_opt_list(net, "inbound", net_where)):
        iwhere = f"{net_where}.inbound[{i}]"
        ib = _obj(inbound, iwhere)
        tag_sets.append((_str_map(ib, "tags", iwhere), iwhere))
        names.append(_opt_str(ib, "name", iwhere))
        ports.append(_opt_port(ib, "port", iwhere))
    gateway = _opt_obj(net, "gateway", net_where)
    gateway_type: GatewayType | None = None
    if gateway is not None:
        gwhere = f"{net_where}.gateway"
        tag_sets.append((_str_map(gateway, "tags", gwhere), gwhere))
        names.append(None)
        ports.append(None)
        # Kuma's Dataplane_Networking_Gateway_GatewayType: DELEGATED unless BUILTIN.
        raw_type = _opt_str(gateway, "type", gwhere)
        gateway_type = "builtin" if (raw_type or "").upper() == "BUILTIN" else "delegated"
    tproxy = _opt_obj(net, "transparentProxying", net_where)
    for tagset, _ in tag_sets:
        for key in _SERVICE_TAGS:
            svc = tagset.get(key)
            if svc:
                if svc not in services:
                    services.append(svc)
                break
        for k, v in tagset.items():
            tags.setdefault(k, v)
    labels = _str_map(doc, "labels", where)
    for k, v in labels.items():
        tags.setdefault(k, v)

    port = path = problem = None
    metrics = _opt_obj(spec, "metrics", spec_where)
    if metrics is not None:
        conf = _opt_obj(metrics, "conf", f"{spec_where}.metrics") or {}
        port, path, problem = _metrics_conf(conf, f"{spec_where}.metrics.conf")
    return DataplaneInfo(mesh=mesh_name, name=name, address=address, services=tuple(services),
                         tags=tags, online=online, gateway=gateway is not None,
                         metrics_port=port, metrics_path=path, metrics_problem=problem,
                         inbounds=tuple(t for t, _ in tag_sets), inbound_names=tuple(names),
                         inbound_ports=tuple(ports), labels=labels,
                         # Absent from the spec is not proof of no transparent
                         # proxy (newer kuma-dp report it in their metadata):
                         # unknown, and the policy is taken to apply.
                         transparent=True if tproxy is not None else None,
                         gateway_type=gateway_type,
                         disconnected_at=disconnected_at(doc.get("dataplaneInsight"))
                         if online is False else None)


# --------------------------------------------------------------------------- the source


@dataclass(frozen=True, slots=True)
class StatsRequest:
    """How to read one target's stats: ``GET base + path`` with ``headers``."""

    base: str
    path: str
    headers: Mapping[str, str]
    format: StatsFormat  # "envoy": StatsParser; "prometheus": PromStatsParser
    # Envoy `/clusters` (destinations) through the same base; None when the
    # mode has no such endpoint (kuma-dp serves metrics only).
    clusters_path: str | None
    # Why the target must not be read (see metrics_endpoint): it fails with it.
    invalid: str | None = None


@dataclass
class _State:
    meshes: dict[str, MeshInfo] = field(default_factory=dict)
    dataplanes: dict[str, list[DataplaneInfo]] = field(default_factory=dict)
    # The MeshPassthrough policies of each mesh, and when the mesh was last
    # listed completely (its dataplanes and its policies in one pass).
    policies: dict[str, tuple[Policy, ...]] = field(default_factory=dict)
    listed_at: dict[str, float] = field(default_factory=dict)
    version: Version | None = None


class KumaSource:
    """Discovery from one Kuma CP.  ``discover()`` is one pass (never raises on
    CP problems); ``targets()`` is the last known list, cheap and synchronous."""

    def __init__(self, cfg: KumaSourceConfig) -> None:
        self.cfg = cfg
        self.base = cfg.url.rstrip("/")
        self.last_error: str | None = None
        self.last_success: float | None = None  # wall time of the last complete pass
        self.last_attempt: float | None = None
        self.consecutive_failures = 0
        # Per-mesh listing problems of the last pass (mesh name → message).
        self.mesh_errors: dict[str, str] = {}
        self.overview_path: str | None = None  # which OVERVIEW_PATHS entry this CP serves
        self._state = _State()
        self._mesh_states: dict[str, MeshState] = {}
        self._targets: list[Target] = []
        self._paths: dict[str, str] = {}
        # kuma-dp targets that fail metrics_endpoint: key -> the reason.
        self._invalid: dict[str, str] = {}
        self._token: str | None = None
        self._session: aiohttp.ClientSession | None = None
        self._tls = ClientTLS(cfg.ca_file, cfg.insecure_skip_verify)
        self._ssl: ssl.SSLContext | bool = True
        self._lock = asyncio.Lock()

    # -- what the rest of passguard reads ----------------------------------

    def targets(self) -> list[Target]:
        return list(self._targets)

    def dataplanes(self) -> list[DataplaneInfo]:
        return [dp for mesh in sorted(self._state.dataplanes)
                for dp in self._state.dataplanes[mesh]]

    def meshes(self) -> list[str]:
        """Meshes of the last known list (those matching ``meshes``)."""
        return sorted(self._state.dataplanes)

    @property
    def version(self) -> Version | None:
        return self._state.version

    def mesh_states(self) -> dict[str, MeshState]:
        """The current policy set of every mesh this CP listed completely at
        least once. A mesh whose last listing failed keeps its older state:
        its ``as_of`` tells the gate how old it is. The same objects until the
        next pass: the gate's memo knows a state by its identity."""
        return self._mesh_states

    def _build_mesh_states(self) -> dict[str, MeshState]:
        st = self._state
        stale_after = self.cfg.stale_after or 3 * self.cfg.discovery_interval
        return {
            mesh: MeshState(mesh, MeshFlag(mesh, info.passthrough), st.policies[mesh],
                            tuple(dp.proxy() for dp in st.dataplanes.get(mesh, ())),
                            st.version, self.base, st.listed_at[mesh], stale_after)
            for mesh, info in st.meshes.items()
            if mesh in st.policies and mesh in st.listed_at
        }

    @property
    def headers(self) -> dict[str, str]:
        """Headers for the CP (inspect endpoints), with the last token read."""
        return bearer(self._token)

    def headers_for(self, target: Target) -> dict[str, str]:
        # Only the CP gets the token; kuma-dp endpoints live on dataplane
        # addresses, where anything listening would receive it.
        return self.headers if self.cfg.stats == "inspect" else {}

    def request_for(self, target: Target) -> StatsRequest:
        if self.cfg.stats == "inspect":
            return StatsRequest(target.url, "/stats", self.headers, "envoy", "/clusters")
        return StatsRequest(target.url, self._paths.get(target.key, DEFAULT_METRICS_PATH), {},
                            "prometheus", None, self._invalid.get(target.key))

    def inherit(self, old: KumaSource) -> None:
        """Start from another source's last known dataplanes (a config reload):
        targets must not vanish, and their evidence with them, while the new
        source has not finished its first pass.  Only from the same CP."""
        if old.base != self.base:
            return
        self._state = _State(dict(old._state.meshes),
                             {m: dps for m, dps in old._state.dataplanes.items()
                              if self.cfg.wants(m)},
                             dict(old._state.policies), dict(old._state.listed_at),
                             old._state.version)
        self._token = old._token
        self.last_success, self.last_error = old.last_success, old.last_error
        self.overview_path = old.overview_path
        self._rebuild()

    async def run(self) -> None:
        """Discover every ``discovery_interval`` until cancelled."""
        while True:
            await self.discover()
            await asyncio.sleep(self.cfg.discovery_interval)

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # -- one pass ------------------------------------------------------------

    async def discover(self) -> None:
        async with self._lock:
            self.last_attempt = time.time()
            self.mesh_errors = {}
            # The whole pass gets at most one interval (and never less than
            # one request's timeout): a slow CP cannot pile passes up.
            bound = max(self.cfg.discovery_interval, self.cfg.timeout)
            try:
                async with asyncio.timeout(bound):
                    errors = await self._discover()
            except KumaApiError as exc:
                errors = [str(exc)]
            except TimeoutError:
                errors = [f"discovery did not finish within {bound:g}s"]
            except Exception as exc:  # a bug must not stop discovery for good
                log.exception("Kuma discovery from %s failed unexpectedly", self.base)
                errors = [f"internal error: {type(exc).__name__}: {exc}"]
            self._finish(errors)

    def _finish(self, errors: list[str]) -> None:
        if errors:
            self.consecutive_failures += 1
            message = "; ".join(errors)
            if message != self.last_error:
                log.warning("Kuma CP %s: %s (keeping the last known dataplanes)",
                            self.base, message)
            self.last_error = message
            return
        if self.last_error is not None:
            log.info("Kuma CP %s: discovery works again", self.base)
        self.consecutive_failures = 0
        self.last_error = None
        self.last_success = time.time()

    async def _discover(self) -> list[str]:
        try:
            self._token = (secret(self.cfg.token_file, "token_file")
                           if self.cfg.token_file else None)
            self._ssl = self._tls.context() if self.base.startswith("https:") else True
        except HttpProblem as exc:
            raise KumaApiError(str(exc)) from None
        try:
            version = parse_index(await self._get_json("/", {}))
        except KumaApiError as exc:
            # The version only refines the semantics; unknown, the gate takes
            # the stricter reading of each version-dependent rule.
            log.debug("Kuma CP %s: no version from its index: %s", self.base, exc)
            version = None
        meshes = [parse_mesh_item(it, f"GET /meshes: items[{i}]")
                  for i, it in enumerate(await self._list_all("/meshes"))]
        wanted = [m for m in meshes if self.cfg.wants(m.name)]
        gate = asyncio.Semaphore(MESH_CONCURRENCY)

        async def one(mesh: MeshInfo) -> tuple[list[DataplaneInfo], tuple[Policy, ...]] | str:
            async with gate:
                try:
                    return (await self._mesh_dataplanes(mesh.name),
                            await self._mesh_policies(mesh.name))
                except KumaApiError as exc:
                    return str(exc)

        results = await asyncio.gather(*(one(m) for m in wanted))
        listed = time.time()
        errors: list[str] = []
        old = self._state
        new = _State(version=version or old.version)
        for mesh, result in zip(wanted, results, strict=True):
            new.meshes[mesh.name] = mesh
            if isinstance(result, str):
                errors.append(result)
                self.mesh_errors[mesh.name] = result
                # The mesh keeps what its last complete listing said.
                if mesh.name in old.dataplanes:
                    new.dataplanes[mesh.name] = old.dataplanes[mesh.name]
                if mesh.name in old.policies and mesh.name in old.listed_at:
                    new.policies[mesh.name] = old.policies[mesh.name]
                    new.listed_at[mesh.name] = old.listed_at[mesh.name]
            else:
                new.dataplanes[mesh.name], new.policies[mesh.name] = result
                new.listed_at[mesh.name] = listed
        # Meshes gone from the CP, or no longer wanted, are dropped with their dataplanes.
        self._state = new
        self._rebuild()
        return errors

    async def _mesh_policies(self, mesh: str) -> tuple[Policy, ...]:
        """Every MeshPassthrough of ``mesh``. A CP older than the policy
        (before Kuma 2.8) answers 404: there is none."""
        path = f"/meshes/{quote(mesh, safe='')}/meshpassthroughs"
        try:
            items = await self._list_all(path)
        except KumaApiError as exc:
            if exc.status == 404:
                return ()
            raise
        return tuple(parse_policy_item(it, f"GET {path}: items[{i}]", mesh)
                     for i, it in enumerate(items))

    async def _mesh_dataplanes(self, mesh: str) -> list[DataplaneInfo]:
        prefix = f"/meshes/{quote(mesh, safe='')}"
        paths = [self.overview_path] if self.overview_path else list(OVERVIEW_PATHS)
        for n, suffix in enumerate(paths):
            path = prefix + suffix
            try:
                items = await self._list_all(path)
            except KumaApiError as exc:
                # A Kuma without `_overview` reads it as a dataplane named
                # "_overview" and answers 404: ask the older path.
                if exc.status == 404 and n + 1 < len(paths):
                    continue
                raise
            self.overview_path = suffix
            # A dataplane kuma-dp mode cannot read (no address, a bad one) is
            # listed and fails alone (_rebuild), not the whole mesh's listing.
            return [parse_dataplane_item(it, f"GET {path}: items[{i}]", mesh)
                    for i, it in enumerate(items)]
        raise AssertionError("unreachable: the last path raises")

    # -- HTTP --------------------------------------------------------------------

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # trust_env=False: an HTTP(S)_PROXY meant for the internet must not
            # receive the CP token.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=MESH_CONCURRENCY * 2), trust_env=False)
        return self._session

    async def _get_json(self, path: str, params: Mapping[str, str]) -> Any:
        headers = {"Accept": "application/json", **self.headers}
        what = f"GET {path}"
        try:
            async with exchange(self._http(), "GET", self.base + path, timeout=self.cfg.timeout,
                                origin=self.base, server="the Kuma CP", what=what,
                                params=params, headers=headers, ssl=self._ssl) as resp:
                body = await read_bounded(resp, self.cfg.max_response_bytes, f"{what}: the CP",
                                          "max_response_bytes")
        except HttpProblem as exc:
            raise KumaApiError(str(exc)) from None
        if resp.status != 200:
            hint = None
            if resp.status == 401:
                hint = (f"the CP refused the token from {self.cfg.token_file}"
                        if self.cfg.token_file else "the CP wants a token: set token_file")
            elif resp.status == 403:
                hint = "the token lacks access to this resource"
            raise KumaApiError(http_problem(what, resp.status, body, "the Kuma CP", hint),
                               resp.status)
        try:
            return json.loads(body)
        except ValueError:
            head = body[:80].decode("utf-8", "replace").strip()
            raise KumaApiError(f"{what}: the answer is not JSON (starts {head!r})") from None

    async def _list_all(self, path: str) -> list[Any]:
        """Every item of a paginated list.  Raises KumaApiError when the pages do
        not add up (see the module docstring: an incomplete list is never
        taken for a complete one)."""
        problem = ""
        for _ in range(LIST_ATTEMPTS):
            items, total = await self._list_once(path)
            distinct = len({_identity(it) for it in items})
            if total is None or (distinct == total == len(items)):
                return items
            problem = (f"GET {path}: the CP reported total {total} but its pages held "
                       f"{len(items)} items ({distinct} distinct); the list changed during "
                       f"pagination or the CP miscounts")
        raise KumaApiError(problem)

    async def _list_once(self, path: str) -> tuple[list[Any], int | None]:
        size = self.cfg.page_size
        offset = 0
        items: list[Any] = []
        total: int | None = None
        for _ in range(MAX_PAGES):
            where = f"GET {path}?offset={offset}&size={size}"
            page = parse_list_page(
                await self._get_json(path, {"offset": str(offset), "size": str(size)}), where)
            items.extend(page.items)
            total = page.total
            if page.next is None:
                return items, total
            if not page.items:
                raise KumaApiError(f"{where}: an empty page whose next ({page.next!r}) "
                                   f"points further")
            # Only the offset is taken from `next`: Kuma builds it from the
            # Host it was asked under, which need not be this URL, and the
            # token must only go to the configured CP.
            nxt = _next_offset(page.next, where)
            if nxt <= offset:
                raise KumaApiError(f"{where}: pagination does not advance (next "
                                   f"{page.next!r} points back to offset {nxt})")
            offset = nxt
        raise KumaApiError(f"GET {path}: more than {MAX_PAGES} pages; giving up")

    def _rebuild(self) -> None:
        self._mesh_states = self._build_mesh_states()
        targets: list[Target] = []
        paths: dict[str, str] = {}
        invalid: dict[str, str] = {}
        for dp in self.dataplanes():
            if self.cfg.stats == "inspect":
                url = (f"{self.base}/meshes/{quote(dp.mesh, safe='')}"
                       f"/dataplanes/{quote(dp.name, safe='')}")
            else:
                mesh = self._state.meshes.get(dp.mesh, MeshInfo(dp.mesh))
                endpoint = metrics_endpoint(dp, mesh, self.cfg.allowed_cidrs)
                if isinstance(endpoint, str):
                    # Listed (the gate counts it unknown), never read.
                    url, invalid[f"{dp.mesh}/{dp.name}"] = "", endpoint
                else:
                    url, paths[f"{dp.mesh}/{dp.name}"] = endpoint
            targets.append(Target(url=url, mesh=dp.mesh, dataplane=dp.name, service=dp.service,
                                  tags=dp.tags, offline=dp.online is False,
                                  offline_since=dp.disconnected_at))
        self._targets, self._paths, self._invalid = targets, paths, invalid


def metrics_endpoint(dp: DataplaneInfo, mesh: MeshInfo,
                     allowed: tuple[Network, ...] | None) -> tuple[str, str] | str:
    """``(base URL, path)`` of a dataplane's kuma-dp metrics endpoint, or why
    it must not be read (the module docstring says what is checked and why)."""
    where = "stats: kuma-dp"
    if dp.address is None:
        return (f"{where}: dataplane.networking.address is missing; it is needed to reach "
                "the metrics endpoint (not scraped)")
    shown = for_log(dp.address, 64)
    try:
        ip = ipaddress.ip_address(dp.address)
    except ValueError:
        return (f"{where}: dataplane.networking.address '{shown}' is not an IP address; "
                "only IP literals are read (not scraped)")
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        return f"{where}: dataplane.networking.address '{shown}' has a zone (not scraped)"
    plain = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else ip
    inside = [n for n in allowed or () if plain.version == n.version and plain in n]
    if allowed is not None and not inside:
        return (f"{where}: dataplane.networking.address {plain} is not inside "
                "allowed_cidrs (not scraped)")
    if not inside and (plain.is_unspecified or plain.is_multicast or plain.is_link_local
                       or plain == ipaddress.IPv4Address("255.255.255.255")):
        return (f"{where}: dataplane.networking.address {plain} is unspecified, broadcast, "
                "multicast or link-local; list it in allowed_cidrs to read it (not scraped)")
    if dp.metrics_problem is not None:
        return f"{where}: {_bounded_problem(dp.metrics_problem)} (not scraped)"
    if mesh.metrics_problem is not None and (dp.metrics_port is None
                                             or dp.metrics_path is None):
        return f"{where}: mesh {_bounded_problem(mesh.metrics_problem)} (not scraped)"
    port = dp.metrics_port or mesh.metrics_port or DEFAULT_METRICS_PORT
    path = dp.metrics_path or mesh.metrics_path or DEFAULT_METRICS_PATH
    path = path if path.startswith("/") else "/" + path
    host = f"[{plain}]" if plain.version == 6 else str(plain)
    return f"http://{host}:{port}", path


def _identity(item: Any) -> Any:
    # An item without a usable name counts as distinct: the item parser, not
    # the page count, is what reports it (naming the field).
    if isinstance(item, dict) and isinstance(item.get("name"), str) and item["name"]:
        return (item.get("mesh"), item["name"])
    return id(item)


def _next_offset(next_url: str, where: str) -> int:
    values = parse_qs(urlsplit(next_url).query).get("offset")
    if not values:
        raise KumaApiError(f"{where}: next {next_url!r} carries no offset")
    try:
        return int(values[-1])
    except ValueError:
        raise KumaApiError(f"{where}: next {next_url!r} has a non-numeric offset") from None

