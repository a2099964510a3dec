"""HTTP routes (DESIGN §3). Handlers read the daemon's snapshot; they never scrape.

Every client error is answered as JSON ``{"error": …}`` with a 4xx status, and
an unexpected exception becomes a logged 500 with no traceback in the body —
but no input path is meant to reach it.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from passguard.errors import InputError
from passguard.gate import service
from passguard.gate.decide import Evidence, decide
from passguard.gate.documents import Change, Resource
from passguard.gate.loader import load_documents
from passguard.store.snapshot import Snapshot, mesh_summary
from passguard.web import status_page

if TYPE_CHECKING:
    from passguard.app import Daemon

log = logging.getLogger(__name__)
DAEMON: web.AppKey[Daemon] = web.AppKey("daemon")


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def rfc3339(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


@web.middleware
async def errors_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        resp: web.StreamResponse = await handler(request)
        return resp
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[DAEMON].config.limits.max_body_bytes
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


def _snapshot(request: web.Request) -> Snapshot:
    return request.app[DAEMON].store.snapshot.at(time.time())


def verdict_if_disabled(snap: Snapshot, mesh: str, daemon: Daemon) -> str:
    """What the gate would answer now for ``passthrough: false`` on this mesh."""
    probe = Resource("Mesh", mesh, mesh, "universal", "None")
    decision = decide(Change(probe, None, "assumed"),
                      Evidence(mesh, snap.window_seconds, snap.for_mesh(mesh)),
                      daemon.config.gate.policy_for(mesh))
    return decision.verdict


def meshes_body(snap: Snapshot, daemon: Daemon) -> dict[str, Any]:
    meshes = []
    for mesh in snap.meshes():
        s = mesh_summary(mesh, snap.for_mesh(mesh))
        meshes.append({"mesh": mesh, "verdict_if_disabled": verdict_if_disabled(snap, mesh, daemon),
                       **{k: v for k, v in s.items() if k != "mesh"}})
    return {"window_seconds": snap.window_seconds, "meshes": meshes}


async def get_meshes(request: web.Request) -> web.Response:
    return web.json_response(meshes_body(_snapshot(request), request.app[DAEMON]))


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
        "verdict_if_disabled": verdict_if_disabled(snap, mesh, request.app[DAEMON]),
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


async def post_check(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    raw = await request.read()
    docs = load_documents(raw, request.content_type, daemon.config.limits.documents)
    body, decisions = service.check(docs, None, _snapshot(request), daemon.config.gate)
    for d in decisions:
        daemon.metrics.decisions.labels(d.mesh, d.verdict, d.mode).inc()
    log.info("check: %s (%s)", body["verdict"],
             ", ".join(f"{d.kind} {d.name} in {d.mesh}: {d.verdict}" for d in decisions) or "-")
    return web.json_response(body)


async def get_metrics(request: web.Request) -> web.Response:
    registry = request.app[DAEMON].metrics.registry
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    resp = web.Response(body=encoder(registry))
    resp.headers["Content-Type"] = content_type
    return resp


async def healthy(request: web.Request) -> web.Response:
    return web.Response(text="passguard is healthy\n")


async def ready(request: web.Request) -> web.Response:
    if request.app[DAEMON].store.snapshot.ready:
        return web.Response(text="passguard is ready\n")
    return web.Response(status=503, text="passguard is not ready: no scrape cycle finished yet\n")


async def post_reload(request: web.Request) -> web.Response:
    error = await request.app[DAEMON].reload()
    if error:
        return _error(400, f"configuration refused, the old one keeps running: {error}")
    return web.json_response({"status": "reloaded"})


async def index(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    snap = _snapshot(request)
    html = status_page.render(snap, meshes_body(snap, daemon), daemon.config.scrape.interval)
    return web.Response(text=html, content_type="text/html")


def build_app(daemon: Daemon) -> web.Application:
    app = web.Application(middlewares=[errors_middleware],
                          client_max_size=daemon.config.limits.max_body_bytes)
    app[DAEMON] = daemon
    app.router.add_get("/", index)
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/-/healthy", healthy)
    app.router.add_get("/-/ready", ready)
    app.router.add_post("/-/reload", post_reload)
    app.router.add_get("/v1/meshes", get_meshes)
    app.router.add_get("/v1/meshes/{mesh}", get_mesh)
    app.router.add_post("/v1/check", post_check)
    return app
