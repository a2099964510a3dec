"""The gate's decision: a pure function of the changes, the evidence and the policy.

For each mesh a request touches, ``plan`` computes every reachable
dataplane's effective passthrough before and after (exact with the control
plane's current policies, conservative without). Here each dataplane a change
alters is judged on the traffic of its evidence window: what the after-state
cuts (``lost``), what it may or may not keep (``unproven``: transport or name
unknown), and dataplanes whose evidence cannot vouch for the window
(``unknown``). No I/O and no clock: the same inputs give the same decision on
every replica and after a restart.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

from passguard.documents import BREAK_GLASS, MODE_RANK, Change
from passguard.gate import plan as plans
from passguard.gate.rows import UNOBSERVED, Row, judge_row
from passguard.gate.words import MAX_NAMED, effect_words, n, names, window_words
from passguard.policy.model import MeshState
from passguard.store.destinations import DestinationView
from passguard.store.snapshot import DataplaneEvidence
from passguard.verdicts import GatePolicy

Verdict = Literal["allow", "warn", "deny"]
SEVERITY: dict[str, int] = {"allow": 0, "warn": 1, "deny": 2}
MODE_CAP: dict[str, Verdict] = {"enforce": "deny", "warn": "warn", "audit": "allow"}
#: Bounds of a decision's per-dataplane list, so an answer stays small
#: whatever the mesh: the dataplanes that matter first, then a count.
MAX_DATAPLANES = 100
#: Judgements kept per snapshot: a client sending ever new documents must
#: not grow a snapshot without bound.
MEMO_ENTRIES = 1024


@dataclass(frozen=True)
class Evidence:
    """What the gate knows about one mesh: the snapshot cut to that mesh, and
    the control plane's current policy set for it when one is known."""

    mesh: str
    window_seconds: float | None  # None: counters since each proxy started
    dataplanes: tuple[DataplaneEvidence, ...]
    destinations: tuple[DestinationView, ...] = ()
    # False: no destination inventory runs for this mesh (e.g. PromQL evidence).
    inventory: bool = True
    state: MeshState | None = None
    # Why ``state`` is None or may not be used (no CP, CP unreachable, stale).
    state_note: str = "no control plane lists this mesh"
    # True: the state is older than its source's stale_after.
    state_stale: bool = False
    # The snapshot's time: dataplanes offline for less than the window are
    # judged against it (never the request's clock).
    time: float = 0.0


@dataclass
class Decision:
    mesh: str
    kind: str
    name: str
    effect: str
    verdict: Verdict
    mode: str
    reasons: list[str]
    evidence: dict[str, Any] | None
    warnings: list[str] = field(default_factory=list)
    break_glass: str | None = None
    digest: str = ""
    dataplanes: list[dict[str, Any]] | None = None
    #: ``evidence`` and ``dataplanes`` as JSON, encoded once per judgement
    #: (shared by the requests that ask the same question of the same snapshot).
    evidence_json: str | None = None
    dataplanes_json: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mesh": self.mesh,
            "change": {"kind": self.kind, "name": self.name, "effect": self.effect},
            "verdict": self.verdict,
            "mode": self.mode,
            "reasons": self.reasons,
            "evidence": self.evidence,
        }
        if self.dataplanes is not None:
            out["dataplanes"] = self.dataplanes
        if self.break_glass is not None:
            out["break_glass"] = self.break_glass
        return out


Outcome = Literal["traffic", "conflict", "unproven", "unknown", "no_online", "stale", "clear"]


@dataclass(frozen=True)
class Judgement:
    """The evidence side of one change's decision (before mode and break glass)."""

    outcome: Outcome
    effect: str
    reasons: tuple[str, ...]
    evidence: dict[str, Any]  # shared by the decisions that use it: never mutated
    dataplanes: list[dict[str, Any]]
    warnings: tuple[str, ...] = ()

    @cached_property
    def evidence_json(self) -> str:
        return json.dumps(self.evidence)

    @cached_property
    def dataplanes_json(self) -> str:
        return json.dumps(self.dataplanes)


# --------------------------------------------------------------------------- judging


def _rows(keys: list[str], plan: plans.Plan, ev: Evidence,
          by_name: dict[str, DataplaneEvidence],
          dests: dict[str, list[DestinationView]]) -> list[Row]:
    """The dataplanes whose passthrough shrinks (or whose merge now fails),
    each judged on its window's traffic."""
    rows: list[Row] = []
    for key in keys:
        before, after = plan.before[key], plan.after[key]
        name = key.split("/", 1)[1]
        row = Row(name, before, after)
        shrinks = not (after.mode == "all" or before.mode == "off" or after.same_as(before))
        if not shrinks and not (after.conflict and after.conflict != before.conflict):
            continue
        judge_row(row, by_name.get(name), dests.get(name, []), ev)
        if not shrinks:
            row.lost.clear()
            row.unproven.clear()
            row.missing = 0
            row.unknown = None
        rows.append(row)
    return rows


def _blocked(lost: list[Row]) -> dict[str, dict[str, Any]]:
    """Per destination address: the dataplanes that would lose it, and how much."""
    blocked: dict[str, dict[str, Any]] = {}
    for r in lost:
        for addr, _, count in r.lost:
            if addr == UNOBSERVED:
                continue
            entry = blocked.setdefault(addr, {"address": addr, "dataplanes": [], "connections": 0})
            if len(entry["dataplanes"]) < MAX_NAMED:
                entry["dataplanes"].append(r.name)
            entry["connections"] += count
    return blocked


@dataclass
class _Sorted:
    """The rows of one judgement, by what they say."""

    rows: list[Row]
    lost: list[Row]
    conflicts: list[Row]
    unproven: list[Row]
    unknown: list[Row]

    @classmethod
    def of(cls, rows: list[Row]) -> _Sorted:
        return cls(rows, [r for r in rows if r.lost], [r for r in rows if r.conflict],
                   [r for r in rows if (r.unproven or r.missing) and not r.lost],
                   [r for r in rows if r.unknown and not r.lost and not r.unproven
                    and not r.missing])


def _facts(s: _Sorted, keys: list[str], ev: Evidence,
           blocked: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "window_seconds": ev.window_seconds,
        "dataplanes": {"total": len(keys), "with_traffic": len(s.lost),
                       "unknown": len(s.unknown), "offline": sum(1 for r in s.rows if r.offline)},
        "connections": sum(r.connections for r in s.lost),
        "active_connections": sum(r.active for r in s.lost),
        "destinations": sorted(blocked.values(),
                               key=lambda x: (-x["connections"], x["address"]))[:MAX_NAMED * 5],
    }


def _cut_reasons(s: _Sorted, keys: list[str], window: str,
                 blocked: dict[str, dict[str, Any]]) -> list[str]:
    """What the change would cut, what Kuma could not build, what is unproven."""
    reasons: list[str] = []
    if s.conflicts:
        reasons.append("Kuma cannot build the passthrough listener of "
                       + ", ".join(r.name for r in s.conflicts[:MAX_NAMED])
                       + f": {s.conflicts[0].conflict}; the whole configuration update of "
                         "those dataplanes would fail")
    if s.lost:
        connections = sum(r.connections for r in s.lost)
        reasons.append(
            f"{len(s.lost)} of {n(len(keys), 'dataplane')} opened "
            f"{n(connections, 'passthrough connection')} {window} that the change would cut: "
            + names([(r.name, r.connections) for r in s.lost if r.connections]
                    or [(r.name, 0) for r in s.lost]))
        opened = [(r.name, r.active) for r in s.lost if r.active]
        if opened:
            total = sum(a for _, a in opened)
            reasons.append(f"{n(total, 'passthrough connection')} "
                           f"{'is' if total == 1 else 'are'} open now: " + names(opened))
        if blocked:
            reasons.append("destinations that would be cut: " + names(
                [(x["address"], x["connections"]) for x in blocked.values()]))
    if s.unproven:
        reasons.append(
            f"{n(len(s.unproven), 'dataplane')} keep{'s' if len(s.unproven) == 1 else ''} "
            "traffic the after-state may not let through (unproven): "
            + names([(r.name, sum(c for _, _, c, _ in r.unproven) + r.missing)
                     for r in s.unproven])
            + ("; connections to destinations the inventory did not observe count as "
               "unproven (a shorter destinations.interval sees more)"
               if any(r.missing for r in s.unproven) else ""))
    return reasons


def _outcome(s: _Sorted, ch: Change, keys: list[str], plan: plans.Plan, ev: Evidence,
             window: str) -> tuple[Outcome, list[str]]:
    """The outcome, and the reason it adds when nothing is cut or unproven."""
    if s.conflicts:
        return "conflict", []
    if s.lost:
        return "traffic", []
    if s.unproven:
        return "unproven", []
    if s.unknown:
        return "unknown", [
            f"no passthrough traffic would be cut, but {len(s.unknown)} of "
            f"{n(len(keys), 'dataplane')} {'has' if len(s.unknown) == 1 else 'have'} no "
            f"complete evidence {window}: "
            + ", ".join(f"{r.name} ({r.unknown})" for r in s.unknown[:MAX_NAMED])
            + (f" and {len(s.unknown) - MAX_NAMED} more" if len(s.unknown) > MAX_NAMED
               else "")]
    if not plan.exact and _may_reduce(ch) and not any(d.state != "offline"
                                                        for d in ev.dataplanes):
        return "no_online", [f"passguard watches no online dataplane in mesh {ev.mesh!r}: "
                             "no evidence either way"]
    if not s.rows:
        return "clear", ["does not reduce any dataplane's effective passthrough"
                         + (f" ({n(len(keys), 'dataplane')} changed, none lost passthrough)"
                            if keys else "")]
    watched = sum(1 for r in s.rows if not r.offline)
    return "clear", [f"no passthrough traffic {window} that the change would cut, on "
                     f"{n(watched, 'watched dataplane')} whose passthrough shrinks"]


def _listed(rows: list[Row]) -> list[dict[str, Any]]:
    """The dataplanes with something to say (idle ones are only counted in
    the evidence), worst first, bounded."""
    findings = [r for r in rows if r.lost or r.conflict or r.unproven or r.missing or r.unknown]
    findings.sort(key=lambda r: (not r.lost, not r.conflict, not (r.unproven or r.missing),
                                 not r.unknown, -sum(c for _, _, c in r.lost), r.name))
    listed = [r.as_json() for r in findings[:MAX_DATAPLANES]]
    if len(findings) > MAX_DATAPLANES:
        listed.append({"omitted": len(findings) - MAX_DATAPLANES})
    return listed


def _judge(ch: Change, keys: list[str], plan: plans.Plan, ev: Evidence,
           by_name: dict[str, DataplaneEvidence],
           dests: dict[str, list[DestinationView]]) -> Judgement:
    window = window_words(ev.window_seconds)
    s = _Sorted.of(_rows(keys, plan, ev, by_name, dests))
    blocked = _blocked(s.lost)
    outcome, more = _outcome(s, ch, keys, plan, ev, window)
    reasons = _cut_reasons(s, keys, window, blocked) + more
    return Judgement(outcome, effect_words(ch.resource, ch.operation, plan.exact),
                     tuple(reasons), _facts(s, keys, ev, blocked), _listed(s.rows),
                     tuple(plan.warnings))


def _may_reduce(ch: Change) -> bool:
    """Can this document, whatever else holds, take passthrough away? A Mesh
    flag turned on or an ``All`` policy cannot (docs/semantics.md)."""
    r = ch.new
    if r is None:
        return True
    return r.mode == "None" if r.kind == "Mesh" else r.mode != "All"


def change_key(ch: Change) -> tuple[Any, ...]:
    """What a change means (not its digest): a probe and a real document that
    say the same share a judgement."""
    return (ch.operation, ch.old_source, plans.res_key(ch.new), plans.res_key(ch.old))


def judge_mesh(changes: Sequence[Change], ev: Evidence,
               memo: dict[Any, Any] | None = None) -> list[Judgement]:
    """One judgement per change of one mesh, all changes applied together."""
    key = (ev.mesh, id(ev.dataplanes), id(ev.destinations), id(ev.state), ev.state_stale,
           ev.window_seconds, ev.inventory, ev.time, tuple(change_key(c) for c in changes))
    if memo is not None:
        entry = memo.get(key)
        if entry is not None:
            out: list[Judgement] = entry[0]
            return out
    result = _judge_mesh(changes, ev)
    if memo is not None and len(memo) < MEMO_ENTRIES:
        # The entry holds the tuples its key names by identity: while it lives,
        # no other tuple can take their ids.
        memo[key] = (result, ev.dataplanes, ev.destinations, ev.state, tuple(changes))
    return result


def asked(memo: dict[Any, Any]) -> dict[str, list[tuple[Change, ...]]]:
    """The change lists judged in ``memo``, per mesh, in the order first
    asked (a snapshot's memo: what its readers asked about)."""
    out: dict[str, list[tuple[Change, ...]]] = {}
    for key, entry in list(memo.items()):
        if isinstance(key, tuple) and key and isinstance(key[0], str) \
                and isinstance(entry, tuple) and len(entry) > 4:
            out.setdefault(key[0], []).append(entry[4])
    return out


def _judge_mesh(changes: Sequence[Change], ev: Evidence) -> list[Judgement]:
    if ev.state is not None and ev.state_stale:
        reason = (f"the control plane's policies for mesh {ev.mesh!r} are stale: "
                  f"{ev.state_note}")
        # Only a Mesh flag turned on is safe whatever the policies say (M2).
        return [Judgement("clear", effect_words(c.resource, c.operation, False),
                          ("does not reduce passthrough whatever the current policies",),
                          _empty(ev), [])
                if c.new is not None and c.new.kind == "Mesh" and c.new.mode != "None"
                else Judgement("stale", effect_words(c.resource, c.operation, False), (reason,),
                               _empty(ev), []) for c in changes]
    if ev.state is not None:
        targets = [d.target for d in ev.dataplanes]
        known = {p.key for p in ev.state.proxies}
        plan = plans.exact(ev.mesh, changes, ev.state,
                           [t for t in targets if t.key not in known])
    else:
        plan = plans.conservative(ev.mesh, changes, [d.target for d in ev.dataplanes],
                                  None, ev.state_note)
    by_name = {d.target.dataplane: d for d in ev.dataplanes}
    dests: dict[str, list[DestinationView]] = {}
    for dest in ev.destinations:
        dests.setdefault(dest.dataplane, []).append(dest)
    out = []
    for ch, keys in zip(changes, plan.touched, strict=True):
        j = _judge(ch, keys, plan, ev, by_name, dests)
        if plan.assumptions:
            j = Judgement(j.outcome, j.effect, j.reasons, j.evidence, j.dataplanes,
                          (*j.warnings, *plan.assumptions))
        out.append(j)
    return out


def _empty(ev: Evidence) -> dict[str, Any]:
    return {"window_seconds": ev.window_seconds,
            "dataplanes": {"total": 0, "with_traffic": 0, "unknown": 0, "offline": 0},
            "connections": 0, "active_connections": 0, "destinations": []}


# --------------------------------------------------------------------------- verdicts


def cap(verdict: Verdict, mode: str) -> Verdict:
    limit = MODE_CAP[mode]
    return verdict if SEVERITY[verdict] <= SEVERITY[limit] else limit


def verdict_of(j: Judgement, ch: Change, policy: GatePolicy) -> Decision:
    r = ch.resource
    dec = Decision(mesh=r.mesh, kind=r.kind, name=r.name, effect=j.effect, verdict="allow",
                   mode=policy.mode, reasons=list(j.reasons), evidence=j.evidence,
                   digest=r.digest, dataplanes=j.dataplanes, evidence_json=j.evidence_json,
                   dataplanes_json=j.dataplanes_json)
    dec.warnings.extend(f"{r.kind} {r.name}: {w}" for w in j.warnings)
    base: Verdict = {
        "traffic": "deny", "conflict": "deny", "clear": "allow",
        "unproven": policy.on_unproven,
    }.get(j.outcome, policy.on_insufficient_data)  # type: ignore[assignment]
    verdict = cap(base, policy.mode)
    if verdict != base:
        dec.warnings.append(f"{policy.mode} mode: would {base} {r.kind} {r.name}: "
                            + "; ".join(dec.reasons))
    elif verdict == "warn":
        dec.warnings.append(f"{r.kind} {r.name}: " + "; ".join(dec.reasons))
    if verdict != "allow" and r.break_glass:
        dec.break_glass = r.break_glass
        dec.warnings.append(f"{r.kind} {r.name}: {BREAK_GLASS} overrides a {verdict}: "
                            f"{r.break_glass!r}")
        verdict = "warn"
    dec.verdict = verdict
    return dec


def decide_mesh(changes: Sequence[Change], evidence: Evidence, policy: GatePolicy,
                memo: dict[Any, Any] | None = None) -> list[Decision]:
    return [verdict_of(j, ch, policy)
            for j, ch in zip(judge_mesh(changes, evidence, memo), changes, strict=True)]


def decide(change: Change, evidence: Evidence, policy: GatePolicy,
           memo: dict[Any, Any] | None = None) -> Decision:
    """One change alone (the status page's probe, tests)."""
    return decide_mesh([change], evidence, policy, memo)[0]


def overall(decisions: Sequence[Decision], default_mode: str,
            warnings: Sequence[str]) -> dict[str, Any]:
    """The response body: the worst verdict wins; every warning is kept."""
    verdict: Verdict = "allow"
    for d in decisions:
        if SEVERITY[d.verdict] > SEVERITY[verdict]:
            verdict = d.verdict
    modes = {d.mode for d in decisions}
    all_warnings = list(warnings) + [w for d in decisions for w in d.warnings]
    return {
        "allowed": verdict != "deny",
        "verdict": verdict,
        "mode": modes.pop() if len(modes) == 1 else default_mode,
        "decisions": [d.to_json() for d in decisions],
        "warnings": all_warnings,
    }


__all__ = ["MODE_RANK", "Decision", "Evidence", "Judgement", "decide", "decide_mesh",
           "judge_mesh", "overall"]
