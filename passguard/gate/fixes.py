"""The MeshPassthrough documents readiness suggests, as a person would write them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from passguard.gate.rows import transport_word
from passguard.policy.model import Match, Policy, TargetRef
from passguard.policy.reach import Reached
from passguard.policy.select import DISPLAY_NAME_LABEL


def doc(mesh: str, name: str, mode: str, target_ref: dict[str, Any],
         matches: Sequence[Match] = ()) -> dict[str, Any]:
    default: dict[str, Any] = {"passthroughMode": mode}
    if matches:
        default["appendMatch"] = [{"type": m.type, "value": m.value, "port": m.port,
                                   "protocol": m.protocol} for m in matches]
    return {"type": "MeshPassthrough", "name": name, "mesh": mesh,
            "spec": {"targetRef": target_ref, "default": default}}


def policy(doc: Mapping[str, Any]) -> Policy:
    ref = doc["spec"]["targetRef"]
    default = doc["spec"]["default"]
    matches = tuple(Match(m["type"], m["value"], m["port"], m["protocol"])
                    for m in default.get("appendMatch", ()))
    return Policy(doc["name"], doc["mesh"], default["passthroughMode"], matches,
                  TargetRef(ref["kind"], labels=dict(ref.get("labels", {}))))


def by_name(dataplane: str) -> dict[str, Any]:
    """One dataplane, as 3.0 can select it: by labels only (UPGRADE.md "Real-resource
    policy selection now uses labels only"); the control plane labels every
    resource with its ``kuma.io/display-name``."""
    return {"kind": "Dataplane", "labels": {DISPLAY_NAME_LABEL: dataplane}}


def label(name: str) -> str:
    label = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    return label[:40] or "dataplane"


def entries(seen: Sequence[tuple[Reached, int]]) -> list[Match]:
    """IP entries for what was observed: the transport Envoy showed, both
    (tcp and tls) where it did not: Kuma's tcp chain keeps plain TCP only and
    its tls chain TLS only (docs/semantics.md R2)."""
    out: set[Match] = set()
    for reached, _ in seen:
        t = transport_word(reached.transport)
        for proto in (t,) if t else ("tcp", "tls"):
            out.add(Match("IP", reached.ip, reached.port, proto))
    return sorted(out, key=lambda m: (m.value, m.port or 0, m.protocol or ""))


def without_nulls(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A document as a person would write it: no ``port: null``."""
    def clean(x: Any) -> Any:
        if isinstance(x, Mapping):
            return {k: clean(v) for k, v in x.items() if v is not None}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x
    out: dict[str, Any] = clean(doc)
    return out
