"""The gate's decision: a pure function of a change, the evidence and the policy.

``decide()`` does no I/O and reads no clock, so every mode × evidence × change
combination can be tested as a table, and the same evidence always gives the
same answer (before and after a restart, on every replica).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

from passguard.config import GatePolicy, format_duration
from passguard.envoy.names import FAMILIES, Family
from passguard.gate.documents import BREAK_GLASS, MODE_RANK, Change, Match, Resource, TargetRef
from passguard.store.destinations import DestinationView
from passguard.store.snapshot import DataplaneEvidence

Verdict = Literal["allow", "warn", "deny"]
SEVERITY: dict[str, int] = {"allow": 0, "warn": 1, "deny": 2}
MODE_CAP: dict[str, Verdict] = {"enforce": "deny", "warn": "warn", "audit": "allow"}
GENERIC: frozenset[Family] = frozenset({"ipv4", "ipv6", "legacy"})
ALL: frozenset[Family] = frozenset(FAMILIES)
MAX_NAMED = 10


@dataclass(frozen=True)
class Evidence:
    """What the gate knows about one mesh: the store's snapshot, cut to that mesh."""

    mesh: str
    window_seconds: float | None  # None: counters since each proxy started
    dataplanes: tuple[DataplaneEvidence, ...]
    destinations: tuple[DestinationView, ...] = ()
    # False: no destination inventory runs for this mesh (e.g. a one-shot check).
    inventory: bool = True


def covers(match: Match, dest: DestinationView) -> bool:
    """Does an appendMatch entry let this observed destination through?"""
    if match.port is not None and match.port != dest.port:
        return False
    try:
        ip = ipaddress.ip_address(dest.ip)
        if match.type == "IP":
            return ip == ipaddress.ip_address(match.value)
        if match.type == "CIDR":
            return ip in ipaddress.ip_network(match.value, strict=False)
    except ValueError:
        return False
    return False  # Domain: IP evidence cannot prove a name matches


@dataclass(frozen=True)
class Effect:
    reduces: bool
    description: str
    families: frozenset[Family] = frozenset()
    # What stays allowed (Matched): None means nothing in `families` does.
    allowed: tuple[Match, ...] | None = None


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
    #: ``evidence`` as JSON, when its summary encoded it (once per snapshot):
    #: the response and the audit entry use the text instead of encoding the
    #: same dict again for every request.
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
        if self.break_glass is not None:
            out["break_glass"] = self.break_glass
        return out


def effect_of(change: Change) -> Effect:
    """Does the change reduce passthrough, for which traffic families, in words."""
    new, old = change.new, change.old
    r = change.resource
    if new is None:
        assert old is not None
        if old.kind == "MeshPassthrough" and old.mode == "All":
            # The policy was what let traffic out: without it the proxies fall
            # back to another policy or the Mesh flag, which may be off.
            return Effect(True, "deletes a policy that allows all passthrough for "
                                f"{_scope_words(old.target_ref)}: the proxies fall back to "
                                "the Mesh setting", GENERIC)
        return Effect(False, f"deletes {r.kind} {r.name}")
    old_mode = old.mode if old is not None else "All"
    assumed = "" if old is not None else " (previous state assumed enabled)"
    if new.kind == "Mesh":
        if new.mode == "None" and old_mode != "None":
            return Effect(True, f"disables passthrough for the whole mesh{assumed}", GENERIC)
        if new.mode == "None":
            return Effect(False, "keeps passthrough disabled")
        return Effect(False, "keeps passthrough enabled" if old_mode != "None"
                      else "enables passthrough")
    scope = _scope_words(new.target_ref)
    if new.mode == "None":
        if old_mode == "None":
            return Effect(False, f"keeps passthrough disabled for {scope}")
        return Effect(True, f"disables passthrough for {scope}{assumed}", ALL)
    if new.mode == "Matched":
        if old_mode == "All":
            return Effect(True, f"limits passthrough for {scope} to {len(new.matches)} "
                                f"matched destination(s){assumed}", GENERIC, new.matches)
        if old_mode == "Matched":
            assert old is not None
            dropped = set(old.matches) - set(new.matches)
            if dropped:
                return Effect(True, f"removes {len(dropped)} passthrough match(es) for {scope}",
                              frozenset({"matched"}), new.matches)
            return Effect(False, f"keeps or widens the passthrough matches for {scope}")
        return Effect(False, f"opens passthrough to matched destinations for {scope}")
    return Effect(False, f"allows all passthrough for {scope}")


def _scope_words(ref: TargetRef) -> str:
    if ref.kind == "Mesh":
        return "the whole mesh"
    if ref.name:
        return f"{ref.kind} {ref.name}"
    sel = ref.labels or ref.tags
    if sel:
        return f"{ref.kind} " + ",".join(f"{k}={v}" for k, v in sorted(sel.items()))
    return f"every {ref.kind}"


def _tag(dp: DataplaneEvidence, key: str) -> str | None:
    if key in ("kuma.io/service", "service"):
        return dp.target.service or dp.target.tags.get(key)
    if key in ("kuma.io/mesh", "mesh"):
        return dp.target.mesh
    return dp.target.tags.get(key)


def select(ref: TargetRef, dps: Sequence[DataplaneEvidence]) -> tuple[list[DataplaneEvidence],
                                                                       str | None]:
    """Dataplanes a targetRef selects, and a warning when it had to be conservative."""
    if ref.kind == "Mesh":
        return list(dps), None
    if ref.kind == "Dataplane":
        out = [d for d in dps
               if (ref.name is None or d.target.dataplane == ref.name)
               and all(_tag(d, k) == v for k, v in ref.labels.items())]
        return out, None
    if ref.kind == "MeshSubset":
        return [d for d in dps if all(_tag(d, k) == v for k, v in ref.tags.items())], None
    return list(dps), (f"targetRef kind {ref.kind} is not resolved to dataplanes: every "
                       "dataplane of the mesh was considered")


def _names(items: list[tuple[str, int]]) -> str:
    items = sorted(items, key=lambda x: (-x[1], x[0]))
    text = ", ".join(f"{n} ({c})" for n, c in items[:MAX_NAMED])
    if len(items) > MAX_NAMED:
        text += f" and {len(items) - MAX_NAMED} more"
    return text


def _n(count: int, word: str) -> str:
    """``1 dataplane``, ``2 dataplanes``."""
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _window_words(window: float | None) -> str:
    if window is None:
        return "since the proxies started"
    return f"in the last {format_duration(window)}"


CutRow = tuple[DataplaneEvidence, int, int, list[DestinationView], int]


def _cut_traffic(online: list[DataplaneEvidence], fams: frozenset[Family],
                 allowed: tuple[Match, ...] | None, ev: Evidence) -> list[CutRow]:
    """Per dataplane: connections and open connections the change would cut, the
    observed destinations it would cut, and window connections no observed
    destination explains. Under Matched, a dataplane whose traffic is fully
    explained by covered destinations loses nothing."""
    by_dp: dict[str, list[DestinationView]] = {}
    for dest in ev.destinations:
        if dest.family in fams and (dest.window_connections > 0 or dest.active > 0):
            by_dp.setdefault(dest.dataplane, []).append(dest)
    rows: list[CutRow] = []
    for d in online:
        conns, active = d.connections_in(fams), d.active_in(fams)
        if conns == 0 and active == 0:
            continue
        dests = by_dp.get(d.target.dataplane, [])
        if allowed is None:
            rows.append((d, conns, active, dests, 0))
            continue
        uncovered = [x for x in dests if not any(covers(m, x) for m in allowed)]
        explained = sum(x.window_connections for x in dests)
        # Evidence from PromQL has no /clusters behind it: nothing is explained.
        inventory = ev.inventory and d.origin == "scrape"
        missing = max(0, conns - explained) + max(0, active - sum(x.active for x in dests)) \
            if inventory else conns + active
        if uncovered or missing:
            rows.append((d, conns, active, uncovered, missing))
    return rows


def cap(verdict: Verdict, mode: str) -> Verdict:
    limit = MODE_CAP[mode]
    return verdict if SEVERITY[verdict] <= SEVERITY[limit] else limit


#: Summaries kept per snapshot at most: a hostile client sending ever new
#: targetRefs or match lists must not grow a snapshot without bound.
MEMO_ENTRIES = 1024


@dataclass(frozen=True)
class Summary:
    """What the evidence of one mesh says about cutting ``families`` (keeping
    ``allowed``) for the dataplanes ``ref`` selects. A pure function of the
    snapshot and that key, so the gate computes it once per snapshot: every
    request about the same mesh and selector between two cycles shares it."""

    outcome: Literal["traffic", "no_online", "unknown", "clear"]
    reasons: tuple[str, ...]
    evidence: dict[str, Any]  # shared by the decisions that use it: never mutated
    select_warning: str | None

    @cached_property
    def evidence_json(self) -> str:
        """``evidence`` encoded, once: it was ~8 % of the event loop's time at
        500 requests/s, encoding the same few dicts for every response."""
        return json.dumps(self.evidence)


def _ref_key(ref: TargetRef) -> tuple[Any, ...]:
    return (ref.kind, ref.name, tuple(sorted(ref.labels.items())),
            tuple(sorted(ref.tags.items())))


def summarize(ref: TargetRef, fams: frozenset[Family], allowed: tuple[Match, ...] | None,
              evidence: Evidence, memo: dict[Any, Any] | None = None) -> Summary:
    """The evidence part of a decision, from ``memo`` when it is there.

    The key names the evidence by the identity of its tuples, and the entry
    holds them: while it exists no other tuple can have their ids, so an
    Evidence built differently (another selection, no destinations) can
    never be answered with this one's summary."""
    if memo is None:
        return _summarize(ref, fams, allowed, evidence)
    key = (evidence.mesh, id(evidence.dataplanes), id(evidence.destinations),
           evidence.window_seconds, evidence.inventory, _ref_key(ref), fams, allowed)
    entry = memo.get(key)
    if entry is None:
        entry = (_summarize(ref, fams, allowed, evidence), evidence.dataplanes,
                 evidence.destinations)
        if len(memo) < MEMO_ENTRIES:
            memo[key] = entry
    summary: Summary = entry[0]
    return summary


def _summarize(ref: TargetRef, fams: frozenset[Family], allowed: tuple[Match, ...] | None,
               evidence: Evidence) -> Summary:
    chosen, warning = select(ref, evidence.dataplanes)
    window = _window_words(evidence.window_seconds)
    online = [d for d in chosen if d.state != "offline"]
    cut = _cut_traffic(online, fams, allowed, evidence)
    with_traffic = [(d, c, a) for d, c, a, _, _ in cut]
    seen = {id(t[0]) for t in with_traffic}  # a set: 10,000 dataplanes made this O(n²)
    unknown = [d for d in online if d.unknown and id(d) not in seen]
    connections = sum(c for _, c, _ in with_traffic)
    active = sum(a for _, _, a in with_traffic)
    blocked_dests: dict[str, dict[str, Any]] = {}
    unexplained: list[tuple[str, int]] = []
    for d, _, _, dests, missing in cut:
        for dest in dests:
            entry = blocked_dests.setdefault(dest.address, {
                "address": dest.address, "dataplanes": [], "connections": 0})
            entry["dataplanes"].append(d.target.dataplane)
            entry["connections"] += dest.window_connections
        if missing:
            unexplained.append((d.target.dataplane, missing))
    facts = {
        "window_seconds": evidence.window_seconds,
        "dataplanes": {
            "total": len(chosen),
            "with_traffic": len(with_traffic),
            "unknown": len(unknown),
            "offline": len(chosen) - len(online),
        },
        "connections": connections,
        "active_connections": active,
        "destinations": sorted(blocked_dests.values(),
                               key=lambda x: (-x["connections"], x["address"])),
    }
    reasons: list[str] = []
    outcome: Literal["traffic", "no_online", "unknown", "clear"]
    if with_traffic:
        outcome = "traffic"
        reasons.append(
            f"{len(with_traffic)} of {_n(len(chosen), 'dataplane')} opened "
            f"{_n(connections, 'passthrough connection')} {window}: "
            + _names([(d.target.dataplane, c) for d, c, _ in with_traffic if c > 0] or
                     [(d.target.dataplane, 0) for d, _, _ in with_traffic]))
        if active:
            reasons.append(f"{_n(active, 'passthrough connection')} "
                           f"{'is' if active == 1 else 'are'} open now: "
                           + _names([(d.target.dataplane, a)
                                     for d, _, a in with_traffic if a > 0]))
        if blocked_dests and allowed is not None:
            reasons.append("destinations no appendMatch covers: " + _names(
                [(x["address"], x["connections"]) for x in blocked_dests.values()]))
        elif blocked_dests:
            reasons.append("destinations that would be cut: " + _names(
                [(x["address"], x["connections"]) for x in blocked_dests.values()]))
        if unexplained and allowed is not None:
            reasons.append(
                "connections to destinations the inventory did not observe (Envoy drops idle "
                "passthrough hosts after seconds; a shorter destinations.interval sees more): "
                + _names(unexplained))
    elif not online:
        outcome = "no_online"
        where = "" if ref.kind == "Mesh" else " selected by the targetRef"
        reasons.append(f"passguard watches no online dataplane{where} in mesh "
                       f"{evidence.mesh!r}: no evidence either way")
    elif unknown:
        outcome = "unknown"
        reasons.append(
            f"no passthrough traffic seen, but {len(unknown)} of {_n(len(chosen), 'dataplane')} "
            f"{'has' if len(unknown) == 1 else 'have'} no complete evidence {window}: "
            + ", ".join(f"{d.target.dataplane} ({d.unknown_reason()})"
                        for d in unknown[:MAX_NAMED])
            + (f" and {len(unknown) - MAX_NAMED} more" if len(unknown) > MAX_NAMED else ""))
    else:
        outcome = "clear"
        reasons.append(f"no passthrough traffic {window} on "
                       f"{_n(len(online), 'watched dataplane')}")
    return Summary(outcome, tuple(reasons), facts, warning)


def decide(change: Change, evidence: Evidence, policy: GatePolicy,
           memo: dict[Any, Any] | None = None) -> Decision:
    """``memo``: where summaries of this evidence are kept (the snapshot's)."""
    r: Resource = change.resource
    eff = effect_of(change)
    dec = Decision(mesh=r.mesh, kind=r.kind, name=r.name, effect=eff.description,
                   verdict="allow", mode=policy.mode, reasons=[], evidence=None, digest=r.digest)
    if not eff.reduces:
        dec.reasons.append(f"does not reduce passthrough: {eff.description}")
        return dec
    if eff.allowed is not None:
        for m in eff.allowed:
            if m.type == "Domain":
                dec.warnings.append(
                    f"{r.kind} {r.name}: appendMatch Domain {m.value}"
                    f"{':' + str(m.port) if m.port else ''} cannot be proven from IP evidence; "
                    "traffic to it counts as cut unless an IP or CIDR match covers it")
    summary = summarize(change.resource.target_ref, eff.families, eff.allowed, evidence, memo)
    if summary.select_warning:
        dec.warnings.append(f"{r.kind} {r.name}: {summary.select_warning}")
    dec.evidence = summary.evidence
    dec.evidence_json = summary.evidence_json
    dec.reasons.extend(summary.reasons)
    base: Verdict = "deny" if summary.outcome == "traffic" else \
        "allow" if summary.outcome == "clear" else policy.on_insufficient_data
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


__all__ = ["MODE_RANK", "Decision", "Effect", "Evidence", "Summary", "decide", "effect_of",
           "overall", "summarize"]
