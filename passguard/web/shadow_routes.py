"""``/v1/shadows``: register, list, show and remove shadow policies (DESIGN §6).

Token-protected like ``/v1/check`` (``web.routes`` lists the prefix). Bodies
are read and loaded with the same limits as ``/v1/check``, and the documents
are validated by the same parser: a shadow that registers is a change the
gate can judge.

``POST /v1/shadows`` takes either ``{"name": …, "documents": [...]}`` (JSON or
YAML), or ``?name=NAME`` with the documents themselves as the body (what
``curl --data-binary @lockdown.yaml`` sends).
"""

from __future__ import annotations

import asyncio
import time
from html import escape
from typing import Any

from aiohttp import web

from passguard.durations import parse_duration
from passguard.errors import InputError
from passguard.loader import load_documents
from passguard.shadows import MAX_DAYS, Conflict
from passguard.web.backend import BACKEND, Backend

PREFIX = "/v1/shadows"


def _backend(request: web.Request) -> Backend:
    return request.app[BACKEND]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _blocks_unproven(backend: Backend) -> Any:
    return lambda mesh: backend.config.gate.policy_for(mesh).on_unproven == "deny"


async def post_shadow(request: web.Request) -> web.Response:
    from passguard.web.common import REQUESTER, _read_body

    backend = _backend(request)
    raw = await _read_body(request)
    if isinstance(raw, web.Response):
        return raw
    loaded = load_documents(raw, request.headers.get("Content-Type"),
                            backend.config.limits.documents)
    if "name" in request.query:
        name: object = request.query["name"]
        docs = loaded
    else:
        if len(loaded) != 1 or not isinstance(loaded[0], dict) \
                or set(loaded[0]) != {"name", "documents"}:
            raise InputError("body: expected {\"name\": …, \"documents\": [...]}, or ?name=NAME "
                             "with the documents as the body")
        name, docs = loaded[0]["name"], loaded[0]["documents"]
        if not isinstance(docs, list):
            raise InputError(f"documents: must be a list, got {type(docs).__name__}")
    try:
        shadow, warnings = await backend.shadows.add(
            name, docs, request[REQUESTER], time.time(),  # type: ignore[arg-type]
            backend.config.limits.documents.max_matches)
    except Conflict as exc:
        return _error(409, str(exc))
    body = backend.shadows.summary(shadow, backend.config.window, time.time(),
                                   _blocks_unproven(backend))
    body["warnings"] = warnings
    return web.json_response(body, status=201)


async def list_shadows(request: web.Request) -> web.Response:
    backend = _backend(request)
    now, shadows = time.time(), backend.shadows
    return web.json_response({"shadows": [
        shadows.summary(s, backend.config.window, now, _blocks_unproven(backend))
        for _, s in sorted(shadows.items.items())]})


def _since(request: web.Request, now: float) -> float:
    q = request.query
    if "days" in q and "since" in q:
        raise InputError("days and since: give one of them")
    if "since" in q:
        try:
            back = parse_duration(q["since"])
        except ValueError:
            raise InputError(f"since: {q['since']!r} is not a duration like 15m or 7d") from None
        if not 0 < back <= MAX_DAYS * 86400:
            raise InputError(f"since: must be more than 0 and at most {MAX_DAYS}d")
        return now - back
    try:
        days = int(q.get("days", "7"))
    except ValueError:
        raise InputError(f"days: {q['days']!r} is not a whole number") from None
    if not 1 <= days <= MAX_DAYS:
        raise InputError(f"days: must be between 1 and {MAX_DAYS}")
    return now - days * 86400


async def get_shadow(request: web.Request) -> web.Response:
    backend = _backend(request)
    name = request.match_info["name"]
    now = time.time()
    since = _since(request, now)
    body = await asyncio.to_thread(backend.shadows.report, name, since, backend.config.window,
                                   now, _blocks_unproven(backend))
    if body is None:
        return _error(404, f"no shadow named {name!r}")
    return web.json_response(body)


async def delete_shadow(request: web.Request) -> web.Response:
    backend = _backend(request)
    name = request.match_info["name"]
    if not await backend.shadows.remove(name):
        return _error(404, f"no shadow named {name!r}")
    return web.json_response({"deleted": name})


def status_section(backend: Backend) -> str:
    """The status page's section: each shadow, what it would cut, how long clean."""
    now, shadows = time.time(), backend.shadows
    rows = [shadows.summary(s, backend.config.window, now, _blocks_unproven(backend))
            for _, s in sorted(shadows.items.items())]
    parts = ["<section id=shadows>", f"<h2>Shadow policies ({len(rows)})</h2>"]
    if not rows:
        parts.append("<p class=muted>No shadow policy: <code>passguard shadow add NAME -f "
                     "FILE</code> rehearses one on live traffic.</p>")
    else:
        parts.append("<table><thead><tr><th>shadow</th><th>meshes</th>"
                     "<th class=num>would block</th><th class=num>unproven</th>"
                     "<th class=num>destinations cut in window</th><th>clean since</th>"
                     "</tr></thead><tbody>")
        for r in rows:
            tag = "allow" if r["destinations_cut_in_window"] == 0 else "deny"
            parts.append(
                # A shadow name is a DNS label: nothing to quote in the URL.
                f"<tr><td><a href='/v1/shadows/{escape(r['name'])}'>{escape(r['name'])}</a>"
                "</td>"
                f"<td>{escape(', '.join(r['meshes']))}</td>"
                f"<td class=num>{r['would_block_connections']}</td>"
                f"<td class=num>{r['unproven_connections']}</td>"
                f"<td class=num><span class='tag {tag}'>{r['destinations_cut_in_window']}"
                f"</span></td><td>{escape(str(r['clean_since']))}</td></tr>")
        parts.append("</tbody></table>")
    parts.append("</section>")
    return "".join(parts)


def register(app: web.Application) -> None:
    app.router.add_get(PREFIX, list_shadows)
    app.router.add_post(PREFIX, post_shadow)
    app.router.add_get(PREFIX + "/{name}", get_shadow)
    app.router.add_delete(PREFIX + "/{name}", delete_shadow)
