"""Before and after a request's changes: each dataplane's effective passthrough.

Exact when the control plane's current policy set for the mesh is known
(``MeshState``): the changes are applied to that set (``oldObject`` / ``--old``
replacing the control plane's copy where given), and every dataplane they can
reach is computed before and after with Kuma's rules (``passguard.policy``).

Conservative when it is not (static targets, a pipeline, the control plane
unreachable): the request's documents alone, nothing merged into them, are
the after-state of the dataplanes they select; every current passthrough
connection of those dataplanes is judged (before is taken as "all"); a
deleted or no longer selected dataplane falls back to no passthrough; the
Mesh flag decides where no document of the request applies. docs/semantics.md
§ "Without the control plane" argues why this refuses at least what the exact
computation refuses.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from passguard.documents import Change, Resource
from passguard.policy.effective import Effective, effective
from passguard.policy.model import MeshFlag, MeshState, Policy, Proxy, Version
from passguard.policy.select import selects, supported_kinds
from passguard.targets import Target

ASSUMED_ALL = Effective("all", by="assumed: the current policies are unknown")


@dataclass
class Plan:
    """Per dataplane key: before and after; per change: the keys it touches."""

    mesh: str
    exact: bool
    version: Version | None
    before: dict[str, Effective] = field(default_factory=dict)
    after: dict[str, Effective] = field(default_factory=dict)
    touched: list[list[str]] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def proxy_of(target: Target) -> Proxy:
    """A dataplane passguard knows only as a scrape target: its labels are
    some of its tags, so selection may not rule it out on a tag it lacks."""
    tags = dict(target.tags)
    if target.service:
        tags.setdefault("kuma.io/service", target.service)
    return Proxy(target.mesh, target.dataplane, (tags,), dict(target.tags), complete=False)


def _apply(flag: MeshFlag, policies: dict[tuple[str, str, str], Policy],
           r: Resource | None, ident: tuple[str, str, str]) -> MeshFlag:
    """Set the object ``ident`` to ``r`` (None: deleted) in the flag/policies."""
    if ident[0] == "Mesh":
        return r.flag() if r is not None else MeshFlag(flag.name)  # a deleted Mesh: no flag
    if r is None:
        policies.pop(ident, None)
    else:
        policies[ident] = r.policy()
    return flag


def _counterpart(r: Resource, current: Mapping[tuple[str, str, str], Policy]) -> tuple[
        str, str, str]:
    """The control plane's name for a document's object. A Kubernetes
    document without a namespace meets ``name.<namespace>`` when exactly one
    such policy exists."""
    if r.ident in current or r.kind != "MeshPassthrough" or r.form != "kubernetes" or "." in r.name:
        return r.ident
    found = [k for k in current if k[2].startswith(r.name + ".")]
    return found[0] if len(found) == 1 else r.ident


def _check_kinds(changes: Sequence[Change], version: Version | None, plan: Plan) -> None:
    for ch in changes:
        r = ch.new
        if r is None or r.kind != "MeshPassthrough":
            continue
        kinds = supported_kinds(version)
        if r.target_ref.kind not in kinds:
            where = f"Kuma {version}" if version else "Kuma"
            plan.warnings.append(
                f"MeshPassthrough {r.name}: {where} accepts targetRef kinds "
                f"{', '.join(kinds)} only; the control plane will refuse this document, "
                "so it selects no dataplane")


def exact(mesh: str, changes: Sequence[Change], state: MeshState,
          extra: Iterable[Target] = ()) -> Plan:
    """Apply ``changes`` to the control plane's current set."""
    plan = Plan(mesh, True, state.version)
    _check_kinds(changes, state.version, plan)
    current: dict[tuple[str, str, str], Policy] = {p.ident: p for p in state.policies}
    flag = state.flag
    idents = []
    for ch in changes:
        ident = _counterpart(ch.resource, current)
        idents.append(ident)
        if ch.old_source == "document":  # oldObject / --old wins over the CP's copy
            flag = _apply(flag, current, ch.old, ident)
    after_pol = dict(current)
    after_flag = flag
    for ch, ident in zip(changes, idents, strict=True):
        after_flag = _apply(after_flag, after_pol, ch.new, ident)
    proxies = {p.key: p for p in state.proxies}
    for t in extra:  # watched, but the control plane does not list it
        proxies.setdefault(t.key, proxy_of(t))
    before_list, after_list = list(current.values()), list(after_pol.values())
    v = state.version
    for ch, ident in zip(changes, idents, strict=True):
        # Without change i (its object as it was before): what it alone changes.
        was = _old_version(ch, ident, current, flag)
        without = dict(after_pol)
        without_flag = _apply(after_flag, without, was, ident)
        without_list = list(without.values())
        reach = _reachable(ch.resource.kind, (was, ch.new), proxies.values(), v)
        keys = []
        for px in reach:
            after = plan.after.get(px.key) or effective(after_flag, after_list, px, v)
            plan.after[px.key] = after
            if not after.same_as(effective(without_flag, without_list, px, v)):
                keys.append(px.key)
                if px.key not in plan.before:
                    plan.before[px.key] = effective(flag, before_list, px, v)
        plan.touched.append(keys)
    return plan


def _old_version(ch: Change, ident: tuple[str, str, str],
                 current: Mapping[tuple[str, str, str], Policy],
                 flag: MeshFlag) -> Resource | None:
    if ch.old_source == "document":
        return ch.old
    if ident[0] == "Mesh":
        return Resource("Mesh", flag.name, flag.name, "universal",
                        "None" if not flag.enabled else "All", explicit=flag.passthrough
                        is not None)
    pol = current.get(ident)
    if pol is None:
        return None
    return Resource("MeshPassthrough", pol.name, pol.mesh,
                    "kubernetes" if pol.kubernetes else "universal", pol.mode, pol.matches,
                    pol.target_ref, labels=pol.labels)


def _reachable(kind: str, versions: Iterable[Resource | None], proxies: Iterable[Proxy],
               v: Version | None) -> list[Proxy]:
    """Dataplanes whose effective passthrough a change can alter: every one
    for a Mesh flag; those the old or new version selects for a policy."""
    if kind == "Mesh":
        return list(proxies)
    pols = [r.policy() for r in versions if r is not None]
    return [px for px in proxies if any(selects(p, px, v) for p in pols)]


def conservative(mesh: str, changes: Sequence[Change], targets: Sequence[Target],
                 version: Version | None, why: str) -> Plan:
    """The request's documents alone (see the module docstring)."""
    plan = Plan(mesh, False, version)
    _check_kinds(changes, version, plan)
    plan.assumptions.append(
        f"{why}: judged the document(s) alone as the after-state, every current passthrough "
        "connection as at stake, a dataplane a policy no longer selects as falling back to "
        "no passthrough, and no other MeshPassthrough as outranking these documents")
    proxies = [proxy_of(t) for t in targets]
    new_pols = []
    for ch in changes:
        if ch.new is None or ch.new.kind != "MeshPassthrough":
            continue
        pol = ch.new.policy()
        if pol.mode is None:
            # Unset, the mode comes from whichever other policy sets one, and
            # passguard cannot see them: the strictest it could be.
            plan.assumptions.append(
                f"MeshPassthrough {pol.name} does not set passthroughMode: without the control "
                "plane another policy's mode may apply, so it was judged as None (write "
                "passthroughMode, or give passguard a kuma source)")
            pol = replace(pol, mode="None")
        new_pols.append(pol)
    mesh_docs = [ch for ch in changes if ch.resource.kind == "Mesh"]
    # The Mesh flag decides where no document applies; without a Mesh
    # document, a dataplane a document used to select falls back to nothing.
    flag = mesh_docs[-1].new.flag() if mesh_docs and mesh_docs[-1].new is not None \
        else MeshFlag(mesh, False)
    for ch in changes:
        keys: list[str] = []
        if ch.old_source == "document" and res_key(ch.old) == res_key(ch.new):
            plan.touched.append(keys)  # re-applied unchanged: nothing moves
            continue
        for px in _reachable(ch.resource.kind, (ch.old, ch.new), proxies, version):
            after = plan.after.get(px.key) or effective(flag, new_pols, px, version)
            plan.after[px.key] = after
            plan.before[px.key] = ASSUMED_ALL
            if not after.same_as(ASSUMED_ALL):
                keys.append(px.key)
        plan.touched.append(keys)
    return plan


def res_key(r: Resource | None) -> tuple[object, ...] | None:
    """What a document says, without its digest or break-glass annotation."""
    if r is None:
        return None
    return (r.kind, r.name, r.mesh, r.form, r.mode, r.explicit, r.matches, r.target_ref.key(),
            tuple(sorted(r.labels.items())))
