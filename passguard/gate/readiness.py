"""Kuma 3.0 readiness: what the upgrade does to each dataplane's passthrough.

A pure function of the control plane's current state (``MeshState``), the
evidence window and the target version: no I/O, no clock. Each dataplane's
effective passthrough today is compared with the one Kuma 3.0 gives it under
the same policy set, and its passthrough traffic in the window is judged
against the latter, both ways:

- traffic 3.0 would cut (``lost``, or ``unproven`` when the evidence cannot
  show TLS vs plain TCP), with ``Matched`` MeshPassthrough documents that keep
  what was observed;
- passthrough 3.0 would open although it is locked today (the Mesh flag is
  gone, or the policy that locked it uses a targetRef kind 3.0 refuses), with
  the ``None`` MeshPassthrough that keeps the lockdown.

What 3.0 does where no policy selects a dataplane is not settled, so both
outcomes are computed (``OUTCOMES``); a mesh is ready only when it is ready
under both. Every suggested document is checked with the same model before it
is offered: it must keep what it is for and change no other dataplane.

The semantics were read from ``KUMA_SOURCE`` (docs/semantics.md M6, §9).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from passguard.gate import fixes
from passguard.gate.fixes import without_nulls
from passguard.gate.rows import reached as reached_of
from passguard.gate.rows import transport_word
from passguard.policy.effective import Effective, applies, effective
from passguard.policy.model import MeshFlag, MeshState, Policy, Proxy, Version
from passguard.policy.reach import Reached
from passguard.policy.select import selects, supported_kinds
from passguard.policy.validation import Rejected, match_errors, rejected
from passguard.store.destinations import DestinationView
from passguard.store.snapshot import DataplaneEvidence
from passguard.targets import Target

#: Where the 3.0 rules come from: the Kuma repository as passguard's authors
#: read it (3.0 has no release branch or tag yet, so master).
KUMA_SOURCE: Mapping[str, Any] = {
    "repository": "kumahq/kuma",
    "ref": "master",
    "commit": "348b6528bc234b3c4bd7f22ad7c5bf950d6149fc",
    "commit_date": "2026-08-21",
    "read": [
        "UPGRADE.md, 'Upgrade to 3.0.0': 'Mesh.spec.networking.outbound.passthrough removed' "
        "(the control plane behaves as if passthrough were true unless a MeshPassthrough "
        "says otherwise) and 'Legacy top-level policy targetRef selector kinds removed' "
        "(MeshSubset refused)",
        "pkg/plugins/policies/meshpassthrough/api/v1alpha1/validator.go (appendMatch rules, "
        "top-level kinds Mesh and Dataplane)",
        "pkg/plugins/policies/meshpassthrough/plugin/v1alpha1/plugin.go (no policy: the "
        "transparent-proxy generator's passthrough clusters stay)",
    ],
}

TARGETS: Mapping[str, Version] = {"3.0": Version(3, 0)}

Outcome = Literal["as_if_true", "none"]
#: What a dataplane no MeshPassthrough selects gets on 3.0: Kuma master's
#: UPGRADE.md ("as if passthrough were true"), or kumahq/kuma#18801's proposal
#: (``None``: no passthrough).
OUTCOMES: Mapping[Outcome, str] = {
    "as_if_true": "no policy means passthrough on (Kuma master UPGRADE.md, commit "
                  f"{str(KUMA_SOURCE['commit'])[:12]})",
    "none": "no policy means passthrough None (proposed in kumahq/kuma#18801)",
}
MAX_LISTED = 200
LOCKDOWN_NAME = "passguard-keep-lockdown"
KEEP_NAME = "passguard-keep"
UNOBSERVED = "(destinations not observed)"


# --------------------------------------------------------------------------- the model


def effective_on(flag: MeshFlag, policies: Sequence[Policy], proxy: Proxy, target: Version,
                 outcome: Outcome) -> Effective:
    """The passthrough ``target`` gives ``proxy`` under one of the OUTCOMES.
    ``as_if_true`` is the model's own 3.0 rule (the flag dropped, docs/semantics.md
    M6); ``none`` turns the no-policy fallback into no passthrough."""
    eff = effective(flag, policies, proxy, target)
    if outcome == "none" and _unselected(policies, proxy, target):
        return Effective("off", by="no policy (Kuma 3.0 as kumahq/kuma#18801 proposes: None)",
                         version=target)
    return eff


def _unselected(policies: Sequence[Policy], proxy: Proxy, version: Version) -> bool:
    if not applies(proxy, version):
        return True
    return not any(selects(p, proxy, version) for p in policies)


def _reached(dest: DestinationView) -> Reached:
    """The destination as the model judges it (the gate's one reading)."""
    return reached_of(dest.address, dest.routes)


def _transport(reached: Reached) -> str | None:
    return transport_word(reached.transport)


def _shrinks(before: Effective, after: Effective) -> bool:
    return not (after.mode == "all" or before.mode == "off" or after.same_as(before))


def _opens(before: Effective, after: Effective) -> bool:
    return before.mode != "all" and after.mode == "all"


@dataclass
class Side:
    """One dataplane under one outcome."""

    after: Effective
    lost: list[dict[str, Any]] = field(default_factory=list)
    unproven: list[dict[str, Any]] = field(default_factory=list)
    unobserved: int = 0
    opens: bool = False
    unknown: str | None = None

    @property
    def cuts(self) -> bool:
        return bool(self.lost or self.unproven or self.unobserved)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"after": self.after.label(), "by": self.after.by,
                               "lost": self.lost, "unproven": self.unproven,
                               "opens": self.opens}
        if self.unobserved:
            out["unobserved_connections"] = self.unobserved
        if self.unknown:
            out["unknown"] = self.unknown
        return out


@dataclass
class Row:
    dataplane: str
    service: str
    now: Effective
    connections: int
    active: int
    sides: dict[Outcome, Side]
    destinations: list[tuple[Reached, int]]

    def notable(self) -> bool:
        return any(s.cuts or s.opens or s.unknown for s in self.sides.values())

    def as_json(self) -> dict[str, Any]:
        return {"dataplane": self.dataplane, "service": self.service, "now": self.now.label(),
                "now_by": self.now.by, "connections": self.connections,
                "active_connections": self.active,
                **{o: s.as_json() for o, s in self.sides.items()}}


def _judge(now: Effective, after: Effective, d: DataplaneEvidence | None,
           dests: Sequence[tuple[Reached, int]], unexplained: int) -> Side:
    side = Side(after, opens=_opens(now, after))
    if not _shrinks(now, after):
        return side
    if d is None:
        side.unknown = "passguard does not watch it (no scrape target)"
        return side
    if not d.has_traffic:
        if d.unknown:
            side.unknown = d.unknown_reason()
        return side
    for reached, count in dests:
        verdict = after.keeps(reached)
        item = {"address": f"{reached.ip}:{reached.port}" if ":" not in reached.ip
                else f"[{reached.ip}]:{reached.port}",
                "transport": _transport(reached), "connections": count}
        if verdict == "cut":
            side.lost.append(item)
        elif verdict == "unproven":
            side.unproven.append(item)
    if unexplained:
        if after.mode == "off":
            side.lost.append({"address": UNOBSERVED, "transport": None,
                              "connections": unexplained})
        else:
            side.unobserved = unexplained
    return side


@dataclass
class MeshReadiness:
    mesh: str
    to: str
    status: Literal["ready", "not_ready", "unknown"]
    reasons: list[str]
    current_version: Version | None = None
    rows: list[Row] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    keep_traffic: list[dict[str, Any]] = field(default_factory=list)
    keep_lockdown: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)

    @property
    def ready(self) -> bool | None:
        return None if self.status == "unknown" else self.status == "ready"

    def as_json(self) -> dict[str, Any]:
        listed = [r for r in self.rows if r.notable()]
        out: dict[str, Any] = {
            "mesh": self.mesh, "to": self.to, "ready": self.ready, "status": self.status,
            "reasons": self.reasons,
            "current_version": str(self.current_version) if self.current_version else None,
            "outcomes": {o: self._outcome(o) for o in OUTCOMES},
            "dataplanes": [r.as_json() for r in listed[:MAX_LISTED]],
            "rejected_entries": [r.as_json() for r in self.rejected],
            "keep_traffic": self.keep_traffic,
            "keep_lockdown": self.keep_lockdown,
            "notes": self.notes,
        }
        if len(listed) > MAX_LISTED:
            out["dataplanes_omitted"] = len(listed) - MAX_LISTED
        return out

    def _outcome(self, o: Outcome) -> dict[str, Any]:
        if self.status == "unknown":
            return {"meaning": OUTCOMES[o], "ready": None}
        cut = sorted(r.dataplane for r in self.rows if r.sides[o].cuts)
        opens = sorted(r.dataplane for r in self.rows if r.sides[o].opens)
        unknown = sorted(r.dataplane for r in self.rows
                         if r.sides[o].unknown and not r.sides[o].cuts)
        return {"meaning": OUTCOMES[o], "ready": not (cut or opens or unknown),
                "traffic_cut": cut, "lockdown_lifted": opens, "unknown": unknown}


def proxy_for(target: Target) -> Proxy:
    """A watched dataplane the control plane does not list: its labels stand in."""
    tags = dict(target.tags)
    if target.service:
        tags.setdefault("kuma.io/service", target.service)
    return Proxy(target.mesh, target.dataplane, (tags,), dict(target.tags), complete=False)


def readiness(mesh: str, to: str, state: MeshState | None, stale: bool,
              dataplanes: Sequence[DataplaneEvidence],
              destinations: Sequence[DestinationView], window: float | None,
              inventory: bool = True) -> MeshReadiness:
    """The readiness of one mesh for Kuma ``to`` (a key of TARGETS)."""
    target = TARGETS[to]
    if state is None:
        return MeshReadiness(mesh, to, "unknown", [
            f"no control plane lists mesh {mesh!r}: its Mesh flag and MeshPassthrough "
            "policies are unknown, so what Kuma 3.0 does to it cannot be computed (add a "
            "kuma source)"])
    if stale:
        return MeshReadiness(mesh, to, "unknown", [
            f"the control plane's state of mesh {mesh!r} is older than its stale_after: "
            "the current policies may have changed"], state.version)
    res = MeshReadiness(mesh, to, "ready", [], state.version)
    policies = list(state.policies)
    # 3.0 refuses a MeshSubset targetRef: such a policy is no longer applied
    # (it cannot be synced or updated; docs/semantics.md S1).
    kept = [p for p in policies if p.target_ref.kind in supported_kinds(target)]
    for p in policies:
        if p not in kept:
            res.notes.append(f"MeshPassthrough {p.name} uses targetRef kind "
                             f"{p.target_ref.kind}, which Kuma {to} refuses: its dataplanes "
                             "were judged without it")
    for p in kept:
        ref = p.target_ref
        if ref.kind == "Dataplane" and (ref.name or ref.namespace) and not ref.labels:
            res.notes.append(f"MeshPassthrough {p.name} selects Dataplane {ref.name or ''} by "
                             f"name: Kuma {to} resolves Dataplane targets by labels only, so "
                             "it selects nothing there (migrate it to labels)")
    res.rejected = rejected(policies, target)
    by_name = {d.target.dataplane: d for d in dataplanes}
    proxies = {p.name: p for p in state.proxies}
    for ev in dataplanes:
        proxies.setdefault(ev.target.dataplane, proxy_for(ev.target))
    dests: dict[str, list[DestinationView]] = {}
    for dv in destinations:
        dests.setdefault(dv.dataplane, []).append(dv)
    for name in sorted(proxies):
        px = proxies[name]
        d = by_name.get(name)
        now = effective(state.flag, policies, px, state.version)
        seen = [(_reached(dv), dv.window_connections or dv.active)
                for dv in dests.get(name, []) if dv.window_connections or dv.active]
        conns = d.connections if d else 0
        active = d.active_connections if d else 0
        explained = sum(dv.window_connections for dv in dests.get(name, []))
        explained_open = sum(dv.active for dv in dests.get(name, []))
        if d is not None and inventory and d.origin == "scrape":
            unexplained = max(0, conns - explained) or max(0, active - explained_open)
        else:
            unexplained = conns or active
        sides = {o: _judge(now, effective_on(state.flag, kept, px, target, o), d, seen,
                           unexplained) for o in OUTCOMES}
        res.rows.append(Row(name, d.target.service if d else "", now, conns, active, sides,
                            seen))
    _suggest(res, state, kept, list(proxies.values()), target)
    _conclude(res, window)
    return res


def _conclude(res: MeshReadiness, window: float | None) -> None:
    span = "since the proxies started" if window is None else \
        f"in the last {_duration(window)}"
    for o, meaning in OUTCOMES.items():
        cut = [r for r in res.rows if r.sides[o].cuts]
        opens = [r for r in res.rows if r.sides[o].opens]
        unknown = [r for r in res.rows if r.sides[o].unknown and not r.sides[o].cuts]
        if cut:
            res.reasons.append(
                f"if {meaning}: {len(cut)} dataplane(s) would lose passthrough traffic seen "
                f"{span}: " + _names([(r.dataplane, r.connections or r.active) for r in cut]))
        if opens:
            res.reasons.append(
                f"if {meaning}: passthrough would open on {len(opens)} dataplane(s) locked "
                "today: " + ", ".join(r.dataplane for r in opens[:10])
                + (f" and {len(opens) - 10} more" if len(opens) > 10 else ""))
        if unknown:
            res.reasons.append(
                f"if {meaning}: {len(unknown)} dataplane(s) lose passthrough and have no "
                "complete evidence: " + ", ".join(f"{r.dataplane} ({r.sides[o].unknown})"
                                                  for r in unknown[:10]))
    if res.reasons:
        res.status = "not_ready"
    else:
        res.reasons.append(f"every dataplane keeps the passthrough traffic seen {span}, and "
                           "none is opened, under both readings of 3.0")
    res.counts = {"dataplanes": len(res.rows),
                  "with_traffic": sum(1 for r in res.rows if r.connections or r.active)}


def _names(items: list[tuple[str, int]]) -> str:
    items = sorted(items, key=lambda x: (-x[1], x[0]))
    text = ", ".join(f"{n} ({c})" for n, c in items[:10])
    return text + (f" and {len(items) - 10} more" if len(items) > 10 else "")


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


# --------------------------------------------------------------------------- documents


def _changes(state: MeshState, before: Sequence[Policy], after: Sequence[Policy],
             proxies: Sequence[Proxy], versions: Sequence[tuple[Version | None, Outcome]]
             ) -> set[str]:
    """The dataplanes whose effective passthrough differs with ``after``."""
    out = set()
    for v, o in versions:
        for px in proxies:
            if v is not None and v.at_least(3, 0):
                a = effective_on(state.flag, before, px, v, o)
                b = effective_on(state.flag, after, px, v, o)
            else:
                a = effective(state.flag, before, px, v)
                b = effective(state.flag, after, px, v)
            if not a.same_as(b):
                out.add(px.name)
    return out


def _suggest(res: MeshReadiness, state: MeshState, kept: list[Policy], proxies: list[Proxy],
             target: Version) -> None:
    """Documents that make the mesh ready, each checked with the model: it
    must fix what it is for and leave every other dataplane as it is, today
    and on 3.0 under both outcomes."""
    mesh = state.mesh
    all_policies = list(state.policies)
    checks: list[tuple[Version | None, Outcome]] = [
        (state.version, "as_if_true"), (target, "as_if_true"), (target, "none")]
    rows = {r.dataplane: r for r in res.rows}
    locked = sorted(r.dataplane for r in res.rows
                    if any(s.opens for s in r.sides.values()) and r.now.mode == "off")
    if locked:
        doc = fixes.doc(mesh, LOCKDOWN_NAME, "None", {"kind": "Mesh"})
        changed = _changes(state, all_policies, [*all_policies, fixes.policy(doc)], proxies, checks)
        docs = [doc]
        if not changed <= set(locked):
            # A mesh-wide None would also outrank a policy some other
            # dataplane has today: one per dataplane instead.
            docs = [fixes.doc(mesh, f"{LOCKDOWN_NAME}-{fixes.label(n)}", "None",
                         fixes.by_name(n)) for n in locked]
            changed = _changes(state, all_policies, [*all_policies, *map(fixes.policy, docs)],
                               proxies, checks)
        res.keep_lockdown = docs
        if state.version is not None and "Dataplane" not in supported_kinds(state.version) \
                and any(d["spec"]["targetRef"]["kind"] == "Dataplane" for d in docs):
            res.notes.append(f"the lockdown documents use targetRef kind Dataplane, which "
                             f"Kuma {state.version} refuses: apply them after upgrading to "
                             "2.10 or later, before 3.0")
        if not changed <= set(locked):
            res.notes.append("the lockdown documents would also change "
                             + ", ".join(sorted(changed - set(locked))) + ": review them")
    losing = sorted(n for n, r in rows.items() if any(s.cuts for s in r.sides.values()))
    for n in losing:
        r = rows[n]
        entries = fixes.entries(r.destinations)
        if not entries:
            res.notes.append(f"{n}: no destination was observed, so no Matched policy can be "
                             "written for it; keep passthrough with passthroughMode All")
            doc = fixes.doc(mesh, f"{KEEP_NAME}-{fixes.label(n)}", "All", fixes.by_name(n))
        else:
            doc = fixes.doc(mesh, f"{KEEP_NAME}-{fixes.label(n)}", "Matched",
                       fixes.by_name(n), entries)
        pol = fixes.policy(doc)
        px = next(p for p in proxies if p.name == n)
        still = []
        for o in OUTCOMES:
            eff = effective_on(state.flag, [*kept, pol], px, target, o)
            still += [f"{reached.ip}:{reached.port}" for reached, _ in r.destinations
                      if eff.keeps(reached) != "kept"]
        if still:
            res.notes.append(f"{doc['name']} would still not keep "
                             + ", ".join(sorted(set(still))) + " (another policy outranks it)")
        if any(s.unobserved or any(x["address"] == UNOBSERVED for x in s.lost)
               for s in r.sides.values()):
            res.notes.append(f"{n}: some connections went to destinations the inventory did "
                             f"not observe; {doc['name']} covers only the observed ones")
        res.keep_traffic.append(doc)
    if res.keep_traffic and state.version is not None \
            and "Dataplane" not in supported_kinds(state.version):
        res.notes.append(f"the keep-traffic documents use targetRef kind Dataplane, which Kuma "
                         f"{state.version} refuses: apply them after upgrading to 2.10 or "
                         "later, before 3.0")


__all__ = ["KUMA_SOURCE", "OUTCOMES", "TARGETS", "MeshReadiness", "Rejected", "effective_on",
           "match_errors", "readiness", "rejected", "without_nulls"]
