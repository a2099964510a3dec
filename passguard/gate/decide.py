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

import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

from passguard.documents import BREAK_GLASS, MODE_RANK, Change, Resource
from passguard.durations import format_duration
from passguard.envoy.names import parse_route
from passguard.gate import plan as plans
from passguard.policy.effective import Effective
from passguard.policy.model import Match, MeshState
from passguard.policy.reach import Reached
from passguard.store.destinations import DestinationView
from passguard.store.snapshot import DataplaneEvidence
from passguard.verdicts import GatePolicy

Verdict = Literal["allow", "warn", "deny"]
SEVERITY: dict[str, int] = {"allow": 0, "warn": 1, "deny": 2}
MODE_CAP: dict[str, Verdict] = {"enforce": "deny", "warn": "warn", "audit": "allow"}
MAX_NAMED = 10
#: Bounds of a decision's per-dataplane list, so an answer stays small
#: whatever the mesh: the dataplanes that matter first, then a count.
MAX_DATAPLANES = 100
MAX_LOST = 20
#: Judgements kept per snapshot: a client sending ever new documents must
#: not grow a snapshot without bound.
MEMO_ENTRIES = 1024
UNOBSERVED = "(destinations not observed)"


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
    #: ``evidence`` as JSON, encoded once per judgement (shared by the
    #: requests that ask the same question of the same snapshot).
    evidence_json: str | None = None

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


# --------------------------------------------------------------------------- evidence


def via_of(dest: DestinationView) -> tuple[str | None, Match | None]:
    """The transport and the entry a destination went by, from the
    meshpassthrough_* cluster names that carried it (one is enough)."""
    for route in dest.routes:
        parsed = parse_route(route)
        if parsed is None:
            continue
        proto, value, port = parsed
        if proto is None:
            continue  # Kuma 2.8 - 2.9.1 names say no protocol
        kind = "CIDR" if "/" in value else "IP" if _is_ip(value) else "Domain"
        return ("tls" if proto == "tls" else "raw"), Match(kind, value, port, proto)
    return None, None


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def transport_word(transport: str | None) -> str | None:
    """``tls`` or ``tcp`` (plain) as the API and appendMatch spell them."""
    return None if transport is None else "tls" if transport == "tls" else "tcp"


def _reached(dest: DestinationView) -> Reached:
    transport, via = via_of(dest)
    return Reached(dest.ip, dest.port, transport, via)  # type: ignore[arg-type]


@dataclass
class _Row:
    """One dataplane a change alters, with what the after-state does to its traffic."""

    name: str
    before: Effective
    after: Effective
    connections: int = 0
    active: int = 0
    lost: list[tuple[str, str | None, int]] = field(default_factory=list)
    unproven: list[tuple[str, str | None, int, str]] = field(default_factory=list)
    missing: int = 0  # window connections no observed destination explains
    unknown: str | None = None
    conflict: str | None = None
    offline: bool = False

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "dataplane": self.name, "before": self.before.label(), "after": self.after.label(),
            "lost": [{"address": a, "transport": transport_word(t), "connections": c}
                     for a, t, c in self.lost[:MAX_LOST]],
            "unproven": [{"address": a, "transport": transport_word(t), "connections": c,
                          "why": w} for a, t, c, w in self.unproven[:MAX_LOST]],
        }
        if self.missing:
            out["unobserved_connections"] = self.missing
        if self.unknown:
            out["unknown"] = self.unknown
        if self.conflict:
            out["conflict"] = self.conflict
        return out


def _judge_row(row: _Row, d: DataplaneEvidence | None, dests: list[DestinationView],
               ev: Evidence) -> None:
    if row.after.conflict and row.after.conflict != row.before.conflict:
        row.conflict = row.after.conflict
    if d is None:
        row.unknown = "passguard does not watch it (no scrape target)"
        return
    conns = d.connections
    active = d.active_connections
    row.connections, row.active = conns, active
    if d.state == "offline":
        row.offline = True
        since = d.target.offline_since
        window = ev.window_seconds
        recent = since is not None and window is not None and ev.time - since < window
        if not conns and not active:
            # Offline for less than the window: it applies the change when it
            # reconnects; its evidence must cover the window to vouch for it.
            if recent and not d.covered:
                row.unknown = ("offline for less than the window and its evidence does not "
                               "cover the window: " + d.unknown_reason())
            return
    if not conns and not active:
        if d.unknown:
            row.unknown = d.unknown_reason()
        return
    explained = explained_active = 0
    for dest in dests:
        if not dest.window_connections and not dest.active:
            continue
        explained += dest.window_connections
        explained_active += dest.active
        reached = _reached(dest)
        count = dest.window_connections or dest.active
        outcome = row.after.keeps(reached)
        if outcome == "cut":
            row.lost.append((dest.address, reached.transport, count))
        elif outcome == "unproven":
            row.unproven.append((dest.address, reached.transport, count, _why(row.after, reached)))
    # Connections no observed destination explains (Envoy drops idle hosts
    # from /clusters within seconds; PromQL evidence has no /clusters at all).
    if ev.inventory and d.origin == "scrape":
        missing, missing_open = max(0, conns - explained), max(0, active - explained_active)
    else:
        missing, missing_open = conns, active
    count = missing or missing_open
    if count:
        if row.after.mode == "off":
            row.lost.append((UNOBSERVED, None, count))
        else:
            row.missing = count


def _why(after: Effective, reached: Reached) -> str:
    if reached.transport is None:
        return ("the evidence does not show whether it is TLS or plain TCP, and the "
                "remaining entries keep only one of them")
    return "only a Domain or HTTP entry may keep it: IP evidence cannot prove a name or HTTP"


# --------------------------------------------------------------------------- words


def _names(items: list[tuple[str, int]]) -> str:
    items = sorted(items, key=lambda x: (-x[1], x[0]))
    text = ", ".join(f"{n} ({c})" for n, c in items[:MAX_NAMED])
    if len(items) > MAX_NAMED:
        text += f" and {len(items) - MAX_NAMED} more"
    return text


def _n(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _window_words(window: float | None) -> str:
    if window is None:
        return "since the proxies started"
    return f"in the last {format_duration(window)}"


def effect_words(r: Resource, operation: str, exact: bool) -> str:
    assumed = "" if exact else " (previous state assumed enabled)"
    if r.kind == "Mesh":
        if operation == "DELETE":
            return f"deletes Mesh {r.name}"
        if r.mode == "None":
            return f"disables passthrough for the whole mesh{assumed}"
        return "enables passthrough for the whole mesh (where no MeshPassthrough applies)"
    scope = r.target_ref.words()
    if operation == "DELETE":
        return (f"deletes MeshPassthrough {r.name} ({scope}): its dataplanes fall back to "
                "the other policies or the Mesh flag")
    mode = r.mode or "unset (the version's default)"
    extra = f", {len(r.matches)} appendMatch entries" if r.matches else ""
    return f"sets passthroughMode {mode} for {scope}{extra}{assumed}"


# --------------------------------------------------------------------------- judging


def _judge(ch: Change, keys: list[str], plan: plans.Plan, ev: Evidence,
           by_name: dict[str, DataplaneEvidence],
           dests: dict[str, list[DestinationView]]) -> Judgement:
    effect = effect_words(ch.resource, ch.operation, plan.exact)
    window = _window_words(ev.window_seconds)
    rows: list[_Row] = []
    for key in keys:
        before, after = plan.before[key], plan.after[key]
        name = key.split("/", 1)[1]
        row = _Row(name, before, after)
        shrinks = not (after.mode == "all" or before.mode == "off" or after.same_as(before))
        if not shrinks and not (after.conflict and after.conflict != before.conflict):
            continue
        _judge_row(row, by_name.get(name), dests.get(name, []), ev)
        if not shrinks:
            row.lost.clear()
            row.unproven.clear()
            row.missing = 0
            row.unknown = None
        rows.append(row)
    lost = [r for r in rows if r.lost]
    conflicts = [r for r in rows if r.conflict]
    unproven = [r for r in rows if (r.unproven or r.missing) and not r.lost]
    unknown = [r for r in rows if r.unknown and not r.lost and not r.unproven and not r.missing]
    offline = sum(1 for r in rows if r.offline)
    connections = sum(r.connections for r in lost)
    active = sum(r.active for r in lost)
    blocked: dict[str, dict[str, Any]] = {}
    for r in lost:
        for addr, _, count in r.lost:
            if addr == UNOBSERVED:
                continue
            entry = blocked.setdefault(addr, {"address": addr, "dataplanes": [], "connections": 0})
            if len(entry["dataplanes"]) < MAX_NAMED:
                entry["dataplanes"].append(r.name)
            entry["connections"] += count
    facts: dict[str, Any] = {
        "window_seconds": ev.window_seconds,
        "dataplanes": {"total": len(keys), "with_traffic": len(lost), "unknown": len(unknown),
                       "offline": offline},
        "connections": connections,
        "active_connections": active,
        "destinations": sorted(blocked.values(),
                               key=lambda x: (-x["connections"], x["address"]))[:MAX_NAMED * 5],
    }
    reasons: list[str] = []
    outcome: Outcome
    if conflicts:
        reasons.append("Kuma cannot build the passthrough listener of "
                       + ", ".join(r.name for r in conflicts[:MAX_NAMED])
                       + f": {conflicts[0].conflict}; the whole configuration update of "
                         "those dataplanes would fail")
    if lost:
        outcome = "traffic"
        reasons.append(
            f"{len(lost)} of {_n(len(keys), 'dataplane')} opened "
            f"{_n(connections, 'passthrough connection')} {window} that the change would cut: "
            + _names([(r.name, r.connections) for r in lost if r.connections]
                     or [(r.name, 0) for r in lost]))
        opened = [(r.name, r.active) for r in lost if r.active]
        if opened:
            reasons.append(f"{_n(sum(a for _, a in opened), 'passthrough connection')} "
                           f"{'is' if sum(a for _, a in opened) == 1 else 'are'} open now: "
                           + _names(opened))
        if blocked:
            reasons.append("destinations that would be cut: " + _names(
                [(x["address"], x["connections"]) for x in blocked.values()]))
    if unproven:
        reasons.append(
            f"{_n(len(unproven), 'dataplane')} keep{'s' if len(unproven) == 1 else ''} traffic "
            "the after-state may not let through (unproven): "
            + _names([(r.name, sum(c for _, _, c, _ in r.unproven) + r.missing)
                      for r in unproven])
            + ("; connections to destinations the inventory did not observe count as "
               "unproven (a shorter destinations.interval sees more)"
               if any(r.missing for r in unproven) else ""))
    if conflicts:
        outcome = "conflict"
    elif lost:
        outcome = "traffic"
    elif unproven:
        outcome = "unproven"
    elif unknown:
        outcome = "unknown"
        reasons.append(
            f"no passthrough traffic would be cut, but {len(unknown)} of "
            f"{_n(len(keys), 'dataplane')} {'has' if len(unknown) == 1 else 'have'} no "
            f"complete evidence {window}: "
            + ", ".join(f"{r.name} ({r.unknown})" for r in unknown[:MAX_NAMED])
            + (f" and {len(unknown) - MAX_NAMED} more" if len(unknown) > MAX_NAMED else ""))
    elif not plan.exact and _may_reduce(ch) and not any(d.state != "offline"
                                                          for d in ev.dataplanes):
        outcome = "no_online"
        reasons.append(f"passguard watches no online dataplane in mesh {ev.mesh!r}: "
                       "no evidence either way")
    elif not rows:
        outcome = "clear"
        reasons.append("does not reduce any dataplane's effective passthrough"
                       + (f" ({_n(len(keys), 'dataplane')} changed, none lost passthrough)"
                          if keys else ""))
    else:
        outcome = "clear"
        watched = sum(1 for r in rows if not r.offline)
        reasons.append(f"no passthrough traffic {window} that the change would cut, on "
                       f"{_n(watched, 'watched dataplane')} whose passthrough shrinks")
    # Listed: the dataplanes with something to say (idle ones are only
    # counted in the evidence), worst first, bounded.
    findings = [r for r in rows if r.lost or r.conflict or r.unproven or r.missing or r.unknown]
    findings.sort(key=lambda r: (not r.lost, not r.conflict, not (r.unproven or r.missing),
                                 not r.unknown, -sum(c for _, _, c in r.lost), r.name))
    listed = [r.as_json() for r in findings[:MAX_DATAPLANES]]
    if len(findings) > MAX_DATAPLANES:
        listed.append({"omitted": len(findings) - MAX_DATAPLANES})
    return Judgement(outcome, effect, tuple(reasons), facts, listed, tuple(plan.warnings))


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
        memo[key] = (result, ev.dataplanes, ev.destinations, ev.state)
    return result


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
                   digest=r.digest, dataplanes=j.dataplanes, evidence_json=j.evidence_json)
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
