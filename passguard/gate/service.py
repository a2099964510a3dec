"""From a request body to a response: load, interpret, decide for each change.

Shared by ``POST /v1/check`` and the standalone ``passguard check -c``, so a
pipeline gets the same answer from either.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from passguard.documents import (
    DEFAULT_MAX_MATCHES,
    Change,
    Parsed,
    Resource,
    parse_documents,
)
from passguard.gate.decide import (
    Decision,
    Evidence,
    asked,
    change_key,
    decide_mesh,
    judge_mesh,
    overall,
)
from passguard.policy.model import MeshState
from passguard.store.snapshot import Snapshot
from passguard.verdicts import GateConfig

States = Mapping[str, MeshState]


def mesh_off(mesh: str) -> Change:
    """``passthrough: false`` on ``mesh``: what the status page and
    ``verdict_if_disabled`` ask, and what nearly every request asks."""
    return Change(Resource("Mesh", mesh, mesh, "universal", "None"), None, "assumed")


def evidence_of(snapshot: Snapshot, mesh: str, states: States | None = None,
                now: float | None = None) -> Evidence:
    """The evidence of ``mesh`` in ``snapshot``, built one way everywhere:
    the memo finds a judgement by the identity of these tuples."""
    state = (states or {}).get(mesh)
    stale = False
    note = "no control plane lists this mesh"
    if state is not None:
        age = (now if now is not None else snapshot.time) - state.as_of
        stale = state.stale(now if now is not None else snapshot.time)
        note = (f"{state.source} last listed it {age:.0f}s ago (stale_after "
                f"{state.stale_after:g}s)")
    return Evidence(mesh, snapshot.window_seconds, snapshot.for_mesh(mesh),
                    snapshot.destinations_of(mesh), state=state, state_note=note,
                    state_stale=stale, time=snapshot.time)


def prepare(snapshot: Snapshot, mesh: str, states: States | None = None) -> None:
    """Compute the common judgement of ``mesh`` (passthrough off) into the
    snapshot's memo, with its JSON, before the snapshot is published:
    otherwise the first request about each mesh after every cycle computed
    it, all within a few milliseconds of each other, and the requests behind
    them waited. ``prepare_all`` does it for every mesh, and more."""
    _prepare_one(snapshot, evidence_of(snapshot, mesh, states), (mesh_off(mesh),))


def _prepare_one(snapshot: Snapshot, ev: Evidence, changes: tuple[Change, ...]) -> None:
    for j in judge_mesh(changes, ev, snapshot.memo):
        _ = j.evidence_json, j.dataplanes_json


#: The questions the last snapshot was asked, asked again of the next before
#: it is published: at most this many per mesh, and in all. At 500 requests/s
#: over 20 meshes of 500 dataplanes, the gate is asked 3-4 kinds of document
#: per mesh; each kind's first request after a publish judged it anew
#: (8-13 ms each, ~50 back to back), and that burst set the gate's p99.
AGAIN_PER_MESH = 8
AGAIN_IN_ALL = 256
#: Above this cost (dataplanes and destinations of the mesh), a judgement is
#: prepared in the gate's worker thread (~12 ms of CPU at 2,000); below, it is
#: one piece of the loop (~3 ms at 500). A thread shares the GIL with every
#: request for as long as it runs (a request's wait for the GIL, at each of its
#: system calls, is up to a switch interval); a piece delays only the requests
#: that arrive during it.
PREPARE_THREAD_COST = 2_000


def asked_again(previous: Snapshot | None) -> dict[str, list[tuple[Change, ...]]]:
    """What ``previous`` was asked per mesh (its memo), within the bounds."""
    if previous is None:
        return {}
    out: dict[str, list[tuple[Change, ...]]] = {}
    left = AGAIN_IN_ALL
    for mesh, lists in asked(previous.memo).items():
        kept = [c for c in lists if not _is_mesh_off(c, mesh)][:min(AGAIN_PER_MESH, left)]
        if kept:
            out[mesh] = kept
            left -= len(kept)
        if left <= 0:
            break
    return out


def _is_mesh_off(changes: tuple[Change, ...], mesh: str) -> bool:
    return len(changes) == 1 and change_key(changes[0]) == change_key(mesh_off(mesh))


async def prepare_all(snapshot: Snapshot, states: States | None,
                      pause: Callable[[], Awaitable[None]],
                      previous: Snapshot | None = None) -> None:
    """``prepare`` for every mesh of an unpublished snapshot (nothing else
    reads it meanwhile), with what ``previous`` was asked about it, one
    judgement per piece and ``pause()`` before each: the daemon's gives way
    to the gate's requests. A mesh above PREPARE_THREAD_COST is judged in
    the gate's worker thread."""
    loop = asyncio.get_running_loop()
    again = asked_again(previous)
    for mesh in snapshot.meshes():
        ev = evidence_of(snapshot, mesh, states)
        large = len(ev.dataplanes) + len(ev.destinations) > PREPARE_THREAD_COST
        for changes in ((mesh_off(mesh),), *again.get(mesh, [])):
            await pause()
            if large:
                await loop.run_in_executor(_WORKER, _prepare_one, snapshot, ev, changes)
            else:
                _prepare_one(snapshot, ev, changes)


def check(docs: list[Any], old_docs: list[Any] | None, snapshot: Snapshot,
          gate: GateConfig, states: States | None = None, now: float | None = None,
          max_matches: int = DEFAULT_MAX_MATCHES) -> tuple[dict[str, Any], list[Decision]]:
    """Raise InputError for documents that cannot be used; otherwise the decision body.
    The changes of one mesh are judged together: what they do at once."""
    return judge(parse_documents(docs, old_docs, max_matches), snapshot, gate, states, now)


#: Above this ``cost``, a judgement runs in the gate's worker thread: the event
#: loop keeps answering probes and small requests meanwhile (the GIL is handed
#: over every few milliseconds). Below it, a thread hop would cost more than
#: the work (a common request is about a mesh of tens of dataplanes).
THREAD_COST = 20_000
_WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="passguard-gate")


async def check_async(docs: list[Any], snapshot: Snapshot, gate: GateConfig,
                      states: States | None, now: float,
                      max_matches: int = DEFAULT_MAX_MATCHES
                      ) -> tuple[dict[str, Any], list[Decision]]:
    """``check`` for the HTTP routes: parsed on the loop (bounded by the
    loader's limits), judged in the worker thread when it may be large. One
    worker: large judgements queue behind each other, never pile up threads."""
    parsed = parse_documents(docs, None, max_matches)
    if cost(parsed, snapshot) <= THREAD_COST:
        return judge(parsed, snapshot, gate, states, now)
    return await asyncio.get_running_loop().run_in_executor(
        _WORKER, judge, parsed, snapshot, gate, states, now)


def cost(parsed: Parsed, snapshot: Snapshot) -> int:
    """A bound on a judgement's work: per mesh, its dataplanes and observed
    destinations times the entries the request brings (each destination is
    looked up in an index of them, each dataplane merges the policies)."""
    by_mesh: dict[str, int] = {}
    for ch in parsed.changes:
        entries = sum(len(r.matches) for r in (ch.new, ch.old) if r is not None)
        by_mesh[ch.resource.mesh] = by_mesh.get(ch.resource.mesh, 0) + 1 + entries
    return sum(n * (len(snapshot.for_mesh(m)) + len(snapshot.destinations_of(m)))
               for m, n in by_mesh.items())


def judge(parsed: Parsed, snapshot: Snapshot, gate: GateConfig,
          states: States | None = None,
          now: float | None = None) -> tuple[dict[str, Any], list[Decision]]:
    """The decision body for changes already parsed. Pure: safe in a thread
    (the snapshot and states are immutable; the memo takes whole entries)."""
    by_mesh: dict[str, list[int]] = {}
    for i, change in enumerate(parsed.changes):
        by_mesh.setdefault(change.resource.mesh, []).append(i)
    decisions: list[Decision | None] = [None] * len(parsed.changes)
    for mesh, idx in by_mesh.items():
        changes = [parsed.changes[i] for i in idx]
        for i, d in zip(idx, decide_mesh(changes, evidence_of(snapshot, mesh, states, now),
                                         gate.policy_for(mesh), snapshot.memo), strict=True):
            decisions[i] = d
    done = [d for d in decisions if d is not None]
    body = overall(done, gate.mode, parsed.warnings)
    if snapshot.window_seconds is None:
        body["evidence_source"] = ("one scrape: each proxy's counters since it started "
                                   "(no evidence window)")
    return body, done


def _with_key(encoded: str, key: str, value: str) -> str:
    """``encoded`` (a JSON object) with ``key: value`` (JSON text) added."""
    sep = "" if encoded == "{}" else ", "
    return f"{encoded[:-1]}{sep}{json.dumps(key)}: {value}}}"


def encode(body: dict[str, Any], decisions: Sequence[Decision]) -> str:
    """``json.dumps(body)`` for a body from :func:`check`, with each
    decision's evidence and dataplane list spliced in as the text its summary
    encoded once per snapshot. A body whose decisions do not line up with
    ``decisions`` (or hold other objects) is encoded whole."""
    items = body.get("decisions")
    if not isinstance(items, list) or len(items) != len(decisions):
        return json.dumps(body)
    parts = []
    for item, d in zip(items, decisions, strict=True):
        spliced = {k: text for k, obj, text in (("evidence", d.evidence, d.evidence_json),
                                                 ("dataplanes", d.dataplanes, d.dataplanes_json))
                   if text is not None and k in item and item[k] is obj}
        if "evidence" not in spliced:
            parts.append(json.dumps(item))
            continue
        rest = json.dumps({k: v for k, v in item.items() if k not in spliced})
        for k, text in spliced.items():
            rest = _with_key(rest, k, text)
        parts.append(rest)
    head = json.dumps({k: v for k, v in body.items() if k != "decisions"})
    return _with_key(head, "decisions", "[" + ", ".join(parts) + "]")
