"""Kuma's passthrough semantics, one table row per rule of docs/semantics.md.

``tests/data/semantics.yaml`` holds the effective-passthrough cases (Mesh
flag × policies × proxy × version); the reach cases below replay Envoy's
filter-chain choice for observed destinations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from passguard.envoy.names import parse_route
from passguard.policy.effective import effective
from passguard.policy.model import Match, MeshFlag, Policy, Proxy, TargetRef, Version
from passguard.policy.reach import Reach, Reached

DATA = yaml.safe_load((Path(__file__).parents[1] / "data" / "semantics.yaml").read_text())


def policy(raw: dict[str, Any]) -> Policy:
    ref = raw.get("targetRef") or {}
    return Policy(
        raw["name"], "default", raw.get("mode"),
        tuple(Match(m["type"], m["value"], m.get("port"), m.get("protocol"))
              for m in raw.get("appendMatch", [])),
        TargetRef(ref.get("kind", "Mesh"), ref.get("name"), ref.get("namespace"),
                  ref.get("labels", {}), ref.get("tags", {}), ref.get("sectionName"),
                  tuple(ref.get("proxyTypes", []))),
        raw.get("labels", {}), raw.get("kubernetes", False))


def proxy(raw: dict[str, Any]) -> Proxy:
    return Proxy("default", raw["name"], tuple(raw.get("inbounds", [])), raw.get("labels", {}),
                 tuple(raw.get("inbound_names", [])), tuple(raw.get("inbound_ports", [])),
                 raw.get("transparent"), raw.get("bind_outbounds", False), raw.get("gateway"))


CASES = [{**DATA["defaults"], **c} for c in DATA["cases"]]


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_effective_passthrough(case: dict[str, Any]) -> None:
    version = Version.parse(case["version"])
    eff = effective(MeshFlag("default", case["flag"]),
                    [policy(p) for p in case.get("policies", [])], proxy(case["proxy"]), version)
    want = case["expect"]
    assert eff.label() == want["mode"], eff.by
    if "matches" in want:
        assert [[m.type, m.value, m.port, m.protocol] for m in eff.matches] == want["matches"]
    assert (eff.conflict or "").startswith(want.get("conflict", "")) and \
        bool(eff.conflict) == ("conflict" in want)


def reach(*matches: Match, version: str = "2.14.3") -> Reach:
    return Reach(matches, Version.parse(version))


TCP_443 = Match("IP", "10.0.0.1", 443, "tcp")
TLS_443 = Match("IP", "10.0.0.1", 443, "tls")


@pytest.mark.parametrize(("matches", "dest", "outcome"), [
    # A tcp entry keeps raw TCP only; a tls entry TLS only; IP evidence alone
    # (a generic passthrough cluster) cannot tell which: unproven.
    ((TCP_443,), Reached("10.0.0.1", 443, "raw"), "kept"),
    ((TCP_443,), Reached("10.0.0.1", 443, "tls"), "cut"),
    ((TCP_443,), Reached("10.0.0.1", 443), "unproven"),
    ((TLS_443,), Reached("10.0.0.1", 443, "raw"), "cut"),
    ((TCP_443, TLS_443), Reached("10.0.0.1", 443), "kept"),
    # The port must match; no port means every port.
    ((TCP_443, TLS_443), Reached("10.0.0.1", 80), "cut"),
    ((Match("CIDR", "10.0.0.0/8", None, "tcp"), Match("CIDR", "10.0.0.0/8", None, "tls")),
     Reached("10.9.9.9", 5432), "kept"),
    # Envoy picks the longest prefix first: a tcp /32 hides a tls /24 from TLS.
    ((Match("IP", "10.0.0.1", None, "tcp"), Match("CIDR", "10.0.0.0/24", None, "tls")),
     Reached("10.0.0.1", 443, "tls"), "cut"),
    # A port-less entry is copied to every port another entry names.
    ((Match("CIDR", "10.0.0.0/8", None, "tls"), Match("IP", "10.9.9.9", 443, "tcp")),
     Reached("10.0.0.5", 443, "tls"), "kept"),
    # A family with no entry of its own is blocked.
    ((TCP_443, TLS_443), Reached("2001:db8::1", 443), "cut"),
    # Domain entries go to both families, but a name cannot be proven from an IP.
    ((Match("Domain", "api.example.com", 443, "tls"),), Reached("2001:db8::1", 443, "tls"),
     "unproven"),
    ((Match("Domain", "api.example.com", 443, "tls"),), Reached("10.0.0.1", 443, "raw"), "cut"),
    # ... unless the cluster that carried it names the same entry.
    ((Match("Domain", "api.example.com", 443, "tls"),),
     Reached("10.0.0.1", 443, "tls", Match("Domain", "api.example.com", 443, "tls")), "kept"),
    # An http IP entry keeps plain HTTP only: a raw stream of unknown kind is unproven.
    ((Match("IP", "10.0.0.1", 80, "http"),), Reached("10.0.0.1", 80, "raw"), "unproven"),
    ((Match("IP", "10.0.0.1", 80, "http"), Match("IP", "10.0.0.1", 80, "tcp")),
     Reached("10.0.0.1", 80, "raw"), "kept"),
    # On a mysql port the inspectors are off: TLS reads as plain and passes.
    ((Match("IP", "10.0.0.1", 3306, "mysql"),), Reached("10.0.0.1", 3306, "tls"), "kept"),
])
def test_reach(matches: tuple[Match, ...], dest: Reached, outcome: str) -> None:
    assert reach(*matches).judge(dest) == outcome


@pytest.mark.parametrize(("name", "parsed"), [
    ("meshpassthrough_tls_api.example.com_443", ("tls", "api.example.com", 443)),
    ("meshpassthrough_tcp_10.0.0.0/8_*", ("tcp", "10.0.0.0/8", None)),
    ("meshpassthrough_tcp_::1_8443", ("tcp", "::1", 8443)),
    # Kuma 2.8 - 2.9.1: no protocol in the name.
    ("meshpassthrough_10.0.0.1_443", (None, "10.0.0.1", 443)),
    ("outbound:passthrough:ipv4", None),
    ("meshpassthrough_tcp_10.0.0.1_99999", None),
])
def test_route_names(name: str, parsed: tuple[str | None, str, int | None] | None) -> None:
    assert parse_route(name) == parsed


def test_versions() -> None:
    assert Version.parse("2.14.3") == Version(2, 14, 3)
    assert Version.parse("v2.10.0-rc.1") == Version(2, 10, 0)
    assert Version.parse("dev-abcdef") is None
    assert Version.parse(None) is None


# --------------------------------------------------------------------------- the chain index

_NETS = st.sampled_from(["10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3/32",
                         "10.1.2.0/28", "192.0.2.0/24", "0.0.0.0/0"])
_ENTRIES = st.builds(
    lambda net, port, proto: Match("CIDR" if not net.endswith("/32") else "IP",
                                   net.removesuffix("/32"), port, proto),
    _NETS, st.sampled_from([None, 80, 443]), st.sampled_from(["tcp", "tls", "http"]))


def _naive(listener: Any, ip: str, port: int) -> list[Any]:
    """Envoy's rule read literally: the port, then the longest prefix."""
    import ipaddress

    addr = ipaddress.ip_address(ip)
    at_port = [c for c in listener.chains if c.port == port] or \
        [c for c in listener.chains if c.port is None]
    holding = [c for c in at_port if c.network is not None and addr in c.network]
    if holding:
        longest = max(c.network.prefixlen for c in holding)
        return [c for c in holding if c.network.prefixlen == longest]
    return [c for c in at_port if c.network is None]


@settings(max_examples=300, deadline=None)
@given(st.lists(_ENTRIES, max_size=12),
       st.sampled_from(["10.1.2.3", "10.1.2.9", "10.9.9.9", "192.0.2.1", "8.8.8.8"]),
       st.sampled_from([80, 443, 5432]))
def test_the_chain_index_picks_what_envoys_rule_picks(entries: list[Match], ip: str,
                                                     port: int) -> None:
    import ipaddress

    from passguard.policy.reach import Listener

    listener = Listener(4, entries, Version(2, 14, 3))
    got = listener._candidates(ipaddress.ip_address(ip), port)
    assert sorted(map(repr, got)) == sorted(map(repr, _naive(listener, ip, port)))


def test_a_policy_over_the_match_limit_is_refused_naming_it() -> None:
    from passguard.documents import parse_documents
    from passguard.errors import InputError

    doc = {"type": "MeshPassthrough", "name": "big", "mesh": "m", "spec": {"default": {
        "passthroughMode": "Matched",
        "appendMatch": [{"type": "IP", "value": f"10.0.{i // 250}.{i % 250}"}
                        for i in range(1001)]}}}
    with pytest.raises(InputError, match=r"appendMatch has 1001 entries, over "
                                         r"limits\.max_matches \(1000\)"):
        parse_documents([doc])
    assert parse_documents([doc], max_matches=2000).changes
