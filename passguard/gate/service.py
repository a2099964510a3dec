"""From a request body to a response: load, interpret, decide for each change.

Shared by ``POST /v1/check`` and the standalone ``passguard check -c``, so a
pipeline gets the same answer from either.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from passguard.config import GateConfig
from passguard.gate.decide import ALL, GENERIC, Decision, Evidence, decide, overall, summarize
from passguard.gate.documents import TargetRef, parse_documents
from passguard.store.snapshot import Snapshot

#: What nearly every request asks about a mesh: passthrough off for all of
#: it (a Mesh flag or a MeshPassthrough deleted: the generic families; a
#: MeshPassthrough ``None``: every family).
COMMON_QUESTIONS = ((TargetRef(), GENERIC, None), (TargetRef(), ALL, None))


def evidence_of(snapshot: Snapshot, mesh: str) -> Evidence:
    """The evidence of ``mesh`` in ``snapshot``, built one way everywhere:
    the memo finds a summary by the identity of these tuples."""
    return Evidence(mesh, snapshot.window_seconds, snapshot.for_mesh(mesh),
                    snapshot.destinations_of(mesh))


def prepare(snapshot: Snapshot, mesh: str) -> None:
    """Compute the common summaries of ``mesh`` into the snapshot's memo (and
    their JSON), before the snapshot is published: otherwise the first
    request about each mesh after every cycle computed them, all within a few
    milliseconds of each other, and the requests behind them waited (a burst
    of answers over 10 ms at each cycle's end at 500 req/s)."""
    evidence = evidence_of(snapshot, mesh)
    for ref, families, allowed in COMMON_QUESTIONS:
        _ = summarize(ref, families, allowed, evidence, snapshot.memo).evidence_json


def check(docs: list[Any], old_docs: list[Any] | None, snapshot: Snapshot,
          gate: GateConfig) -> tuple[dict[str, Any], list[Decision]]:
    """Raise InputError for documents that cannot be used; otherwise the decision body."""
    parsed = parse_documents(docs, old_docs)
    decisions = []
    for change in parsed.changes:
        mesh = change.resource.mesh
        decisions.append(decide(change, evidence_of(snapshot, mesh), gate.policy_for(mesh),
                                snapshot.memo))
    body = overall(decisions, gate.mode, parsed.warnings)
    if snapshot.window_seconds is None:
        body["evidence_source"] = ("one scrape: each proxy's counters since it started "
                                   "(no evidence window)")
    return body, decisions


def _with_key(encoded: str, key: str, value: str) -> str:
    """``encoded`` (a JSON object) with ``key: value`` (JSON text) added."""
    sep = "" if encoded == "{}" else ", "
    return f"{encoded[:-1]}{sep}{json.dumps(key)}: {value}}}"


def encode(body: dict[str, Any], decisions: Sequence[Decision]) -> str:
    """``json.dumps(body)`` for a body from :func:`check`, with each
    decision's evidence spliced in as the text its summary encoded once per
    snapshot. A body whose decisions do not line up with ``decisions`` (or
    hold another evidence object) is encoded whole."""
    items = body.get("decisions")
    if not isinstance(items, list) or len(items) != len(decisions):
        return json.dumps(body)
    parts = []
    for item, d in zip(items, decisions, strict=True):
        if d.evidence_json is None or item.get("evidence") is not d.evidence:
            parts.append(json.dumps(item))
            continue
        rest = json.dumps({k: v for k, v in item.items() if k != "evidence"})
        parts.append(_with_key(rest, "evidence", d.evidence_json))
    head = json.dumps({k: v for k, v in body.items() if k != "decisions"})
    return _with_key(head, "decisions", "[" + ", ".join(parts) + "]")
