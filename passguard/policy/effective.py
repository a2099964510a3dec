"""A dataplane's effective outbound passthrough: what Kuma will do to it.

``effective(flag, policies, proxy, version)`` follows the MeshPassthrough
plugin (``pkg/plugins/policies/meshpassthrough/plugin/v1alpha1/plugin.go``)
after Kuma's matching and merging (``select.py``): the policies that select
the proxy, in Kuma's order, merged — the last one that sets
``passthroughMode`` decides it, ``appendMatch`` lists are concatenated — then
the mode applied over the Mesh flag. docs/semantics.md cites every rule.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Literal

from passguard.policy.model import Match, MeshFlag, Policy, Proxy, Version
from passguard.policy.reach import HTTP_PROTOCOLS, Reach, Reached
from passguard.policy.select import ordered, selects

Mode = Literal["off", "all", "matched"]


@dataclass(frozen=True)
class Effective:
    """``mode``: no passthrough, all of it, or only ``matches``.
    ``by``: what decided, in words; ``conflict``: why Kuma would fail to
    build this proxy's configuration (it then keeps its last one)."""

    mode: Mode
    matches: tuple[Match, ...] = ()
    by: str = ""
    conflict: str | None = None
    version: Version | None = field(default=None, compare=False)

    @cached_property
    def reach(self) -> Reach:
        return reach_of(self.matches, self.version)

    def keeps(self, dest: Reached) -> str:
        """``kept``, ``cut`` or ``unproven`` for one observed destination."""
        if self.mode == "all":
            return "kept"
        if self.mode == "off":
            return "cut"
        return self.reach.judge(dest)

    def same_as(self, other: Effective) -> bool:
        return self.mode == other.mode and (
            self.mode != "matched" or frozenset(self.matches) == frozenset(other.matches))

    def words(self) -> str:
        if self.mode == "matched":
            return f"Matched ({len(self.matches)} entries)"
        return {"off": "None", "all": "All"}[self.mode]

    def label(self) -> str:
        """For the decision JSON: ``All``, ``None`` or ``Matched``."""
        return {"off": "None", "all": "All", "matched": "Matched"}[self.mode]


@lru_cache(maxsize=64)
def reach_of(matches: tuple[Match, ...], version: Version | None) -> Reach:
    """One index per merged entry set: every dataplane a policy set selects
    alike shares it (a mesh-wide policy of 1,000 entries over 100 dataplanes
    was indexed 100 times)."""
    return Reach(matches, version)


def default_mode(kubernetes: bool, version: Version | None) -> str:
    """What an absent ``passthroughMode`` becomes. The 2.8–2.9 CRD defaulted
    it to None, and the API server stores that; from 2.10 (and always on
    Universal) the plugin reads it as Matched. Unknown version, Kubernetes:
    None, the stricter of the two."""
    if kubernetes and (version is None or not version.at_least(2, 10)):
        return "None"
    return "Matched"


def applies(proxy: Proxy, version: Version | None) -> bool:
    """The plugin's preconditions: transparent proxying, no bound outbounds,
    not a builtin gateway (2.9+). A proxy it skips keeps the Mesh flag."""
    if proxy.transparent is False or proxy.bind_outbounds:
        return False
    return not (proxy.gateway == "builtin" and (version is None or version.at_least(2, 9)))


def conflict_of(matches: Sequence[Match]) -> str | None:
    """Kuma's one build-time error (order.go, validatePortAndProtocol): more
    than one of http, http2, grpc on a port (no port counts as port 0). The
    proxy's whole xDS update fails and it keeps its last configuration."""
    by_port: dict[int, set[str]] = {}
    for m in matches:
        if m.transport in HTTP_PROTOCOLS:
            by_port.setdefault(m.port or 0, set()).add(m.transport)
    bad = sorted(p for p, protos in by_port.items() if len(protos) > 1)
    if not bad:
        return None
    return "; ".join(f"you cannot configure http, http2, grpc on the same port {p} "
                     f"(merged policies use {', '.join(sorted(by_port[p]))})" for p in bad)


def effective(flag: MeshFlag, policies: Iterable[Policy], proxy: Proxy,
              version: Version | None) -> Effective:
    """The passthrough Kuma gives ``proxy``."""
    legacy_flag = version is None or not version.at_least(3, 0)
    flag_on = flag.enabled or not legacy_flag  # 3.0 removed the flag: as if true
    fallback = Effective("all" if flag_on else "off",
                         by="the Mesh flag" if legacy_flag else "no policy (Kuma 3.0)",
                         version=version)
    if not applies(proxy, version):
        return fallback
    chosen = ordered([p for p in policies if selects(p, proxy, version)], version)
    if not chosen:
        return fallback
    mode: str | None = None
    decider = ""
    matches: list[Match] = []
    for p in chosen:
        raw = p.mode
        if raw is None and p.kubernetes and default_mode(True, version) == "None":
            raw = "None"  # what the 2.8/2.9 CRD default stores
        if raw is not None:
            mode, decider = raw, p.name
        matches.extend(p.matches)
    if mode is None:
        mode, decider = "Matched", f"{chosen[-1].name} (passthroughMode unset: Matched)"
    names = ", ".join(p.name for p in chosen)
    by = f"MeshPassthrough {names}" + (f" (mode from {decider})" if len(chosen) > 1 else "")
    if mode == "None":
        return Effective("off", by=by, version=version)
    if mode == "All":
        return Effective("all", by=by, version=version)
    return Effective("matched", tuple(matches), by, conflict_of(matches), version)
