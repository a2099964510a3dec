"""What the route modules share: the request's key (the backend's is in
passguard/web/backend.py), the error body, the bounded request body and the
snapshot as seen now."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from passguard.durations import format_duration
from passguard.httpclient import read_at_most
from passguard.store.snapshot import Snapshot
from passguard.web.backend import BACKEND

REQUESTER: web.RequestKey[str] = web.RequestKey("requester", str)
ANONYMOUS = "anonymous"


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _read_limited(request: web.Request, limit: int) -> bytes:
    """The (decoded) body, up to ``limit`` bytes. Read here rather than by
    ``request.read()``, whose limit is fixed when the app is built: this one is
    the running config's, so a reload changes it."""
    def refuse(size: int, _announced: bool) -> web.HTTPRequestEntityTooLarge:
        return web.HTTPRequestEntityTooLarge(limit, size)

    return await read_at_most(request.content, request.content_length, limit, refuse)


async def _read_body(request: web.Request) -> bytes | web.Response:
    """The request body, or a 408 for a client that sends it too slowly: a body
    trickled a byte at a time would otherwise hold its connection forever."""
    limits = request.app[BACKEND].config.limits
    try:
        async with asyncio.timeout(limits.body_timeout):
            return await _read_limited(request, limits.max_body_bytes)
    except TimeoutError:
        resp = _error(408, "request body not received within "
                           f"{format_duration(limits.body_timeout)} (limits.body_timeout)")
        resp.force_close()
        # Sent and closed here: left to aiohttp, the unread body would be
        # drained ("lingering") for another 10 s at the client's pace.
        await resp.prepare(request)
        await resp.write_eof()
        if request.transport is not None:
            request.transport.close()
        return resp


def _snapshot(request: web.Request) -> Snapshot:
    return request.app[BACKEND].store.snapshot.at(time.time())
