"""A stand-in for kuma-cp's HTTP API, for tests that need a control plane.

It serves the part of the API passguard uses, with the response shapes of the
real Kuma golden files in ``$PASSGUARD_KUMA_FIXTURES/api/`` (cross-checks in
tests/unit/test_kuma_source.py check that its items have the same fields):

* ``GET /`` — the index (version banner).
* ``GET /meshes`` and ``GET /meshes/{mesh}`` — ``Mesh`` items, paginated like
  ``list_mesh_04.paginated.golden.json`` (``offset``/``size``, ``total``,
  ``next`` as an absolute URL built from the Host the request came in on).
* ``GET /meshes/{mesh}/dataplanes/_overview`` and the older
  ``/meshes/{mesh}/dataplanes+insights`` — ``DataplaneOverview`` items shaped
  like ``meshes_mesh1_dataplanes_insights.json`` /
  ``kumactl-inspect-dataplanes.golden.json``; ``GET /meshes/{mesh}/dataplanes``
  — plain ``Dataplane`` items like ``list_dp_with_filters.golden.json``.
* ``GET /meshes/{mesh}/meshpassthroughs`` — ``MeshPassthrough`` items in the
  Universal shape Kuma's REST API lists them (``type``, ``mesh``, ``name``,
  ``labels``, ``spec``), paginated like the others (``add_policy``).
  Dataplanes may carry several inbounds (``extra_inbounds``) and
  ``networking.transparentProxying``; ``version`` is what ``GET /`` reports.
* ``GET /meshes/{mesh}/dataplanes/{name}/stats`` and ``/clusters`` — the
  inspect API: proxied to the real Envoy admin registered for that dataplane
  and answered as ``text/plain`` like ``inspect_stats_dataplane.out``.  As in
  Kuma 2.14, ``/stats`` asks Envoy for ``usedonly`` unless told otherwise.

Bearer-token auth like the CP's user tokens: with ``token`` set, a request
without ``Authorization: Bearer <token>`` gets 401.

Knobs for what a real CP does on a bad day: ``fail(pattern, status, times)``
answers matching paths with an error, ``slow(pattern, seconds)`` delays them,
``pagination`` breaks the list pages (``next-self``: ``next`` points to the
page itself; ``total-lies``: ``total`` is 5 too high; ``empty-next``: an empty
page whose ``next`` points further; ``foreign-next``: ``next`` names another
host, as a CP behind a proxy does), ``item_hook`` rewrites the dataplane
items served (malformed answers), ``overview = False`` plays a Kuma without
``_overview`` (404 there), and ``stop()`` / ``start()`` take the CP down and
bring it back on the same port.  Every request is recorded in ``requests``.

Run it by hand (``python -m tests.kuma_cp``) to point a passguard at it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

Insight = Literal["online", "disconnected", "no-insight", "never-connected"]
Pagination = Literal["ok", "next-self", "total-lies", "empty-next", "foreign-next"]

_TIME = "2018-07-17T16:05:36.995Z"
_CONNECT = "2019-07-01T00:00:00Z"
_DISCONNECT = "2019-07-01T01:00:00Z"
# Envoy admin calls are bounded: a stuck test Envoy fails the request, not the test run.
_ADMIN_TIMEOUT = 5.0
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class FakeDataplane:
    mesh: str
    name: str
    # Envoy admin behind the inspect endpoints: http://host:port or unix:///path.
    admin_url: str | None = None
    service: str | None = "web"
    tags: dict[str, str] = field(default_factory=dict)
    insight: Insight = "online"
    address: str = "127.0.0.1"
    gateway: bool = False
    # "service" is what meshes_mesh1_dataplanes_insights.json (and Kuma < 0.4) uses.
    service_tag: str = "kuma.io/service"
    labels: dict[str, str] = field(default_factory=dict)
    inbound_port: int = 8080
    metrics: dict[str, Any] | None = None  # Dataplane.metrics (e.g. a Prometheus conf)
    # More inbounds after the first, each {"port", "tags"[, "name"]} as in a
    # Dataplane's networking.inbound (a dataplane serving several services).
    extra_inbounds: list[dict[str, Any]] = field(default_factory=list)
    # networking.transparentProxying, as Kuma's injector writes it on Kubernetes
    # (off by default: the items then have the shape of Kuma's golden files).
    transparent: bool = False

    def networking(self) -> dict[str, Any]:
        tags = dict(self.tags)
        if self.service is not None:
            tags[self.service_tag] = self.service
        net: dict[str, Any] = {"address": self.address}
        if self.gateway:
            net["gateway"] = {"tags": tags, "type": "BUILTIN"}
        else:
            net["inbound"] = [{"port": self.inbound_port, "tags": tags}, *self.extra_inbounds]
        if self.transparent:
            net["transparentProxying"] = {"redirectPortInbound": 15006,
                                          "redirectPortOutbound": 15001}
        return net

    def meta(self, kind: str) -> dict[str, Any]:
        item: dict[str, Any] = {
            "type": kind, "mesh": self.mesh, "name": self.name,
            "creationTime": _TIME, "modificationTime": _TIME,
            "kri": f"kri_dp_{self.mesh}___{self.name}_",
        }
        if self.labels:
            item["labels"] = dict(self.labels)
        return item

    def dataplane_item(self) -> dict[str, Any]:
        """As in ``GET /meshes/{mesh}/dataplanes`` (list_dp_with_filters.golden.json)."""
        item = self.meta("Dataplane")
        item["networking"] = self.networking()
        if self.metrics is not None:
            item["metrics"] = self.metrics
        return item

    def overview_item(self) -> dict[str, Any]:
        """As in ``_overview`` / ``+insights`` (meshes_mesh1_dataplanes_insights.json)."""
        item = self.meta("DataplaneOverview")
        spec: dict[str, Any] = {"networking": self.networking()}
        if self.metrics is not None:
            spec["metrics"] = self.metrics
        item["dataplane"] = spec
        if self.insight == "no-insight":
            return item
        sub: dict[str, Any] = {"id": "stream-id-1", "controlPlaneInstanceId": "cp-1"}
        if self.insight != "never-connected":
            sub["connectTime"] = _CONNECT
        if self.insight == "disconnected":
            sub["disconnectTime"] = _DISCONNECT
        if self.insight != "never-connected":
            sub["status"] = {"lastUpdateTime": _CONNECT, "total": {}, "cds": {}, "eds": {},
                             "lds": {}, "rds": {}}
        item["dataplaneInsight"] = {"subscriptions": [sub]}
        return item


@dataclass
class _Fault:
    pattern: re.Pattern[str]
    status: int | None  # None: only a delay
    delay: float
    remaining: int | None  # None: for ever
    body: str | None = None  # instead of Kuma's JSON error (e.g. a proxy's HTML page)


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path_qs: str
    authorization: str | None


class FakeKumaCP:
    def __init__(self, token: str | None = None, *, host: str = "127.0.0.1",
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.token = token
        self.host = host
        self.port = 0
        self.ssl_context = ssl_context
        self.meshes: dict[str, dict[str, Any]] = {}
        self.dataplanes: dict[tuple[str, str], FakeDataplane] = {}
        # MeshPassthrough items per (mesh, name), as GET .../meshpassthroughs lists them.
        self.policies: dict[tuple[str, str], dict[str, Any]] = {}
        self.version = "2.14.3"
        self.pagination: Pagination = "ok"
        self.overview = True
        self.inspect_usedonly = True
        # Rewrites every DataplaneOverview item served: malformed answers on demand.
        self.item_hook: Callable[[dict[str, Any]], Any] | None = None
        self.requests: list[RecordedRequest] = []
        self._faults: list[_Fault] = []
        self._runner: web.AppRunner | None = None

    # -- state -----------------------------------------------------------------

    def add_mesh(self, name: str, **spec: Any) -> None:
        """``spec`` is merged into the Mesh item (``networking``, ``metrics``, …)."""
        self.meshes[name] = spec

    def remove_mesh(self, name: str) -> None:
        self.meshes.pop(name, None)
        for key in [k for k in self.dataplanes if k[0] == name]:
            del self.dataplanes[key]

    def add_dataplane(self, mesh: str, name: str, **kwargs: Any) -> FakeDataplane:
        if mesh not in self.meshes:
            self.add_mesh(mesh)
        dp = FakeDataplane(mesh, name, **kwargs)
        self.dataplanes[(mesh, name)] = dp
        return dp

    def remove_dataplane(self, mesh: str, name: str) -> None:
        del self.dataplanes[(mesh, name)]

    def add_policy(self, mesh: str, name: str, spec: dict[str, Any],
                   labels: dict[str, str] | None = None) -> None:
        """A MeshPassthrough in the Universal shape Kuma's REST API lists
        (``type``, ``mesh``, ``name``, ``labels``, ``spec``; 2.14's openapi)."""
        item: dict[str, Any] = {"type": "MeshPassthrough", "mesh": mesh, "name": name,
                                "creationTime": _TIME, "modificationTime": _TIME,
                                "spec": spec}
        if labels:
            item["labels"] = dict(labels)
        self.policies[(mesh, name)] = item

    def remove_policy(self, mesh: str, name: str) -> None:
        del self.policies[(mesh, name)]

    # -- faults ------------------------------------------------------------------

    def fail(self, pattern: str, status: int = 500, times: int | None = None,
             body: str | None = None) -> None:
        """Answer requests whose path (with query) matches ``pattern`` with
        ``status`` and Kuma's error JSON, or ``body`` as text/html when given."""
        self._faults.append(_Fault(re.compile(pattern), status, 0.0, times, body))

    def slow(self, pattern: str, seconds: float, times: int | None = None) -> None:
        self._faults.append(_Fault(re.compile(pattern), None, seconds, times))

    def clear_faults(self) -> None:
        self._faults.clear()

    # -- life cycle ------------------------------------------------------------------

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._runner is not None

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._record, self._faults_mw, self._auth])
        r = app.router
        r.add_get("/", self._index)
        r.add_get("/meshes", self._list_meshes)
        r.add_get("/meshes/{mesh}", self._get_mesh)
        r.add_get("/meshes/{mesh}/dataplanes", self._list_dataplanes)
        r.add_get("/meshes/{mesh}/dataplanes+insights", self._list_insights)
        r.add_get("/meshes/{mesh}/dataplanes/_overview", self._list_overview)
        r.add_get("/meshes/{mesh}/meshpassthroughs", self._list_policies)
        r.add_get("/meshes/{mesh}/dataplanes/{name}/stats", self._inspect_stats)
        r.add_get("/meshes/{mesh}/dataplanes/{name}/clusters", self._inspect_clusters)
        return app

    async def start(self) -> None:
        """Listen (again on the same port after a ``stop()``)."""
        if self._runner is not None:
            return
        runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, ssl_context=self.ssl_context,
                           reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        if self.port == 0:
            self.port = runner.addresses[0][1]

    async def stop(self) -> None:
        """The CP goes down: connections are refused until ``start()``."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    # -- middlewares -------------------------------------------------------------------

    @web.middleware
    async def _record(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.requests.append(RecordedRequest(request.method, request.path_qs,
                                             request.headers.get("Authorization")))
        return await handler(request)

    @web.middleware
    async def _faults_mw(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        for fault in list(self._faults):
            if not fault.pattern.search(request.path_qs):
                continue
            if fault.remaining is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._faults.remove(fault)
            if fault.delay:
                await asyncio.sleep(fault.delay)
            if fault.status is not None and fault.body is not None:
                return web.Response(status=fault.status, text=fault.body,
                                    content_type="text/html")
            if fault.status is not None:
                return _error(fault.status, "Injected failure",
                              f"fault for {fault.pattern.pattern}")
        return await handler(request)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if (self.token is not None and request.path != "/"
                and request.headers.get("Authorization") != f"Bearer {self.token}"):
            return _error(401, "Unauthenticated", "invalid or missing token")
        return await handler(request)

    # -- API -------------------------------------------------------------------------

    async def _index(self, request: web.Request) -> web.Response:
        return web.json_response({"hostname": "fake-kuma-cp", "tagline": "Kuma",
                                  "version": self.version, "product": "Kuma",
                                  "instanceId": "fake-kuma-cp-1", "clusterId": "fake"})

    def _mesh_item(self, name: str) -> dict[str, Any]:
        item: dict[str, Any] = {"type": "Mesh", "name": name, "creationTime": _TIME,
                                "modificationTime": _TIME, "kri": f"kri_m____{name}_"}
        item.update(self.meshes[name])
        return item

    async def _list_meshes(self, request: web.Request) -> web.Response:
        return self._page(request, [self._mesh_item(n) for n in sorted(self.meshes)])

    async def _get_mesh(self, request: web.Request) -> web.Response:
        name = request.match_info["mesh"]
        if name not in self.meshes:
            return _error(404, "Could not retrieve a resource", "Not found")
        return web.json_response(self._mesh_item(name))

    async def _list_policies(self, request: web.Request) -> web.Response:
        mesh = request.match_info["mesh"]
        return self._page(request, [p for (m, _), p in sorted(self.policies.items())
                                    if m == mesh])

    def _mesh_dataplanes(self, mesh: str) -> list[FakeDataplane]:
        return [dp for (m, n), dp in sorted(self.dataplanes.items()) if m == mesh]

    async def _list_dataplanes(self, request: web.Request) -> web.Response:
        dps = self._mesh_dataplanes(request.match_info["mesh"])
        return self._page(request, [dp.dataplane_item() for dp in dps])

    async def _list_insights(self, request: web.Request) -> web.Response:
        dps = self._mesh_dataplanes(request.match_info["mesh"])
        items = [dp.overview_item() for dp in dps]
        if self.item_hook is not None:
            items = [self.item_hook(item) for item in items]
        return self._page(request, items)

    async def _list_overview(self, request: web.Request) -> web.Response:
        if not self.overview:
            # What a Kuma without `_overview` says: no dataplane of that name.
            return _error(404, "Could not retrieve a resource", "Not found")
        return await self._list_insights(request)

    def _page(self, request: web.Request, items: list[dict[str, Any]]) -> web.Response:
        try:
            offset = int(request.query.get("offset", "0"))
            size = int(request.query.get("size", "100"))
        except ValueError:
            return _error(400, "Bad Request", "offset and size must be integers")
        if not 1 <= size <= 1000 or offset < 0:
            return _error(400, "Bad Request", "size must be between 1 and 1000, offset >= 0")
        page = items[offset:offset + size]
        total = len(items)
        nxt: int | None = offset + size if offset + size < total else None
        if self.pagination == "next-self":
            nxt = offset if nxt is not None else None
        elif self.pagination == "empty-next" and nxt is None:
            nxt = offset + size
        elif self.pagination == "total-lies":
            total += 5
        origin = "http://cp.elsewhere.example:5681" if self.pagination == "foreign-next" \
            else str(request.url.origin())
        return web.json_response({
            "total": total, "items": page,
            "next": None if nxt is None else f"{origin}{request.path}?offset={nxt}&size={size}",
        })

    # -- inspect -------------------------------------------------------------------------

    async def _inspect(self, request: web.Request, admin_path: str,
                       params: dict[str, str]) -> web.Response:
        key = (request.match_info["mesh"], request.match_info["name"])
        dp = self.dataplanes.get(key)
        if dp is None:
            return _error(404, "Could not retrieve a resource", "Not found")
        if dp.insight != "online" or dp.admin_url is None:
            return _error(500, "Could not execute admin operation",
                          f"dataplane {key[1]} is not connected to this control plane")
        try:
            status, body = await admin_get(dp.admin_url, admin_path, params)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return _error(500, "Could not execute admin operation",
                          f"cannot reach the Envoy admin of {key[1]}: {exc}")
        if status != 200:
            return _error(500, "Could not execute admin operation",
                          f"Envoy admin answered {status}: {body[:200]}")
        return web.Response(text=body, content_type="text/plain")

    async def _inspect_stats(self, request: web.Request) -> web.Response:
        params = {k: request.query[k] for k in ("format", "filter") if k in request.query}
        if self.inspect_usedonly:
            params["usedonly"] = ""
        return await self._inspect(request, "/stats", params)

    async def _inspect_clusters(self, request: web.Request) -> web.Response:
        params = {k: request.query[k] for k in ("format",) if k in request.query}
        return await self._inspect(request, "/clusters", params)


def _error(status: int, title: str, detail: str) -> web.Response:
    # Kuma's error body (2.x): {"type", "status", "title", "detail"}.
    return web.json_response({"type": "/std-errors", "status": status, "title": title,
                              "detail": detail}, status=status)


async def admin_get(admin_url: str, path: str,
                    params: dict[str, str] | None = None) -> tuple[int, str]:
    """GET an Envoy admin path on ``http://…`` or ``unix://…``: (status, body)."""
    parts = urlsplit(admin_url)
    connector: aiohttp.BaseConnector
    if parts.scheme == "unix":
        connector, base = aiohttp.UnixConnector(path=parts.path), "http://localhost"
    else:
        connector, base = aiohttp.TCPConnector(), admin_url.rstrip("/")
    async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=_ADMIN_TIMEOUT),
            trust_env=False) as session, session.get(base + path, params=params) as resp:
        return resp.status, await resp.text()


async def _main() -> None:  # pragma: no cover - manual use
    cp = FakeKumaCP()
    cp.add_mesh("default")
    cp.add_dataplane("default", "web-1", admin_url="http://127.0.0.1:9901")
    await cp.start()
    print(f"fake kuma-cp on {cp.url}")
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.Event().wait()


if __name__ == "__main__":  # pragma: no cover
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main())
