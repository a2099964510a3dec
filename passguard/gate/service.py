"""From a request body to a response: load, interpret, decide for each change.

Shared by ``POST /v1/check`` and the standalone ``passguard check -c``, so a
pipeline gets the same answer from either.
"""

from __future__ import annotations

from typing import Any

from passguard.config import GateConfig
from passguard.gate.decide import Decision, Evidence, decide, overall
from passguard.gate.documents import parse_documents
from passguard.store.snapshot import Snapshot


def check(docs: list[Any], old_docs: list[Any] | None, snapshot: Snapshot,
          gate: GateConfig) -> tuple[dict[str, Any], list[Decision]]:
    """Raise InputError for documents that cannot be used; otherwise the decision body."""
    parsed = parse_documents(docs, old_docs)
    decisions = []
    for change in parsed.changes:
        mesh = change.resource.mesh
        evidence = Evidence(mesh, snapshot.window_seconds, snapshot.for_mesh(mesh),
                            snapshot.destinations_of(mesh))
        decisions.append(decide(change, evidence, gate.policy_for(mesh), snapshot.memo))
    body = overall(decisions, gate.mode, parsed.warnings)
    if snapshot.window_seconds is None:
        body["evidence_source"] = ("one scrape: each proxy's counters since it started "
                                   "(no evidence window)")
    return body, decisions
