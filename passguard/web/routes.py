"""HTTP routes (DESIGN §3). Handlers read the daemon's snapshot; they never scrape.

They reach the daemon only through ``passguard.web.backend.Backend`` (the
app's ``BACKEND``), never ``passguard.app``.

Every client error is answered as JSON ``{"error": …}`` with a 4xx status, and
an unexpected exception becomes a logged 500 with no traceback in the body —
but no input path is meant to reach it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from datetime import datetime
from typing import Any

from aiohttp import web

from passguard.audit import AuditEntry
from passguard.durations import parse_duration
from passguard.errors import InputError
from passguard.fields import NAME_BYTES, REQUESTER_BYTES, cap
from passguard.gate import admission, service
from passguard.gate.decide import Decision, decide
from passguard.gate.rows import transport_word, via_of
from passguard.loader import load_documents
from passguard.store.snapshot import Snapshot, mesh_summary
from passguard.web import readiness_panel, shadow_routes, status_page, verify_routes
from passguard.web.backend import BACKEND, Backend, Tokens
from passguard.web.common import (
    ANONYMOUS,
    REQUESTER,
    _error,
    _read_body,
    _snapshot,
)
from passguard.web.ratelimit import PeerRateLimit, peer_key

log = logging.getLogger(__name__)
RATE_LIMIT: web.AppKey[PeerRateLimit] = web.AppKey("rate_limit", PeerRateLimit)
# Routes that change or reveal decisions: always behind the tokens when
# tokens are configured. The admission route is authenticated by TLS (the
# API server's client certificate) and may also carry a token.
TOKEN_ROUTES = ("/v1/check", "/v1/audit", "/-/reload", shadow_routes.PREFIX,
                *verify_routes.TOKEN_ROUTES)
# And everything under these (a path parameter follows).
TOKEN_PREFIXES = (shadow_routes.PREFIX + "/",)
# Never behind a token: the kubelet's probes cannot send one, health reveals
# nothing, and the API server authenticates the webhook (not itself) by TLS.
OPEN_ROUTES = ("/-/healthy", "/-/ready", "/v1/admission")
# Routes whose every request writes the audit: limited per peer for callers
# no token or client certificate vouches for (limits.unverified_rate).
GATE_ROUTES = ("/v1/check", "/v1/admission")
#: The ``mesh`` label of a mesh passguard does not know (request-derived
#: labels would let any caller add series to /metrics).
OTHER_MESH = "other"


def rfc3339(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _peer_name(request: web.Request) -> str | None:
    """The client certificate's CN under mutual TLS."""
    cert = request.transport.get_extra_info("peercert") if request.transport else None
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return f"cert:{value}"
    for _kind, value in cert.get("subjectAltName", ()):
        return f"cert:{value}"
    return "cert:unnamed"


@web.middleware
async def auth_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    backend = request.app[BACKEND]
    tokens: Tokens | None = backend.tokens
    header = request.headers.get("Authorization", "")
    name: str | None = None
    presented = header.startswith("Bearer ")
    if tokens is not None and presented:
        name = tokens.name_for(header[len("Bearer "):].strip())
    needs_token = tokens is not None and (
        request.path in TOKEN_ROUTES or request.path.startswith(TOKEN_PREFIXES)
        or (backend.config.auth.protect_metrics
                                         and request.path not in OPEN_ROUTES))
    if needs_token and name is None:
        error = "invalid_token" if presented else "invalid_request"
        text = "the bearer token is not valid" if presented else "a bearer token is required"
        resp = _error(401, text)
        resp.headers["WWW-Authenticate"] = f'Bearer realm="passguard", error="{error}"'
        return resp
    request[REQUESTER] = f"token:{name}" if name else (_peer_name(request) or ANONYMOUS)
    result: web.StreamResponse = await handler(request)
    return result


@web.middleware
async def rate_limit_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """429 with Retry-After for an unverified peer past ``limits.unverified_rate``."""
    if request.path in GATE_ROUTES and request[REQUESTER] == ANONYMOUS and \
            request.remote is not None:
        backend = request.app[BACKEND]
        limits = backend.config.limits
        key, loopback = peer_key(request.remote)
        if limits.unverified_rate > 0 and (limits.rate_limit_loopback or not loopback):
            wait = request.app[RATE_LIMIT].take(key, limits.unverified_rate,
                                                limits.unverified_burst)
            if wait > 0:
                backend.metrics.rate_limited.labels(request.path).inc()
                resp = _error(429, f"too many requests from {key} without a token or client "
                                   f"certificate (limits.unverified_rate: "
                                   f"{limits.unverified_rate:g} a second, burst "
                                   f"{limits.unverified_burst}); try again later")
                resp.headers["Retry-After"] = str(max(1, math.ceil(wait)))
                return resp
    result: web.StreamResponse = await handler(request)
    return result


@web.middleware
async def foreground_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Counts the requests being served, so that the daemon's bulk work gives
    way to them (passguard.foreground). Not /metrics, whose render is that
    work."""
    if request.path == "/metrics":
        response: web.StreamResponse = await handler(request)
        return response
    foreground = request.app[BACKEND].foreground
    foreground.enter()
    try:
        response = await handler(request)
        return response
    finally:
        foreground.leave()


@web.middleware
async def errors_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        resp: web.StreamResponse = await handler(request)
        return resp
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[BACKEND].config.limits.max_body_bytes
        return _error(413, f"request body is over the limit of {limit} bytes")
    except web.HTTPException as exc:
        if exc.status >= 400 and exc.content_type != "application/json":
            return _error(exc.status, exc.reason)
        raise
    except InputError as exc:
        return _error(400, str(exc))
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _error(500, "internal error (logged)")


def verdict_if_disabled(snap: Snapshot, mesh: str, backend: Backend) -> str:
    """What the gate would answer now for ``passthrough: false`` on this mesh."""
    decision = decide(service.mesh_off(mesh),
                      service.evidence_of(snap, mesh, backend.mesh_states(), time.time()),
                      backend.config.gate.policy_for(mesh), snap.memo)
    return decision.verdict


def meshes_body(snap: Snapshot, backend: Backend) -> dict[str, Any]:
    meshes = []
    for mesh in snap.meshes():
        s = mesh_summary(mesh, snap.for_mesh(mesh))
        meshes.append({"mesh": mesh,
                       "verdict_if_disabled": verdict_if_disabled(snap, mesh, backend),
                       **{k: v for k, v in s.items() if k != "mesh"}})
    return {"window_seconds": snap.window_seconds, "meshes": meshes}


async def get_meshes(request: web.Request) -> web.Response:
    return web.json_response(meshes_body(_snapshot(request), request.app[BACKEND]))


async def get_mesh(request: web.Request) -> web.Response:
    mesh = request.match_info["mesh"]
    snap = _snapshot(request)
    dps = snap.for_mesh(mesh)
    if not dps:
        return _error(404, f"passguard knows no dataplane in mesh {mesh!r}")
    s = mesh_summary(mesh, dps)
    body: dict[str, Any] = {
        "window_seconds": snap.window_seconds,
        "mesh": mesh,
        "verdict_if_disabled": verdict_if_disabled(snap, mesh, request.app[BACKEND]),
        **{k: v for k, v in s.items() if k != "mesh"},
    }
    # "dataplanes" is the per-dataplane list here (DESIGN §3); the counts move aside.
    body["dataplane_counts"] = body.pop("dataplanes")
    body["dataplanes"] = [
        {
            "dataplane": d.target.dataplane,
            "service": d.target.service,
            "state": d.state,
            "covered": d.covered,
            "unknown": d.unknown,
            "connections": d.connections,
            "active_connections": d.active_connections,
            "blocked_connections": d.blocked_connections,
            "last_scrape": rfc3339(d.last_success),
            "error": d.error,
        }
        for d in sorted(dps, key=lambda d: d.target.dataplane)
    ]
    return web.json_response(body)


def destinations_body(snap: Snapshot, mesh: str | None = None) -> list[dict[str, Any]]:
    dests = snap.destinations_of(mesh) if mesh else snap.destinations
    return [{"mesh": d.mesh, "dataplane": d.dataplane, "service": d.service,
             "address": d.address, "family": d.family,
             # tls or tcp when a meshpassthrough_* cluster showed it; null: unknown.
             "transport": transport_word(via_of(d)[0]),
             "first_seen": rfc3339(d.first_seen),
             "last_seen": rfc3339(d.last_seen), "connections": d.connections,
             "window_connections": d.window_connections, "active_connections": d.active}
            for d in dests]


async def get_destinations(request: web.Request) -> web.Response:
    return web.json_response(
        {"destinations": destinations_body(_snapshot(request), request.query.get("mesh"))})


async def decide_and_record(request: web.Request, docs: list[Any], source: str,
                            requester: str, dry_run: bool = False
                            ) -> tuple[dict[str, Any], list[Decision]]:
    """Decide, then write the audit entries *before* the answer leaves.

    An enforce-mode decision that cannot be recorded becomes a refusal that
    says why: a gate that decides unrecorded cannot be reviewed afterwards.
    """
    backend = request.app[BACKEND]
    snap = _snapshot(request)
    states = backend.mesh_states()
    body, decisions = await service.check_async(
        docs, snap, backend.config.gate, states, time.time(),
        backend.config.limits.documents.max_matches)
    # The audit caps every field itself (AuditEntry.bounded).
    peer = request.remote
    entries = [AuditEntry(source=source, requester=requester, mesh=d.mesh, mode=d.mode,
                          verdict=d.verdict, reasons=d.reasons,
                          documents=[{"kind": d.kind, "name": d.name, "digest": d.digest}],
                          evidence=d.evidence, evidence_json=d.evidence_json,
                          dry_run=dry_run, break_glass=d.break_glass, peer=peer)
               for d in decisions]
    if not entries:
        entries = [AuditEntry(source=source, requester=requester, mesh=None,
                              mode=body["mode"], verdict=body["verdict"],
                              reasons=list(body["warnings"]), documents=[], dry_run=dry_run,
                              peer=peer)]
    try:
        await backend.audit.record(entries)
    except Exception as exc:
        backend.metrics.audit_failures.inc()
        log.error("audit log write failed: %s", exc)
        problem = f"the audit log cannot be written ({exc})"
        if any(d.mode == "enforce" for d in decisions) or (
                not decisions and body["mode"] == "enforce"):
            body["allowed"], body["verdict"] = False, "deny"
            body["warnings"].append(f"{problem}: refused, since enforce mode must not decide "
                                    "unrecorded")
        else:
            body["warnings"].append(f"{problem}: this decision is not recorded")
    for d in decisions:
        mesh = d.mesh if snap.for_mesh(d.mesh) or d.mesh in states else OTHER_MESH
        backend.metrics.decisions.labels(mesh, d.verdict, d.mode).inc()
    # Fields capped here; control characters are escaped by the log handler
    # (passguard.logqueue), and the whole line is bounded there too.
    log.info("%s by %s from %s: %s%s (%s)", source, cap(requester, REQUESTER_BYTES), peer,
             body["verdict"], " [dry run]" if dry_run else "",
             ", ".join(f"{d.kind} {cap(d.name, NAME_BYTES)} in {cap(d.mesh, NAME_BYTES)}: "
                       f"{d.verdict}" for d in decisions[:20])
             + (f" and {len(decisions) - 20} more" if len(decisions) > 20 else "") or "-",
             extra=_log_ids(request, entries))
    return body, decisions


#: A caller's ``X-Request-Id`` goes into the decision's log line (JSON logs:
#: ``request_id``) only in this shape: it is the caller's word, never escaped text.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


def _log_ids(request: web.Request, entries: list[AuditEntry]) -> dict[str, object]:
    """The ids a decision's log line carries: the audit entries' (``GET
    /v1/audit`` shows them) and the caller's request id when it sent one."""
    extra: dict[str, object] = {}
    ids = [e.id for e in entries if e.id is not None]
    if len(ids) == 1:
        extra["decision_id"] = ids[0]
    elif ids:
        extra["decision_ids"] = ids[:100]
    rid = request.headers.get("X-Request-Id", "")
    if _REQUEST_ID.fullmatch(rid):
        extra["request_id"] = rid
    return extra


async def post_check(request: web.Request) -> web.Response:
    backend = request.app[BACKEND]
    raw = await _read_body(request)
    if isinstance(raw, web.Response):
        return raw
    # The whole header: the loader refuses a declared charset other than UTF-8.
    docs = load_documents(raw, request.headers.get("Content-Type"),
                          backend.config.limits.documents)
    body, decisions = await decide_and_record(request, docs, "check", request[REQUESTER])
    return web.Response(text=service.encode(body, decisions), content_type="application/json")


async def post_admission(request: web.Request) -> web.Response:
    """The gate as a ValidatingAdmissionWebhook; 400 for a review it cannot read."""
    backend = request.app[BACKEND]
    raw = await _read_body(request)
    if isinstance(raw, web.Response):
        return raw
    limits = backend.config.limits.documents
    [review] = load_documents(raw, "application/json", limits)[:1] or [None]
    req = admission.parse_review(review)
    # The API server checks passguard's certificate, not the other way round:
    # without a client certificate or token, userInfo is the caller's claim.
    requester = f"{req.username} (unverified)" if request[REQUESTER] == ANONYMOUS else \
        f"{req.username} via {request[REQUESTER]}"
    try:
        body, _ = await decide_and_record(request, admission.documents(req), "admission",
                                          requester, req.dry_run)
    except InputError as exc:
        # The object itself is unusable (not the envelope): refuse it with the
        # reason, as a 200 AdmissionReview the API server shows to the user.
        return web.json_response(admission.response(
            req.uid, False, f"passguard cannot evaluate this object: {exc}", []))
    message = "passguard: " + " | ".join(
        f"{d['change']['kind']} {d['change']['name']} ({d['change']['effect']}): "
        + "; ".join(d["reasons"])
        for d in body["decisions"] if d["verdict"] == "deny") or body["verdict"]
    if not body["allowed"] and not any(d["verdict"] == "deny" for d in body["decisions"]):
        message = "passguard: " + "; ".join(body["warnings"])
    return web.json_response(admission.response(req.uid, body["allowed"], message,
                                                [f"passguard: {w}" for w in body["warnings"]]))


async def get_audit(request: web.Request) -> web.Response:
    backend = request.app[BACKEND]
    q = request.query
    try:
        since = _parse_time(q["since"]) if "since" in q else None
        limit = int(q.get("limit", "100"))
        before = int(q["cursor"]) if "cursor" in q else None
    except ValueError as exc:
        raise InputError(f"bad query parameter: {exc}") from None
    if not 1 <= limit <= 1000:
        raise InputError("limit must be between 1 and 1000")
    if "verdict" in q and q["verdict"] not in ("allow", "warn", "deny"):
        raise InputError("verdict must be allow, warn or deny")
    entries, nxt = await asyncio.to_thread(backend.audit.query, since, q.get("mesh"),
                                           q.get("verdict"), limit, before)
    return web.json_response({"entries": [e.to_json() for e in entries],
                              "next": str(nxt) if nxt is not None else None})


def _parse_time(value: str) -> float:
    """RFC 3339 (``2026-11-29T10:00:00Z``), or a duration back from now (``1h``)."""
    try:
        return time.time() - parse_duration(value)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise ValueError(f"since={value!r} is neither RFC 3339 nor a duration like 1h") from None


#: ``/metrics`` is written this much at a time, the loop free in between: at
#: 10,000 dataplanes the answer is megabytes, and handed to the transport
#: whole it was copied into its buffer in one ~30 ms piece.
METRICS_WRITE_SLICE = 256 * 1024


async def get_metrics(request: web.Request) -> web.StreamResponse:
    metrics = request.app[BACKEND].metrics
    parts, content_type = await metrics.exposition(request.headers.get("Accept", ""))
    resp = web.StreamResponse(headers={"Content-Type": content_type})
    resp.content_length = sum(len(p) for p in parts)
    await resp.prepare(request)
    for body in parts:
        view = memoryview(body)
        for start in range(0, len(body), METRICS_WRITE_SLICE):
            await resp.write(view[start:start + METRICS_WRITE_SLICE])
            await asyncio.sleep(0)
    await resp.write_eof()
    return resp


def probe_answer(backend: Backend, path: str) -> tuple[int, str]:
    """Status and text of ``/-/healthy`` or ``/-/ready``: shared by the
    routes and the connection cap's reserved places (web/connections.py)."""
    if path == "/-/healthy":
        return 200, "passguard is healthy\n"
    if backend.store.snapshot.ready:
        return 200, "passguard is ready\n"
    return 503, "passguard is not ready: no scrape cycle finished yet\n"


async def healthy(request: web.Request) -> web.Response:
    status, text = probe_answer(request.app[BACKEND], "/-/healthy")
    return web.Response(status=status, text=text)


async def ready(request: web.Request) -> web.Response:
    status, text = probe_answer(request.app[BACKEND], "/-/ready")
    return web.Response(status=status, text=text)


async def post_reload(request: web.Request) -> web.Response:
    error = await request.app[BACKEND].reload()
    if error:
        return _error(400, f"configuration refused, the old one keeps running: {error}")
    return web.json_response({"status": "reloaded"})


async def index(request: web.Request) -> web.Response:
    backend = request.app[BACKEND]
    snap = _snapshot(request)
    html = status_page.render(snap, meshes_body(snap, backend), backend.config.scrape.interval,
                              destinations=destinations_body(snap),
                              states=backend.mesh_states(),
                              extra=[shadow_routes.status_section(backend),
                                     readiness_panel.render(
                                         verify_routes.readiness_body(backend, "3.0"))])
    return web.Response(text=html, content_type="text/html")


def build_app(backend: Backend) -> web.Application:
    # No client_max_size: bodies are read by _read_limited, with the limit of
    # the running config.
    app = web.Application(middlewares=[foreground_middleware, errors_middleware,
                                       auth_middleware, rate_limit_middleware])
    app[BACKEND] = backend
    app[RATE_LIMIT] = PeerRateLimit()
    app.router.add_get("/", index)
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/-/healthy", healthy)
    app.router.add_get("/-/ready", ready)
    app.router.add_post("/-/reload", post_reload)
    app.router.add_get("/v1/meshes", get_meshes)
    app.router.add_get("/v1/meshes/{mesh}", get_mesh)
    app.router.add_get("/v1/destinations", get_destinations)
    app.router.add_post("/v1/check", post_check)
    app.router.add_post("/v1/admission", post_admission)
    app.router.add_get("/v1/audit", get_audit)
    shadow_routes.register(app)
    verify_routes.register(app)
    return app
