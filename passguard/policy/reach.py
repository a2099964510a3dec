"""Which observed destinations a ``Matched`` passthrough still lets through.

Kuma turns the merged ``appendMatch`` entries into filter chains of the
outbound passthrough listeners, one listener per IP family; Envoy picks a
connection's chain step by step — destination port, then the longest
destination prefix, then SNI, then transport (TLS or plain), then ALPN —
keeping only the most specific candidates at each step and never going back.
``Listener`` builds those chains and replays that choice for one observed
destination. Every chain forwards to an ORIGINAL_DST cluster, so a connection
that finds a chain reaches its destination; one that finds none is closed.

passguard sees a destination as ``ip:port`` (``/clusters``) and, when it went
through a ``meshpassthrough_<protocol>_…`` cluster, the entry that carried
it. What that cannot tell — TLS or plain on a generic passthrough cluster,
whether a plain stream is HTTP, the SNI or Host a name-based chain wants — is
tried both ways: the destination is *kept* when every possibility finds a
chain, *cut* when none does, and *unproven* otherwise. Rules and their Kuma
sources: docs/semantics.md.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from passguard.policy.model import Match, Version

Outcome = Literal["kept", "cut", "unproven"]
Transport = Literal["tls", "raw"]
HTTP_PROTOCOLS = frozenset({"http", "http2", "grpc"})


@dataclass(frozen=True, slots=True)
class Reached:
    """One observed destination. ``transport``: ``tls``/``raw`` when Envoy
    showed it, None when not; ``via``: the entry whose cluster carried it."""

    ip: str
    port: int
    transport: Transport | None = None
    via: Match | None = None


@dataclass(frozen=True, slots=True)
class Chain:
    port: int | None
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None  # None: any address
    server_names: tuple[str, ...]  # tls Domain chains: SNI
    transport: Transport
    http: bool  # plain HTTP only (ALPN http/1.1, h2c): an HTTP connection manager
    hosts: tuple[str, ...]  # http Domain chains: the Host names routed ("*": any)


def _name_matches(pattern: str, name: str) -> bool:
    p, n = pattern.lower(), name.lower()
    if p == n or p == "*":
        return True
    return p.startswith("*.") and n.endswith(p[1:]) and len(n) > len(p) - 1


def _network(m: Match) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(m.value, strict=False)
    except ValueError:
        return None


def expand_ports(matches: Sequence[Match], version: Version | None) -> list[Match]:
    """From 2.9.2, a port-less entry is copied onto every port any entry
    names: Envoy matches the port first, and the copy keeps a port-specific
    chain from hiding it (order.go, GetOrderedMatchers)."""
    if version is not None and (version.major, version.minor, version.patch) < (2, 9, 2):
        return list(dict.fromkeys(matches))
    ports = sorted({m.port for m in matches if m.port is not None})
    out = list(matches)
    for m in matches:
        if m.port is None:
            out.extend(Match(m.type, m.value, p, m.protocol) for p in ports)
    return list(dict.fromkeys(out))


class Listener:
    """The chains of one IP family's passthrough listener under ``matches``."""

    def __init__(self, family: int, matches: Iterable[Match], version: Version | None) -> None:
        self.family = family
        early = version is not None and (version.major, version.minor, version.patch) < (2, 9, 2)
        chains: list[Chain] = []
        http_domains: dict[tuple[int | None], list[str]] = {}
        self.mysql_ports: set[int] = set()
        for m in expand_ports(list(matches), version):
            proto = m.transport
            if proto == "mysql" and m.port is not None:
                self.mysql_ports.add(m.port)
            if m.type == "Domain":
                if proto == "tls":
                    chains.append(Chain(m.port, None, (m.value,), "tls", False, ()))
                elif proto in HTTP_PROTOCOLS:
                    http_domains.setdefault((m.port,), []).append(m.value)
                continue  # tcp/mysql Domain: refused by Kuma's validator
            net = _network(m)
            if net is None or net.version != family:
                continue
            if proto in HTTP_PROTOCOLS:
                if early:
                    # 2.8 - 2.9.1: HTTP chains carry no address and no port;
                    # an IP becomes a Host name, a CIDR nothing at all.
                    if m.type == "IP":
                        http_domains.setdefault((None,), []).append(m.value)
                    continue
                chains.append(Chain(m.port, net, (), "raw", True, ("*",)))
            elif proto == "tls":
                chains.append(Chain(m.port, net, (), "tls", False, ()))
            else:  # tcp, mysql
                chains.append(Chain(m.port, net, (), "raw", False, ()))
        for (port,), hosts in http_domains.items():
            chains.append(Chain(port, None, (), "raw", True, tuple(hosts)))
        self.chains = chains
        # The index a lookup walks: port (None: no port) → prefix length,
        # longest first → network address → chains; plus the chains with no
        # address per port. A destination costs one probe per distinct prefix
        # length of its port, whatever the number of entries.
        self._bits = 32 if family == 4 else 128
        self._by_port: dict[int | None, list[tuple[int, int, dict[int, list[Chain]]]]] = {}
        self._anywhere: dict[int | None, list[Chain]] = {}
        grouped: dict[int | None, dict[int, dict[int, list[Chain]]]] = {}
        for c in chains:
            if c.network is None:
                self._anywhere.setdefault(c.port, []).append(c)
            else:
                nets = grouped.setdefault(c.port, {}).setdefault(c.network.prefixlen, {})
                nets.setdefault(int(c.network.network_address), []).append(c)
        for port, lengths in grouped.items():
            self._by_port[port] = [(n, self._mask(n), lengths[n])
                                   for n in sorted(lengths, reverse=True)]

    def _mask(self, length: int) -> int:
        return ((1 << length) - 1) << (self._bits - length) if length else 0

    def _candidates(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
                    port: int) -> list[Chain]:
        """The port, then the longest prefix holding ``ip`` (chains without an
        address only when no prefix holds it)."""
        key: int | None = port if port in self._by_port or port in self._anywhere else None
        value = int(ip)
        for _, mask, nets in self._by_port.get(key, ()):
            hit = nets.get(value & mask)
            if hit:
                return hit
        return self._anywhere.get(key, [])

    def reach(self, dest: Reached) -> Outcome:
        try:
            ip = ipaddress.ip_address(dest.ip.split("%", 1)[0])
        except ValueError:
            return "cut"
        if ip.version != self.family:
            return "cut"
        candidates = self._candidates(ip, dest.port)
        if not candidates:
            return "cut"
        # On a mysql port the inspectors are off: every stream reads as plain.
        transports: tuple[Transport, ...] = ("raw",) if dest.port in self.mysql_ports else \
            (dest.transport,) if dest.transport is not None else ("tls", "raw")
        results = {self._after_sni(candidates, t, dest) for t in transports}
        if results == {"kept"}:
            return "kept"
        if results == {"cut"}:
            return "cut"
        return "unproven"

    def _after_sni(self, candidates: list[Chain], transport: Transport, dest: Reached) -> Outcome:
        named = [c for c in candidates if c.server_names]
        unnamed = [c for c in candidates if not c.server_names]
        if not named or transport != "tls":
            # Without TLS there is no SNI: only chains that name no server.
            return self._after_transport(unnamed, transport, dest)
        sni = dest.via.value if dest.via is not None and dest.via.type == "Domain" and \
            dest.via.transport == "tls" else None
        if sni is not None:
            hit = [c for c in named if any(_name_matches(p, sni) for p in c.server_names)]
            return self._after_transport(hit or unnamed, transport, dest)
        # SNI unknown: a matching name finds a tls chain (kept); any other name
        # falls to the unnamed chains.
        rest = self._after_transport(unnamed, transport, dest)
        return "kept" if rest == "kept" else "unproven"

    def _after_transport(self, chains: list[Chain], transport: Transport,
                         dest: Reached) -> Outcome:
        chains = [c for c in chains if c.transport == transport]
        if not chains:
            return "cut"
        if transport == "tls":
            return "kept"
        http = [c for c in chains if c.http]
        plain = [c for c in chains if not c.http]
        if not http:
            return "kept"
        # HTTP or not decides between ALPN chains and the rest; a plain chain
        # takes HTTP too when no HTTP chain is left (it names no ALPN).
        as_http = self._routed(http, dest)
        as_other: Outcome = "kept" if plain else "cut"
        if dest.via is not None and dest.via.transport in HTTP_PROTOCOLS:
            return as_http
        if as_http == as_other:
            return as_http
        return "unproven"

    @staticmethod
    def _routed(chains: list[Chain], dest: Reached) -> Outcome:
        """An HTTP chain forwards a request whose Host one of its virtual hosts
        names; any other Host gets the sidecar's 503."""
        hosts = [h for c in chains for h in c.hosts]
        if "*" in hosts:
            return "kept"
        host = dest.via.value if dest.via is not None and dest.via.type == "Domain" else None
        if host is not None and any(_name_matches(h, host) for h in hosts):
            return "kept"
        return "unproven"


class Reach:
    """Both families' listeners for one merged set of entries."""

    def __init__(self, matches: Sequence[Match], version: Version | None) -> None:
        self._v4 = Listener(4, matches, version)
        self._v6 = Listener(6, matches, version)

    def judge(self, dest: Reached) -> Outcome:
        try:
            family = ipaddress.ip_address(dest.ip.split("%", 1)[0]).version
        except ValueError:
            return "cut"
        return (self._v4 if family == 4 else self._v6).reach(dest)
