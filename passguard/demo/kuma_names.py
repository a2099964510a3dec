"""The names Kuma gives a sidecar's passthrough listeners, clusters and stats, per
naming generation (DESIGN §2; shapes from the golden files in
``shared/fixtures/kuma/``): what the demo's Envoy is configured with and what
the tests expect passguard to read.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Literal

Generation = Literal["0.6", "1.1", "legacy", "unified", "meshpassthrough"]
GENERATIONS: tuple[Generation, ...] = ("0.6", "1.1", "legacy", "unified", "meshpassthrough")
IpFamily = Literal["ipv4", "ipv6"]

# Kuma's defaults (redirect ports of kuma-init / kumactl install transparent-proxy).
KUMA_OUTBOUND_PORT = 15001
KUMA_INBOUND_PORT = 15006


# --------------------------------------------------------------------------- names


def sanitize_metric(name: str) -> str:
    """Kuma's ``SanitizeMetric``: every character outside ``[A-Za-z0-9_{}=-]`` → ``_``.

    Kuma applies it to build MeshPassthrough ``altStatName``s and stat prefixes
    (``meshpassthrough_tcp_10.0.0.1_443`` → ``meshpassthrough_tcp_10_0_0_1_443``).
    """
    return re.sub(r"[^a-zA-Z0-9_{}=\-]", "_", re.sub(r"\s+", "_", name))


def meshpassthrough_cluster_name(protocol: str, value: str, port: int | None) -> str:
    """Cluster name of one MeshPassthrough match (``*`` when the match has no port)."""
    return f"meshpassthrough_{protocol}_{value}_{'*' if port is None else port}"


def legacy_names(generation: Generation, family: IpFamily) -> tuple[str, str, str | None]:
    """(cluster/listener name, stat name, altStatName) of the outbound passthrough."""
    if generation == "0.6":
        return "pass_through", "pass_through", None
    if generation == "1.1":
        return "outbound:passthrough", "outbound_passthrough", "outbound_passthrough"
    if generation == "unified":
        name = f"self_transparentproxy_passthrough_outbound_{family}"
        # Unified names are already valid stat names: Kuma sets no altStatName.
        return name, name, None
    # "legacy", and the listeners MeshPassthrough rewrites on Kuma 2.14.
    return (
        f"outbound:passthrough:{family}",
        f"outbound_passthrough_{family}",
        f"outbound_passthrough_{family}",
    )


def families_of(generation: Generation) -> tuple[IpFamily, ...]:
    """IP families a generation has passthrough listeners for (0.6 and 1.1 had no IPv6)."""
    return ("ipv4",) if generation in ("0.6", "1.1") else ("ipv4", "ipv6")


def family_of_address(host: str) -> IpFamily:
    """``ipv4`` or ``ipv6`` for an IP literal."""
    return "ipv6" if ipaddress.ip_address(host).version == 6 else "ipv4"


def passthrough_stat_name(
    generation: Generation, family: IpFamily = "ipv4", dest: tuple[str, int] | None = None
) -> str:
    """The ``cluster.<stat name>.`` a connection through this generation's
    passthrough is counted under.  For ``meshpassthrough`` give ``dest`` (the
    allowed (ip, port) match); its family follows the address."""
    if generation == "meshpassthrough":
        if dest is None:
            raise ValueError("meshpassthrough stat names depend on the match: pass dest=(ip, port)")
        return sanitize_metric(meshpassthrough_cluster_name("tcp", dest[0], dest[1]))
    if family not in families_of(generation):
        raise ValueError(f"generation {generation!r} has no {family} passthrough")
    return legacy_names(generation, family)[1]


def passthrough_cluster_name(
    generation: Generation, family: IpFamily = "ipv4", dest: tuple[str, int] | None = None
) -> str:
    """The Envoy cluster name (as in ``GET /clusters``) of the passthrough."""
    if generation == "meshpassthrough":
        if dest is None:
            raise ValueError("meshpassthrough cluster names depend on the match: pass dest")
        return meshpassthrough_cluster_name("tcp", dest[0], dest[1])
    if family not in families_of(generation):
        raise ValueError(f"generation {generation!r} has no {family} passthrough")
    return legacy_names(generation, family)[0]


def listener_stat_prefix(generation: Generation, family: IpFamily, host: str, port: int) -> str:
    """What Envoy's ``listener.<prefix>.*`` stats (e.g. ``no_filter_chain_match``) use
    for the outbound passthrough listener: its ``statPrefix`` where Kuma sets one
    (unified naming), else Envoy's address form (``127.0.0.1_15001``,
    ``[__1]_15001``)."""
    if generation == "unified":
        return legacy_names(generation, family)[0]
    shown = f"[{host}]" if family == "ipv6" else host
    return f"{shown}_{port}".replace(":", "_")


# --------------------------------------------------------------------------- config

