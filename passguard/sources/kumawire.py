"""The Kuma CP API's items (meshes, dataplanes, MeshPassthrough policies, lists).

Invariant: an item that is not the expected shape raises ``KumaApiError``
naming the first wrong field; a kuma-dp metrics endpoint taken from a
Dataplane (written by whoever may write one) is checked before any request
(``metrics_endpoint``: docs/sources.md says what and why).
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from passguard.documents import Resource, parse_resource
from passguard.envoy.excerpt import for_log
from passguard.errors import InputError, PassguardError
from passguard.policy.model import GatewayType, Policy, Proxy, Version
from passguard.sources.settings import Network

# kuma-dp's merged Prometheus endpoint (Mesh metrics backend defaults).
DEFAULT_METRICS_PORT = 5670
DEFAULT_METRICS_PATH = "/metrics"
_SERVICE_TAGS = ("kuma.io/service", "service")  # "service" before Kuma 0.4
# appendMatch entries of one policy the CP lists: its own policies are not a
# request's, but still bounded (a page is bounded by max_response_bytes too).
CP_MAX_MATCHES = 100_000


class KumaApiError(PassguardError):
    """The CP could not be asked, refused, or answered something unusable."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


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


def metrics_endpoint(dp: DataplaneInfo, mesh: MeshInfo,
                     allowed: tuple[Network, ...] | None) -> tuple[str, str] | str:
    """``(base URL, path)`` of a dataplane's kuma-dp metrics endpoint, or why
    it must not be read (docs/sources.md says what is checked and why)."""
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
