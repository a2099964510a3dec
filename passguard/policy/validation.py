"""The appendMatch entries and targetRef kinds a Kuma version's validator refuses.

Read from ``pkg/plugins/policies/meshpassthrough/api/v1alpha1/validator.go``
(release-2.14 and master; docs/semantics.md §9). A refused document never
reaches a proxy: these are reported, not judged.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from passguard.policy.model import Match, Policy, Version
from passguard.policy.select import supported_kinds

_PARTIAL_WILDCARD = re.compile(r"^\*[^.]+")
L7 = ("grpc", "http", "http2")
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")


@dataclass(frozen=True)
class Rejected:
    """One appendMatch entry (or a whole policy) a Kuma version's validator refuses."""

    policy: str
    path: str
    message: str
    versions: tuple[str, ...]

    def as_json(self) -> dict[str, Any]:
        return {"policy": self.policy, "path": self.path, "message": self.message,
                "versions": list(self.versions)}


def _is_dns_name(value: str) -> bool:
    """govalidator.IsDNSName, closely enough: labels of letters, digits, ``-``
    and ``_``, at most 255 characters, and not an IP literal."""
    if not value or len(value) > 255:
        return False
    try:
        ipaddress.ip_address(value)
        return False
    except ValueError:
        pass
    return all(_DNS_LABEL.match(label) for label in value.rstrip(".").split("."))


def _is_cidr(value: str) -> bool:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return False
    return "/" in value


def match_errors(matches: Sequence[Match]) -> list[tuple[str, str]]:
    """(path, message) per violation of Kuma's appendMatch validator, 2.14 and
    master alike (validator.go ``validateDefault``; /tmp/research/xds.md §6).
    An unwritten protocol is ``tcp``: the CRD and the Universal REST
    defaulting write it before the validator runs."""
    out: list[tuple[str, str]] = []
    by_port: dict[int, str] = {}
    seen: dict[tuple[int, str], set[str]] = {}
    for i, m in enumerate(matches):
        at = f"spec.default.appendMatch[{i}]"
        proto = m.protocol or "tcp"
        if proto == "mysql" and m.port is None:
            out.append((f"{at}.port", "port must be defined for Mysql protocol"))
        if m.port is not None and not 1 <= m.port <= 65535:
            out.append((f"{at}.port", "port must be a valid (1-65535)"))
        if m.port is not None:
            stored = by_port.get(m.port)
            # Order-dependent, as in Kuma: only an L7 entry meeting another
            # protocol already stored for the port is refused.
            if stored is not None and stored != proto and proto in L7:
                out.append((f"{at}.port", "using the same port in multiple matches requires "
                                          "the same protocol for the following protocols: "
                                          "[grpc http http2]"))
            else:
                by_port[m.port] = proto
            values = seen.setdefault((m.port, proto), set())
            if m.value in values:
                out.append((f"{at}.value",
                            f"value {m.value} is already defiend for this port and protocol"))
            values.add(m.value)
        if proto not in ("tcp", "tls", "grpc", "http", "http2", "mysql"):
            out.append((f"{at}.protocol", '"protocol" must be one of ["tcp", "tls", "grpc", '
                                          '"http", "http2", "mysql"]'))
        if m.type == "CIDR":
            if not _is_cidr(m.value):
                out.append((f"{at}.value", "provided CIDR has incorrect value"))
        elif m.type == "IP":
            try:
                ipaddress.ip_address(m.value)
            except ValueError:
                out.append((f"{at}.value", "provided IP has incorrect value"))
        elif m.type == "Domain":
            if proto in ("tcp", "mysql"):
                out.append((f"{at}.protocol", f"protocol {proto} is not supported for a domain"
                            + (" (no protocol written: Kuma defaults it to tcp)"
                               if m.protocol is None else "")))
            if _PARTIAL_WILDCARD.match(m.value):
                out.append((f"{at}.value", "provided DNS has incorrect value, partial "
                                           "wildcard is currently not supported"))
            if m.port is None and m.value.startswith("*") and proto in L7:
                out.append((f"{at}.port", "wildcard domains doesn't work for all ports and "
                                          "layer 7 protocol"))
            rest = m.value[2:] if m.value.startswith("*.") else m.value
            if not rest.startswith("*") and not _is_dns_name(rest):
                out.append((f"{at}.value", "provided DNS has incorrect value"))
        else:
            out.append((f"{at}.type", f"provided type {m.type} is not supported, one of "
                                      "Domain, IP, or CIDR is supported"))
    return out


def rejected(policies: Iterable[Policy], target: Version) -> list[Rejected]:
    """What the current policies hold that the 2.14 or ``target`` validator refuses."""
    out: list[Rejected] = []
    v214 = Version(2, 14)
    for p in sorted(policies, key=lambda p: p.name):
        for path, message in match_errors(p.matches):
            out.append(Rejected(p.name, path, message, ("2.14", _short(target))))
        kind = p.target_ref.kind
        refused_by = [str(_short(v)) for v in (v214, target) if kind not in supported_kinds(v)]
        if refused_by:
            allowed = ", ".join(supported_kinds(target))
            out.append(Rejected(p.name, "spec.targetRef.kind",
                                f"top-level targetRef kind {kind} is refused (Kuma "
                                f"{_short(target)} accepts {allowed}); migrate it to kind "
                                "Dataplane with labels", tuple(refused_by)))
    return out


def _short(v: Version) -> str:
    return f"{v.major}.{v.minor}"
