"""Post-deploy verify: did the proxies refuse passthrough connections after a change?

Once a lockdown is in, Envoy counts what it refuses: ``downstream_cx_no_route``
on the passthrough listener (the cluster is gone: Mesh ``passthrough: false``,
MeshPassthrough ``None``), ``no_filter_chain_match`` on the listener (a
``Matched`` set without a chain for the destination) — both read into the
``no_route`` counter (passguard/envoy/stats.py) — plus connect failures and
circuit-breaker overflows of the passthrough clusters that remain. This module
sums their increases since a moment (the deploy) from each dataplane's
segments (passguard/store/window.py: reset-aware, so a proxy restarted by the
deploy counts from zero), over the dataplanes of the meshes the recent gate
decisions (the audit log) or the caller name.

The snapshot carries only the gate window's sums, and ``since`` is any moment
inside the kept evidence, so the segments are read directly: on the event
loop, between the poller's writes (each dataplane's walk is synchronous, and
the loop is handed back every ``YIELD_EVERY`` dataplanes).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from passguard.audit import AuditEntry
from passguard.durations import parse_duration
from passguard.store.snapshot import DataplaneEvidence
from passguard.store.window import History
from passguard.targets import Target

#: Dataplanes walked between two turns of the event loop: ~1 ms of work.
YIELD_EVERY = 100

#: The verdicts whose change went in: a refused change was not applied
#: through the gate, and watching its mesh would blame this deploy for others.
APPLIED = ("allow", "warn")
#: Audit pages read for the decisions since ``since`` (1,000 entries each).
MAX_AUDIT_PAGES = 20


class SinceError(ValueError):
    """``since`` cannot be used; the message names the parameter."""


def parse_since(value: str, now: float) -> float:
    """RFC 3339 (``2026-08-21T10:00:00Z``), Unix seconds, or a duration back from now."""
    text = value.strip()
    if not text:
        raise SinceError("since: required (RFC 3339 time, Unix seconds, or a duration like 10m)")
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        pass
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise SinceError(f"since={value!r} is neither an RFC 3339 time, Unix seconds, nor a "
                         "duration like 10m") from None
    if t.tzinfo is None:
        raise SinceError(f"since={value!r} has no time zone: add Z or an offset")
    return t.timestamp()


def rfc3339(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


@dataclass(frozen=True, slots=True)
class Refusals:
    refused: int = 0  # downstream_cx_no_route + no_filter_chain_match
    connect_failures: int = 0
    overflows: int = 0

    @property
    def total(self) -> int:
        return self.refused + self.connect_failures + self.overflows


def refusals_since(h: History, since: float, short: float) -> tuple[Refusals, str | None]:
    """The refusals a dataplane counted after ``since``, and why the count may
    be incomplete (None: it is not). A segment that straddles ``since`` is
    counted when it is short (one scrape interval): a refusal a few seconds
    before the deploy reads as after it, which errs towards a rollback; a long
    one with refusals in it cannot say which side they fell on."""
    refused = fail = overflow = 0
    doubt: str | None = None
    for seg in reversed(h.segments):
        if seg.end <= since:
            break
        if not seg.complete:
            doubt = "the proxy restarted during a gap in scraping: refusals may be missing"
        n = [(c.no_route, c.connect_fail, c.overflow) for c in seg.increase.values()]
        if seg.start >= since or seg.end - seg.start <= short:
            refused += sum(x[0] for x in n)
            fail += sum(x[1] for x in n)
            overflow += sum(x[2] for x in n)
        elif any(any(x) for x in n):
            doubt = doubt or ("a gap in scraping spans --since and holds refusals: before or "
                              "after it cannot be told")
    if h.pruned_until > since:
        doubt = doubt or "--since is older than the evidence passguard keeps (window)"
    return Refusals(refused, fail, overflow), doubt


def applied_decisions(entries: Iterable[AuditEntry], mesh: str | None) -> list[AuditEntry]:
    """The recorded decisions whose change was let in (not dry runs), for ``mesh``."""
    return [e for e in entries if e.mesh and not e.dry_run and e.verdict in APPLIED
            and (mesh is None or e.mesh == mesh)]


def _decision_json(e: AuditEntry) -> dict[str, Any]:
    return {"id": e.id, "time": rfc3339(e.time), "mesh": e.mesh, "verdict": e.verdict,
            "source": e.source, "requester": e.requester,
            "documents": [f"{d.get('kind')} {d.get('name')}" for d in e.documents]}


async def verify(*, since: float, now: float, mesh: str | None,
                 decisions: Sequence[AuditEntry], targets: Mapping[str, Target],
                 histories: Mapping[str, History], others: Sequence[DataplaneEvidence],
                 stale_after: float, interval: float, kept: float) -> dict[str, Any]:
    """The ``GET /v1/verify`` body. ``targets``/``histories``: the store's
    (scraped by passguard); ``others``: evidence read elsewhere (PromQL), which
    has no segments to answer from; ``kept``: seconds of evidence kept."""
    meshes = sorted({mesh} if mesh else {e.mesh for e in decisions if e.mesh})
    body: dict[str, Any] = {
        "since": rfc3339(since), "time": rfc3339(now), "meshes": meshes,
        "decisions": [_decision_json(e) for e in decisions[:50]],
        "scrape_interval_seconds": interval, "evidence_kept_seconds": kept,
        "refusals": [], "pending": [], "offline": [],
    }
    if not meshes:
        body.update(status="nothing_to_watch", clean=None, watched=0, oldest_sample=None,
                    reason=f"no change was let through the gate since {rfc3339(since)} (audit "
                           "log) and no mesh was named: pass --mesh (mesh=)")
        return body
    wanted = set(meshes)
    oldest: float | None = None
    watched = 0
    # A copy: the poller may add or drop targets while this hands the loop back.
    mine = [(key, t) for key, t in sorted(list(targets.items())) if t.mesh in wanted]
    for i, (key, t) in enumerate(mine):
        if i and i % YIELD_EVERY == 0:
            await asyncio.sleep(0)
        h = histories.get(key)
        row = {"mesh": t.mesh, "dataplane": t.dataplane, "service": t.service}
        if t.offline:
            body["offline"].append(row)
            continue
        watched += 1
        if h is None or h.last_success is None or h.last_success < since:
            body["pending"].append({**row, "reason": "no successful scrape since --since yet"
                                    + (f" (last error: {h.last_error})"
                                       if h is not None and h.last_error else "")})
            oldest = since if oldest is None else min(oldest, since)
            continue
        got, doubt = refusals_since(h, since, stale_after)
        if got.total:
            body["refusals"].append({**row, "refused": got.refused,
                                     "connect_failures": got.connect_failures,
                                     "overflows": got.overflows, "total": got.total,
                                     "last_scrape": rfc3339(h.last_success)})
        if h.last_error is not None or now - h.last_success > stale_after:
            body["pending"].append({**row, "reason": "failing" if h.last_error is None
                                    else f"failing: {h.last_error}"})
        elif doubt:
            body["pending"].append({**row, "reason": doubt})
        oldest = h.last_success if oldest is None else min(oldest, h.last_success)
    for d in others:
        if d.target.mesh in wanted and d.target.key not in targets:
            watched += 1
            body["pending"].append({"mesh": d.target.mesh, "dataplane": d.target.dataplane,
                                    "service": d.target.service,
                                    "reason": "its evidence comes from Prometheus: verify it "
                                              "with the AnalysisTemplate of docs/pipelines.md"})
    body["refusals"].sort(key=lambda r: (-r["total"], r["mesh"], r["dataplane"]))
    body["watched"] = watched
    body["oldest_sample"] = rfc3339(oldest)
    body["oldest_sample_unix"] = oldest
    if body["refusals"]:
        body["status"], body["clean"] = "refusals", False
    elif watched == 0:
        body["status"], body["clean"] = "nothing_to_watch", None
        body["reason"] = f"passguard watches no online dataplane in {', '.join(meshes)}"
    else:
        body["status"], body["clean"] = "clean", not body["pending"]
    return body
