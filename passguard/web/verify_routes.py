"""``GET /v1/verify`` and ``GET /v1/readiness`` (DESIGN §6).

Kept apart from passguard/web/routes.py so the two features merge as one
registration line there. Both read what the poller published (the store's
segments, the snapshot, the control planes' states) and the audit log; a bad
parameter is a 400 naming it, never a 500.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from passguard.audit import AuditEntry
from passguard.gate import readiness as rd
from passguard.verify import MAX_AUDIT_PAGES, SinceError, applied_decisions, parse_since, verify
from passguard.web.backend import BACKEND, Backend

#: Routes that read the audit log: behind the tokens, like /v1/audit.
TOKEN_ROUTES = ("/v1/verify",)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _backend(request: web.Request) -> Backend:
    return request.app[BACKEND]


async def _decisions(backend: Backend, since: float, mesh: str | None) -> list[AuditEntry]:
    out: list[AuditEntry] = []
    before: int | None = None
    for _ in range(MAX_AUDIT_PAGES):
        page, before = await asyncio.to_thread(backend.audit.query, since, mesh, None, 1000,
                                               before)
        out.extend(page)
        if before is None:
            break
    return applied_decisions(out, mesh)


async def get_verify(request: web.Request) -> web.Response:
    backend = _backend(request)
    q = request.query
    now = time.time()
    if "since" not in q:
        return _error(400, "since: required (RFC 3339 time, Unix seconds, or a duration "
                           "like 10m)")
    try:
        since = parse_since(q["since"], now)
    except SinceError as exc:
        return _error(400, str(exc))
    if since > now + 5:  # a little clock skew between the pipeline and passguard
        return _error(400, f"since={q['since']!r} is in the future")
    mesh = q.get("mesh") or None
    store = backend.store
    snap = store.snapshot
    if mesh is not None and not snap.for_mesh(mesh) and not any(
            t.mesh == mesh for t in store.targets.values()):
        return _error(404, f"passguard knows no dataplane in mesh {mesh!r}")
    decisions = await _decisions(backend, since, mesh)
    body = await verify(since=since, now=now, mesh=mesh, decisions=decisions,
                        targets=store.targets, histories=store.histories,
                        others=[d for d in snap.dataplanes if d.origin != "scrape"],
                        stale_after=store.stale_after,
                        interval=backend.config.scrape.interval,
                        kept=store.window + store.stale_after)
    return web.json_response(body)


def readiness_body(backend: Backend, to: str, mesh: str | None = None,
                   now: float | None = None) -> dict[str, Any]:
    """Every mesh passguard knows (evidence or a control plane), or one."""
    now = time.time() if now is None else now
    snap = backend.store.snapshot.at(now)
    states = backend.mesh_states()
    meshes = sorted(set(snap.meshes()) | set(states)) if mesh is None else [mesh]
    results = []
    for m in meshes:
        state = states.get(m)
        stale = state is not None and state.stale(now)
        # Once per snapshot and control-plane state: the status page asks on
        # every refresh, and a big mesh takes milliseconds to judge.
        key = ("readiness", to, m, id(state), stale)
        if key not in snap.memo:
            dps = snap.for_mesh(m)
            snap.memo[key] = (state, rd.readiness(
                m, to, state, stale, dps, snap.destinations_of(m), snap.window_seconds,
                inventory=any(d.origin == "scrape" for d in dps)).as_json())
        results.append(snap.memo[key][1])
    if any(r["status"] == "not_ready" for r in results):
        status = "not_ready"
    elif not results or any(r["status"] == "unknown" for r in results):
        status = "unknown"
    else:
        status = "ready"
    return {"to": to, "ready": None if status == "unknown" else status == "ready",
            "status": status, "window_seconds": snap.window_seconds,
            "source": dict(rd.KUMA_SOURCE), "outcomes": dict(rd.OUTCOMES), "meshes": results}


async def get_readiness(request: web.Request) -> web.Response:
    backend = _backend(request)
    q = request.query
    to = q.get("to")
    if not to:
        return _error(400, f"to: required (supported: {', '.join(rd.TARGETS)})")
    if to not in rd.TARGETS:
        return _error(400, f"to={to!r} is not supported (supported: {', '.join(rd.TARGETS)})")
    mesh = q.get("mesh") or None
    if mesh is not None and not backend.store.snapshot.for_mesh(mesh) \
            and mesh not in backend.mesh_states():
        return _error(404, f"passguard knows no mesh {mesh!r} (no dataplane, no control plane)")
    return web.json_response(readiness_body(backend, to, mesh))


def register(app: web.Application) -> None:
    app.router.add_get("/v1/verify", get_verify)
    app.router.add_get("/v1/readiness", get_readiness)
