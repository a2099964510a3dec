"""Shadow policies, the pure part: what a proposed policy set would have done
to the connections passguard watched.

A shadow is a named set of Mesh / MeshPassthrough documents that is not
applied. After every destinations pass, each new connection increment an
``/clusters`` read attributed to a destination (``Destination.events``) is
replayed against the shadow's after-state: the connection would have been
refused (``cut``), may or may not have been let through (``unproven``:
transport or name unknown), or let through (``kept``). Only dataplanes whose
effective passthrough the shadow shrinks are judged, exactly as the gate
judges a request (``gate.plan``: exact with the control plane's policy set,
conservative without one).

No I/O, no clock, no aiohttp, no sqlite3: the daemon (``passguard.shadows``)
feeds it and persists what it returns. This module is also the one place the
shadow code imports the document parser from (it may move).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from passguard.documents import DEFAULT_MAX_MATCHES, Change, parse_documents
from passguard.errors import InputError
from passguard.gate import plan as plans
from passguard.gate.rows import reached, transport_word
from passguard.policy.effective import Effective
from passguard.policy.model import MeshState
from passguard.policy.reach import Reached
from passguard.store.destinations import Destination
from passguard.targets import Target

#: How many shadows the daemon keeps: each is evaluated on every pass and
#: adds series to /metrics, so the set is bounded (a 409 past it).
MAX_SHADOWS = 50
#: A DNS label: a shadow name is a Prometheus label value and a URL segment.
MAX_NAME = 63
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")

Outcome = Literal["cut", "unproven", "kept"]


def check_name(name: object) -> str:
    """The name, or InputError naming the field and the rule."""
    if not isinstance(name, str):
        raise InputError(f"name: must be a string, got {type(name).__name__}")
    if not _NAME.match(name):
        shown = name if len(name) <= MAX_NAME + 10 else name[:MAX_NAME] + "..."
        raise InputError(f"name: {shown!r} is not a valid shadow name: lowercase letters, "
                         f"digits and '-', starting and ending with a letter or digit, at "
                         f"most {MAX_NAME} characters")
    return name


@dataclass(frozen=True)
class Shadow:
    """One registered shadow: its documents as submitted and what they change."""

    name: str
    created: float
    requester: str
    documents: tuple[Any, ...]
    changes: tuple[Change, ...]
    #: Destination increments up to this time have been evaluated.
    evaluated_until: float

    @property
    def meshes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(ch.resource.mesh for ch in self.changes))

    def summary(self) -> list[dict[str, str]]:
        return [{"kind": ch.resource.kind, "name": ch.resource.name, "mesh": ch.resource.mesh,
                 "digest": ch.resource.digest} for ch in self.changes]


def parse_shadow(docs: list[Any], max_matches: int = DEFAULT_MAX_MATCHES
                 ) -> tuple[tuple[Change, ...], list[str]]:
    """The changes of a shadow's documents, validated exactly as ``/v1/check``
    validates a request, and the warnings (ignored kinds). A shadow is
    something to apply later, so it holds objects, not deletions or
    ``{object, oldObject}`` pairs."""
    parsed = parse_documents(docs, None, max_matches)
    for i, ch in enumerate(parsed.changes):
        if ch.new is None:
            raise InputError(f"documents[{i}]: a shadow holds objects to apply, not a "
                             "deletion (object: null)")
        if ch.old_source == "document":
            raise InputError(f"documents[{i}]: a shadow holds objects to apply, not an "
                             "{object, oldObject} pair: give the object alone")
    if not parsed.changes:
        raise InputError("documents: no Mesh or MeshPassthrough document"
                         + (f" ({'; '.join(parsed.warnings)})" if parsed.warnings else ""))
    return tuple(parsed.changes), parsed.warnings


# --------------------------------------------------------------------------- evidence


class Increment(NamedTuple):
    """New connections an ``/clusters`` read attributed to one destination."""

    key: str  # the dataplane's target key
    mesh: str
    dataplane: str
    address: str
    routes: tuple[str, ...]
    t: float
    n: int  # connections (``count`` would shadow tuple.count)


def increments(book: Iterable[tuple[str, Destination]], since: float) -> list[Increment]:
    """Every event of the destination book after ``since`` (events are
    appended in time order, so each destination's tail is read backwards)."""
    out = []
    for key, d in book:
        events = d.events
        if not events or events[-1][0] <= since:
            continue
        for t, n in reversed(events):
            if t <= since:
                break
            out.append(Increment(key, d.mesh, d.dataplane, d.address, d.routes, t, n))
    return out



# --------------------------------------------------------------------------- after-state


def shrinks(before: Effective, after: Effective) -> bool:
    """The gate's rule (``gate.decide``): only a dataplane that loses
    passthrough is judged."""
    return not (after.mode == "all" or before.mode == "off" or after.same_as(before))


def after_states(shadow: Shadow, mesh: str, state: MeshState | None,
                 targets: Sequence[Target]) -> dict[str, Effective]:
    """Per dataplane key of ``mesh`` that the shadow shrinks: its after-state."""
    changes = [ch for ch in shadow.changes if ch.resource.mesh == mesh]
    if not changes:
        return {}
    if state is not None:
        known = {p.key for p in state.proxies}
        plan = plans.exact(mesh, changes, state, [t for t in targets if t.key not in known])
    else:
        plan = plans.conservative(mesh, changes, targets, None,
                                  "no control plane lists this mesh")
    keys = {k for ks in plan.touched for k in ks}
    # Equal after-states shared as one object: most dataplanes of a mesh get
    # the same one, and ``evaluate`` remembers outcomes per object.
    canon: dict[Effective, Effective] = {}
    return {k: canon.setdefault(plan.after[k], plan.after[k])
            for k in keys if shrinks(plan.before[k], plan.after[k])}


# --------------------------------------------------------------------------- tallies


@dataclass
class DestTally:
    """One destination of one dataplane, in one evaluation."""

    transport: str | None = None
    refused: int = 0
    unproven: int = 0
    allowed: int = 0
    first_refused: float | None = None
    last_refused: float | None = None
    first_unproven: float | None = None
    last_unproven: float | None = None


@dataclass
class Tally:
    """What one evaluation adds to one shadow's record."""

    shadow: str
    until: float
    #: (mesh, dataplane, address) → counts
    destinations: dict[tuple[str, str, str], DestTally] = field(default_factory=dict)
    #: (mesh, dataplane, address, hour) → [refused, unproven]
    hours: dict[tuple[str, str, str, int], list[int]] = field(default_factory=dict)

    def dataplanes(self) -> dict[tuple[str, str], tuple[int, int, int]]:
        """(mesh, dataplane) → (refused, unproven, allowed)."""
        out: dict[tuple[str, str], tuple[int, int, int]] = {}
        for (mesh, dp, _), d in self.destinations.items():
            r, u, a = out.get((mesh, dp), (0, 0, 0))
            out[(mesh, dp)] = (r + d.refused, u + d.unproven, a + d.allowed)
        return out


def classify(after: Effective, inc: Increment) -> tuple[Outcome, Reached]:
    r = reached(inc.address, inc.routes)
    outcome = after.keeps(r)
    return outcome, r  # type: ignore[return-value]


def evaluate(shadow: Shadow, after: Mapping[str, Effective], incs: Iterable[Increment],
             until: float) -> Tally:
    """Replay the increments after the shadow's cursor against ``after``
    (dataplane key → after-state, shrinking dataplanes only)."""
    tally = Tally(shadow.name, until)
    since = max(shadow.evaluated_until, shadow.created)
    # (after-state, destination) → outcome: the same destination reached from
    # many dataplanes with the same after-state is judged once (the objects
    # live in ``after`` for the whole call, so their ids are stable).
    memo: dict[tuple[int, str, tuple[str, ...]], tuple[Outcome, Reached]] = {}
    for inc in incs:
        eff = after.get(inc.key)
        if eff is None or not since < inc.t <= until:
            continue
        mk = (id(eff), inc.address, inc.routes)
        hit = memo.get(mk)
        if hit is None:
            hit = memo[mk] = classify(eff, inc)
        outcome, r = hit
        k = (inc.mesh, inc.dataplane, inc.address)
        d = tally.destinations.get(k)
        if d is None:
            d = tally.destinations[k] = DestTally()
        d.transport = transport_word(r.transport) or d.transport
        if outcome == "kept":
            d.allowed += inc.n
            continue
        bucket = tally.hours.setdefault((*k, int(inc.t // 3600)), [0, 0])
        if outcome == "cut":
            d.refused += inc.n
            bucket[0] += inc.n
            d.first_refused = inc.t if d.first_refused is None else min(d.first_refused, inc.t)
            d.last_refused = inc.t if d.last_refused is None else max(d.last_refused, inc.t)
        else:
            d.unproven += inc.n
            bucket[1] += inc.n
            d.first_unproven = inc.t if d.first_unproven is None \
                else min(d.first_unproven, inc.t)
            d.last_unproven = inc.t if d.last_unproven is None else max(d.last_unproven, inc.t)
    return tally


class PlanCache:
    """After-states per shadow and mesh, recomputed only when the control
    plane's state object or the mesh's targets change: a plan over 1,000
    dataplanes costs milliseconds, and the inputs change far less often than
    every pass."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], tuple[tuple[Any, ...], dict[str, Effective]]] = {}

    def get(self, shadow: Shadow, mesh: str, state: MeshState | None,
            targets: Sequence[Target]) -> dict[str, Effective]:
        # The state by identity (it is replaced, never mutated; the entry
        # holds it, so its id cannot be reused), the targets by value, the
        # shadow by its creation time (a name may be reused).
        stamp = (shadow.created, state, tuple(targets))
        entry = self._entries.get((shadow.name, mesh))
        if entry is not None and entry[0][0] == stamp[0] and entry[0][1] is state \
                and entry[0][2] == stamp[2]:
            return entry[1]
        after = after_states(shadow, mesh, state, targets)
        self._entries[(shadow.name, mesh)] = (stamp, after)
        return after

    def forget(self, keep: Iterable[str]) -> None:
        names = set(keep)
        for k in [k for k in self._entries if k[0] not in names]:
            del self._entries[k]
