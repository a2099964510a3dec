"""Passthrough cluster names across Kuma generations, and the families they fall in.

Envoy replaces ``:`` with ``_`` in stat names, so the cluster
``outbound:passthrough:ipv4`` shows up as ``cluster.outbound_passthrough_ipv4.*``
(DESIGN §2). Only *outbound* passthrough matters: inbound passthrough carries
traffic into the mesh and is not what the Mesh flag or MeshPassthrough cut.
"""

from __future__ import annotations

from typing import Literal

Family = Literal["ipv4", "ipv6", "legacy", "matched"]
FAMILIES: tuple[Family, ...] = ("ipv4", "ipv6", "legacy", "matched")

# Stat names (not cluster names) of every generation:
#   0.3–0.6     pass_through
#   0.7–1.1.1   outbound_passthrough
#   1.1.2–2.x   outbound_passthrough_ipv4 / _ipv6
#   2.12+       self_transparentproxy_passthrough_outbound_ipv4 / _ipv6 (unified naming)
#   2.8+        meshpassthrough_<protocol>_<value>_<port> (one per MeshPassthrough match)
DEFAULT_CLUSTERS_PATTERN = (
    r"pass_through|outbound_passthrough(?:_ipv[46])?"
    r"|self_transparentproxy_passthrough_outbound_ipv[46]"
    r"|meshpassthrough_[a-z0-9]+_[A-Za-z0-9_*.-]+"
)

# The cluster stats passguard reads, and the listener stat that counts what a
# disabled passthrough refused.
CLUSTER_STATS = (
    "upstream_cx_total",
    "upstream_cx_active",
    "upstream_cx_tx_bytes_total",
    "upstream_cx_rx_bytes_total",
    "upstream_cx_connect_fail",
    "upstream_cx_overflow",
)
LISTENER_STATS = ("downstream_cx_no_route",)


def family_of(stat_name: str) -> Family:
    """The family a passthrough cluster (stat form) belongs to."""
    if stat_name.startswith("meshpassthrough_"):
        return "matched"
    if stat_name.endswith("_ipv4"):
        return "ipv4"
    if stat_name.endswith("_ipv6"):
        return "ipv6"
    return "legacy"


DEFAULT_OUTBOUND_PORT = 15001


def listener_pattern(clusters_pattern: str, outbound_port: int) -> str:
    """Stat names of the outbound passthrough *listener*.

    Under a ``Matched`` MeshPassthrough a destination no match allows finds no
    filter chain: Envoy resets it and counts ``listener.<name>.no_filter_chain_match``
    — not ``downstream_cx_no_route``, which counts connections once the
    passthrough cluster is gone. Unified naming gives the listener a stat prefix
    (the passthrough name); older Kuma leaves Envoy's default, the address and
    Kuma's outbound redirect port (``0.0.0.0_15001``, ``[__]_15001``).
    """
    return rf"(?:{clusters_pattern}|[0-9a-fA-F.:_\[\]]+_{outbound_port})"


def stats_filter(clusters_pattern: str, outbound_port: int = DEFAULT_OUTBOUND_PORT) -> str:
    """The RE2 ``filter`` for Envoy admin ``/stats``: a few hundred bytes come back
    instead of megabytes on a big mesh. Python's ``re`` accepts the same subset."""
    return (
        rf"^(?:cluster\.(?:{clusters_pattern})\.(?:{'|'.join(CLUSTER_STATS)})"
        rf"|tcp\.(?:{clusters_pattern})\.(?:{'|'.join(LISTENER_STATS)})"
        rf"|listener\.{listener_pattern(clusters_pattern, outbound_port)}\.no_filter_chain_match"
        r"|server\.uptime)$"
    )


def listener_family(name: str) -> Family:
    """The family of a passthrough listener stat name."""
    if name.startswith("[") or name.endswith("_ipv6"):
        return "ipv6"
    if name.endswith("_ipv4") or name[:1].isdigit():
        return "ipv4"
    return family_of(name)


_ROUTE_PROTOCOLS = ("tcp", "tls", "http", "http2", "grpc")


def parse_route(cluster: str) -> tuple[str | None, str, int | None] | None:
    """``meshpassthrough_<protocol>_<value>_<port|*>`` (Kuma 2.9.2+; mysql
    entries are named ``tcp``) or ``meshpassthrough_<value>_<port|*>`` (2.8 -
    2.9.1, no protocol) → (protocol or None, value, port or None). The value
    is the entry's own text (an IP, a CIDR, a domain); None for other names."""
    if not cluster.startswith("meshpassthrough_"):
        return None
    rest = cluster[len("meshpassthrough_"):]
    body, sep, port_text = rest.rpartition("_")
    if not sep or not body:
        return None
    if port_text == "*":
        port: int | None = None
    elif port_text.isdigit() and 0 < int(port_text) < 65536:
        port = int(port_text)
    else:
        return None
    proto, sep, value = body.partition("_")
    if sep and proto in _ROUTE_PROTOCOLS and value:
        return proto, value, port
    return None, body, port
