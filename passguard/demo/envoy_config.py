"""The Envoy v3 bootstrap of a demo sidecar: passthrough listeners and clusters
named as Kuma names them, reached through a PROXY v1 header instead of
iptables (why: docs/architecture.md, "The demo sidecar").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from passguard.demo.kuma_names import (
    KUMA_INBOUND_PORT,
    KUMA_OUTBOUND_PORT,
    Generation,
    IpFamily,
    families_of,
    family_of_address,
    legacy_names,
    meshpassthrough_cluster_name,
    sanitize_metric,
)

_TCP_PROXY_FILTER = "envoy.filters.network.tcp_proxy"
_TCP_PROXY = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
_PROXY_PROTOCOL_FILTER = "envoy.filters.listener.proxy_protocol"
_PROXY_PROTOCOL = (
    "type.googleapis.com/envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol"
)
_TLS_INSPECTOR_FILTER = "envoy.filters.listener.tls_inspector"
_TLS_INSPECTOR = (
    "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
)

# Kuma's inbound passthrough clusters bind this source address, so the
# application can tell passthrough traffic from mesh traffic.
_INBOUND_SOURCE = {"ipv4": "127.0.0.6", "ipv6": "::6"}

@dataclass(frozen=True)
class TcpAdmin:
    """Envoy admin on a TCP address (Kuma before 2.14: 127.0.0.1:9901)."""

    port: int
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


@dataclass(frozen=True)
class UnixAdmin:
    """Envoy admin on a Unix socket (Kuma 2.14 default)."""

    path: str

    @property
    def url(self) -> str:
        return f"unix://{self.path}"


AdminAddress = TcpAdmin | UnixAdmin


@dataclass(frozen=True)
class SidecarPorts:
    """Ports of the passthrough listeners, per direction and family.

    Kuma uses one port per direction for both families (0.0.0.0 and [::]);
    here each listener may get its own free port."""

    outbound_v4: int = KUMA_OUTBOUND_PORT
    outbound_v6: int = KUMA_OUTBOUND_PORT
    inbound_v4: int = KUMA_INBOUND_PORT
    inbound_v6: int = KUMA_INBOUND_PORT

    def outbound(self, family: IpFamily) -> int:
        return self.outbound_v4 if family == "ipv4" else self.outbound_v6

    def inbound(self, family: IpFamily) -> int:
        return self.inbound_v4 if family == "ipv4" else self.inbound_v6


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socketAddress": {"address": host, "portValue": port}}


def _tcp_proxy(cluster: str, stat_prefix: str) -> dict[str, Any]:
    return {
        "name": _TCP_PROXY_FILTER,
        "typedConfig": {"@type": _TCP_PROXY, "cluster": cluster, "statPrefix": stat_prefix},
    }


def _proxy_protocol_filter() -> dict[str, Any]:
    # Stands in for useOriginalDst / the original_dst listener filter: see the
    # module docstring.
    return {"name": _PROXY_PROTOCOL_FILTER, "typedConfig": {"@type": _PROXY_PROTOCOL}}


def _original_dst_cluster(
    name: str,
    alt_stat_name: str | None,
    connect_timeout: str = "5s",
    source_address: str | None = None,
) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "ORIGINAL_DST",
        "lbPolicy": "CLUSTER_PROVIDED",
        "connectTimeout": connect_timeout,
    }
    if alt_stat_name is not None:
        cluster["altStatName"] = alt_stat_name
    if source_address is not None:
        cluster["upstreamBindConfig"] = {
            "sourceAddress": {"address": source_address, "portValue": 0}
        }
    return cluster


def _passthrough_listener(
    name: str,
    host: str,
    port: int,
    direction: Literal["OUTBOUND", "INBOUND"],
    filter_chains: list[dict[str, Any]],
    listener_stat_prefix: str | None = None,
    extra_listener_filters: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    listener: dict[str, Any] = {
        "name": name,
        "address": _address(host, port),
        "trafficDirection": direction,
        "listenerFilters": [_proxy_protocol_filter(), *extra_listener_filters],
        "filterChains": filter_chains,
    }
    # Kuma sets this on inbound listeners only.  Here it is on every listener:
    # with SO_REUSEPORT, an Envoy that happened to pick a port another test's
    # Envoy uses would share it, and the kernel would spread connections over
    # both; without it the second bind fails and the start is retried.
    listener["enableReusePort"] = False
    if listener_stat_prefix is not None:
        listener["statPrefix"] = listener_stat_prefix
    return listener


def _inbound_names(generation: Generation, family: IpFamily) -> tuple[str, str | None]:
    """(name, altStatName) of the inbound passthrough cluster/listener."""
    if generation == "1.1":
        return "inbound:passthrough", "inbound_passthrough"
    if generation == "unified":
        return f"self_transparentproxy_passthrough_inbound_{family}", None
    return f"inbound:passthrough:{family}", f"inbound_passthrough_{family}"


def build_config(
    generation: Generation,
    admin: AdminAddress,
    listen_host_v4: str = "127.0.0.1",
    listen_host_v6: str = "::1",
    ports: SidecarPorts | None = None,
    *,
    matches: Sequence[tuple[str, int] | tuple[str, int, str]] = (),
    passthrough: bool = True,
    node_id: str = "default.demo-app",
) -> dict[str, Any]:
    """An Envoy v3 bootstrap whose passthrough resources are named as Kuma names them.

    ``generation``:
      * ``"0.6"``: listener ``catch_all`` → cluster ``pass_through`` (IPv4 only).
      * ``"1.1"``: ``outbound:passthrough`` / ``inbound:passthrough`` (IPv4 only).
      * ``"legacy"``: ``outbound:passthrough:ipv4|ipv6`` + ``inbound:passthrough:*``
        (Kuma 1.1.2 → 2.14 default).
      * ``"unified"``: ``self_transparentproxy_passthrough_{outbound,inbound}_ipv4|6``.
      * ``"meshpassthrough"``: MeshPassthrough ``Matched`` on Kuma 2.14: one
        ``ORIGINAL_DST`` cluster ``meshpassthrough_tcp_<ip>_<port>`` per ``matches``
        entry, selected by a filter chain on the (legacy-named) outbound listener
        of the match's family by destination IP and port.  A destination that
        matches no chain is closed by Envoy.  With no ``matches`` (or
        ``passthroughMode: None``) Kuma only removes the outbound passthrough
        clusters, which is what ``matches=()`` gives here.

    ``passthrough=False`` is the Mesh with ``networking.outbound.passthrough:
    false``: Kuma keeps the outbound listeners but drops their clusters, so
    Envoy refuses each connection and counts it in
    ``tcp.<prefix>.downstream_cx_no_route``.
    """
    ports = ports or SidecarPorts()
    hosts: dict[IpFamily, str] = {"ipv4": listen_host_v4, "ipv6": listen_host_v6}
    clusters: list[dict[str, Any]] = []
    listeners: list[dict[str, Any]] = []

    for family in families_of(generation):
        host, out_port = hosts[family], ports.outbound(family)
        if generation == "0.6":
            _add_catch_all(clusters, listeners, host, out_port, passthrough)
            continue
        family_matches = [m for m in matches if family_of_address(m[0]) == family]
        _add_outbound(clusters, listeners, generation, family, host, out_port,
                      family_matches, passthrough)
        _add_inbound(clusters, listeners, generation, family, host, ports.inbound(family))

    if isinstance(admin, TcpAdmin):
        admin_address: dict[str, Any] = _address(admin.host, admin.port)
    else:
        admin_address = {"pipe": {"path": admin.path}}
    return {
        "node": {"id": node_id, "cluster": node_id.split(".", 1)[-1]},
        "admin": {"address": admin_address},
        "staticResources": {"clusters": clusters, "listeners": listeners},
    }


Resources = list[dict[str, Any]]
Match = tuple[str, int] | tuple[str, int, str]


def _connect_timeout(generation: Generation) -> str:
    """1.1 used a 10 s connect timeout, later versions 5 s."""
    return "10s" if generation == "1.1" else "5s"


def _add_catch_all(clusters: Resources, listeners: Resources, host: str, port: int,
                   passthrough: bool) -> None:
    """0.6 had no inbound passthrough; its catch-all listener was not named
    after the cluster."""
    listeners.append(
        _passthrough_listener(
            "catch_all",
            host,
            port,
            "OUTBOUND",
            [{"filters": [_tcp_proxy("pass_through", "pass_through")]}],
        )
    )
    if passthrough:
        clusters.append(_original_dst_cluster("pass_through", None))


def _match_chain(clusters: Resources, family: IpFamily, match: Match) -> dict[str, Any]:
    """The cluster (added to ``clusters``) and filter chain of one MeshPassthrough
    match (ip, port[, protocol]): Kuma gives a tcp entry a chain on transport
    raw_buffer, a tls entry one on tls."""
    ip, port = match[0], match[1]
    protocol = match[2] if len(match) > 2 else "tcp"
    mp_name = meshpassthrough_cluster_name(protocol, ip, port)
    mp_stat = sanitize_metric(mp_name)
    clusters.append(_original_dst_cluster(mp_name, mp_stat))
    return {
        "name": mp_name,
        "filterChainMatch": {
            "destinationPort": port,
            "prefixRanges": [
                {
                    "addressPrefix": ip,
                    "prefixLen": 32 if family == "ipv4" else 128,
                }
            ],
            "transportProtocol": "tls" if protocol == "tls" else "raw_buffer",
        },
        "filters": [_tcp_proxy(mp_name, mp_stat)],
    }


def _add_outbound(clusters: Resources, listeners: Resources, generation: Generation,
                  family: IpFamily, host: str, port: int, family_matches: Sequence[Match],
                  passthrough: bool) -> None:
    name, stat, alt = legacy_names(
        "legacy" if generation == "meshpassthrough" else generation, family
    )
    if generation == "meshpassthrough" and family_matches:
        chains = [_match_chain(clusters, family, match) for match in family_matches]
        listeners.append(
            _passthrough_listener(
                name,
                host,
                port,
                "OUTBOUND",
                chains,
                extra_listener_filters=[
                    {"name": _TLS_INSPECTOR_FILTER, "typedConfig": {"@type": _TLS_INSPECTOR}}
                ],
            )
        )
        return
    listeners.append(
        _passthrough_listener(
            name,
            host,
            port,
            "OUTBOUND",
            [{"filters": [_tcp_proxy(name, stat)]}],
            listener_stat_prefix=stat if generation == "unified" else None,
        )
    )
    # MeshPassthrough (Matched or None) removes the default outbound
    # passthrough clusters, like passthrough: false on the Mesh.
    if passthrough and generation != "meshpassthrough":
        clusters.append(_original_dst_cluster(name, alt, _connect_timeout(generation)))


def _add_inbound(clusters: Resources, listeners: Resources, generation: Generation,
                 family: IpFamily, host: str, port: int) -> None:
    in_name, in_alt = _inbound_names(
        "legacy" if generation == "meshpassthrough" else generation, family
    )
    in_stat = in_alt or in_name
    # 1.1 had only an IPv4 inbound passthrough, binding 127.0.0.6 too.
    clusters.append(_original_dst_cluster(in_name, in_alt, _connect_timeout(generation),
                                          _INBOUND_SOURCE[family]))
    listeners.append(
        _passthrough_listener(
            in_name,
            host,
            port,
            "INBOUND",
            [{"filters": [_tcp_proxy(in_name, in_stat)]}],
            listener_stat_prefix=in_stat if generation == "unified" else None,
        )
    )
