"""Which MeshPassthrough policies select a dataplane, and in which order Kuma merges them.

Each rule follows Kuma's matcher (``pkg/plugins/policies/core/matchers/
dataplane.go``) and targetRef ordering (``api/common/v1alpha1/targetref.go``)
for the version the control plane runs; docs/semantics.md cites them row by
row. An unknown version reads each rule the way the newest 2.x does.
"""

from __future__ import annotations

from collections.abc import Mapping

from passguard.policy.model import Policy, Proxy, TargetRef, Version

NAMESPACE_LABEL = "k8s.kuma.io/namespace"
ZONE_LABEL = "kuma.io/zone"
ORIGIN_LABEL = "kuma.io/origin"
DISPLAY_NAME_LABEL = "kuma.io/display-name"

#: Top-level targetRef kinds Kuma accepts on a MeshPassthrough, by version
#: (the policy's validator.go): Dataplane from 2.10; MeshSubset gone in 3.0.
def supported_kinds(version: Version | None) -> tuple[str, ...]:
    if version is None:
        return ("Mesh", "MeshSubset", "Dataplane")
    if version.at_least(3, 0):
        return ("Mesh", "Dataplane")
    if version.at_least(2, 10):
        return ("Mesh", "MeshSubset", "Dataplane")
    return ("Mesh", "MeshSubset")


def kind_rank(kind: str, version: Version | None) -> int:
    """Kuma's targetRef kind order (higher wins). From 2.10 Dataplane ranks 2
    and MeshSubset 3: a MeshSubset policy overrides a Dataplane one."""
    if version is not None and not version.at_least(2, 10):
        return {"Mesh": 1, "MeshSubset": 2}.get(kind, 0)
    return {"Mesh": 1, "Dataplane": 2, "MeshSubset": 3}.get(kind, 0)


_ORIGIN_ORDER = {"global": 0, "": 1, "zone": 2}
_ROLE_ORDER = {"system": 0, "producer": 1, "consumer": 2, "workload-owner": 3}


def display_name(p: Policy) -> str:
    return p.labels.get(DISPLAY_NAME_LABEL) or p.name


def _role(p: Policy, version: Version | None) -> int:
    role = p.role or "system"  # no label reads as system (core_model.PolicyRole)
    rank = _ROLE_ORDER.get(role, 0)
    if version is not None and not version.at_least(2, 9) and rank == 3:
        return 2  # 2.8: consumer and workload-owner rank alike
    return rank


class _Descending:
    """A string that sorts in reverse: Kuma orders names descending, so the
    alphabetically smallest sorts last and wins."""

    __slots__ = ("s",)

    def __init__(self, s: str) -> None:
        self.s = s

    def __lt__(self, other: _Descending) -> bool:
        return self.s > other.s

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Descending) and self.s == other.s

    def __hash__(self) -> int:
        return hash(self.s)


def sort_key(p: Policy, version: Version | None) -> tuple[object, ...]:
    """Ascending: the policy that sorts last has the highest priority."""
    ref = p.target_ref
    dataplane_tiebreak = 0
    if ref.kind == "Dataplane" and (version is None or version.at_least(2, 10)):
        # A name beats labels, then a sectionName beats none (CompareDataplaneKind);
        # 3.0 keeps only the sectionName rule.
        named = 0 if version is not None and version.at_least(3, 0) else int(bool(ref.name))
        dataplane_tiebreak = named * 2 + int(bool(ref.section_name))
    origin = p.labels.get(ORIGIN_LABEL, "")
    return (kind_rank(ref.kind, version), dataplane_tiebreak, _ORIGIN_ORDER.get(origin, 1),
            _role(p, version), _Descending(display_name(p)))


def ordered(policies: list[Policy], version: Version | None) -> list[Policy]:
    return sorted(policies, key=lambda p: sort_key(p, version))


def _tags_match(selector: Mapping[str, str], tags: Mapping[str, str]) -> bool:
    """Kuma's TagSelector: every key present, the value equal or ``*``."""
    return all(k in tags and (v == "*" or tags[k] == v) for k, v in selector.items())


def _partial_tags_match(selector: Mapping[str, str], tags: Mapping[str, str]) -> bool:
    """For a proxy whose tags passguard knows only in part: a key it cannot
    see may hold the value, so only a visible different value rules it out."""
    return all(k not in tags or v == "*" or tags[k] == v for k, v in selector.items())


def _namespace_and_zone(p: Policy, proxy: Proxy, version: Version | None) -> bool:
    """2.9+: consumer and workload-owner policies select their own namespace
    only; a zone-made policy selects its zone's dataplanes only."""
    if version is not None and not version.at_least(2, 9):
        return True
    role = p.role or "system"
    if role in ("consumer", "workload-owner"):
        ns = p.labels.get(NAMESPACE_LABEL)
        if proxy.complete and (ns is None or ns != proxy.labels.get(NAMESPACE_LABEL)):
            return False
    if role != "producer" and p.labels.get(ORIGIN_LABEL) == "zone" and ZONE_LABEL in p.labels:
        dp_origin = proxy.labels.get(ORIGIN_LABEL)
        if dp_origin == "zone":
            zone = proxy.labels.get(ZONE_LABEL)
            if zone is not None and zone != p.labels[ZONE_LABEL]:
                return False
    return True


def _proxy_type_ok(ref: TargetRef, proxy: Proxy) -> bool:
    if not ref.proxy_types:
        return True
    return ("Gateway" if proxy.gateway is not None else "Sidecar") in ref.proxy_types


def _section(i: int, proxy: Proxy, section: str, version: Version | None) -> bool:
    name = proxy.inbound_names[i] if i < len(proxy.inbound_names) else None
    if name:
        return name == section
    if version is not None and not version.at_least(2, 12):
        return False  # 2.10-2.11: the inbound name only
    port = proxy.inbound_ports[i] if i < len(proxy.inbound_ports) else None
    return port is not None and str(port) == section


def _dataplane_selected(ref: TargetRef, p: Policy, proxy: Proxy, version: Version | None) -> bool:
    legacy = version is None or not version.at_least(3, 0)
    if legacy and proxy.gateway == "builtin":
        return False
    by_all = ref.name is None and ref.namespace is None and not ref.labels
    by_name = False
    if ref.name is not None and legacy:
        dp_name = proxy.labels.get(DISPLAY_NAME_LABEL) or proxy.name
        ns = ref.namespace or p.labels.get(NAMESPACE_LABEL)
        by_name = (dp_name == ref.name
                   and (ns is None or proxy.labels.get(NAMESPACE_LABEL) in (None, ns))
                   and p.labels.get(ZONE_LABEL) == proxy.labels.get(ZONE_LABEL))
        if not proxy.complete:
            by_name = dp_name == ref.name or ref.name == f"{proxy.name}"
    by_labels = bool(ref.labels) and (
        _tags_match(ref.labels, _dp_labels(proxy)) if proxy.complete
        else _partial_tags_match(ref.labels, _dp_labels(proxy)))
    if not (by_all or by_name or by_labels):
        return False
    if proxy.gateway == "delegated" and not proxy.inbounds:
        return version is None or version.at_least(2, 14)
    if not ref.section_name:
        return bool(proxy.inbounds) or not proxy.complete
    return any(_section(i, proxy, ref.section_name, version)
               for i in range(len(proxy.inbounds))) or not proxy.complete


def _dp_labels(proxy: Proxy) -> Mapping[str, str]:
    labels = dict(proxy.labels)
    labels.setdefault(DISPLAY_NAME_LABEL, proxy.labels.get(DISPLAY_NAME_LABEL) or proxy.name)
    return labels


def selects(p: Policy, proxy: Proxy, version: Version | None) -> bool:
    """Does ``p`` apply to ``proxy`` (before the plugin's own preconditions)?"""
    if p.mesh != proxy.mesh or not _namespace_and_zone(p, proxy, version):
        return False
    ref = p.target_ref
    if ref.kind not in supported_kinds(version):
        return False  # Kuma refuses such a policy: it never exists
    has_inbound = bool(proxy.inbounds) or proxy.gateway is not None or not proxy.complete
    if ref.kind == "Mesh":
        return _proxy_type_ok(ref, proxy) and has_inbound
    if ref.kind == "MeshSubset":
        if not _proxy_type_ok(ref, proxy):
            return False
        match = _tags_match if proxy.complete else _partial_tags_match
        if not proxy.inbounds:
            return not proxy.complete and match(ref.tags, {})
        return any(match(ref.tags, tags) for tags in proxy.inbounds)
    return _dataplane_selected(ref, p, proxy, version)
