"""Source ``kuma``: dataplanes discovered from the Kuma control plane API.

``discover()`` is one pass over the CP (meshes, each mesh's dataplanes with
their insight and its MeshPassthrough policies, every list paginated to the
end); ``targets()`` and ``mesh_states()`` are the last known result. Items are
parsed by ``sources.kumawire``. Invariants: a failed pass changes nothing (the
last known dataplanes are kept, per mesh); a listing that cannot be trusted to
be complete is an error, never a shorter list; the CP token goes only to the
CP. Details: docs/sources.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qs, quote, urlsplit

import aiohttp

from passguard.httpclient import (
    ClientTLS,
    HttpProblem,
    bearer,
    exchange,
    http_problem,
    read_bounded,
    secret,
)
from passguard.policy.model import MeshFlag, MeshState, Policy, Version
from passguard.sources.kumawire import (
    DEFAULT_METRICS_PATH,
    DataplaneInfo,
    KumaApiError,
    MeshInfo,
    metrics_endpoint,
    parse_dataplane_item,
    parse_index,
    parse_list_page,
    parse_mesh_item,
    parse_policy_item,
)
from passguard.sources.settings import KumaSourceConfig
from passguard.targets import Target

log = logging.getLogger(__name__)

StatsFormat = Literal["envoy", "prometheus"]

# Paths of the dataplane list with insights, newest first.
OVERVIEW_PATHS = ("/dataplanes/_overview", "/dataplanes+insights")
# Guards against a CP (or something in front of it) that paginates forever.
MAX_PAGES = 10_000
# A listing whose `total` disagrees with what the pages held is retried this
# often before the pass gives up on that list.
LIST_ATTEMPTS = 3
# Meshes listed at once: enough to hide latency, few enough not to load the CP.
MESH_CONCURRENCY = 8


@dataclass(frozen=True, slots=True)
class StatsRequest:
    """How to read one target's stats: ``GET base + path`` with ``headers``."""

    base: str
    path: str
    headers: Mapping[str, str]
    format: StatsFormat  # "envoy": StatsParser; "prometheus": PromStatsParser
    # Envoy `/clusters` (destinations) through the same base; None when the
    # mode has no such endpoint (kuma-dp serves metrics only).
    clusters_path: str | None
    # Why the target must not be read (see metrics_endpoint): it fails with it.
    invalid: str | None = None


@dataclass
class _State:
    meshes: dict[str, MeshInfo] = field(default_factory=dict)
    dataplanes: dict[str, list[DataplaneInfo]] = field(default_factory=dict)
    # The MeshPassthrough policies of each mesh, and when the mesh was last
    # listed completely (its dataplanes and its policies in one pass).
    policies: dict[str, tuple[Policy, ...]] = field(default_factory=dict)
    listed_at: dict[str, float] = field(default_factory=dict)
    version: Version | None = None


class KumaSource:
    """Discovery from one Kuma CP.  ``discover()`` is one pass (never raises on
    CP problems); ``targets()`` is the last known list, cheap and synchronous."""

    def __init__(self, cfg: KumaSourceConfig) -> None:
        self.cfg = cfg
        self.base = cfg.url.rstrip("/")
        self.last_error: str | None = None
        self.last_success: float | None = None  # wall time of the last complete pass
        self.last_attempt: float | None = None
        self.consecutive_failures = 0
        # Per-mesh listing problems of the last pass (mesh name → message).
        self.mesh_errors: dict[str, str] = {}
        self.overview_path: str | None = None  # which OVERVIEW_PATHS entry this CP serves
        self._state = _State()
        self._mesh_states: dict[str, MeshState] = {}
        self._targets: list[Target] = []
        self._paths: dict[str, str] = {}
        # kuma-dp targets that fail metrics_endpoint: key -> the reason.
        self._invalid: dict[str, str] = {}
        self._token: str | None = None
        self._session: aiohttp.ClientSession | None = None
        self._tls = ClientTLS(cfg.ca_file, cfg.insecure_skip_verify)
        self._ssl: ssl.SSLContext | bool = True
        self._lock = asyncio.Lock()

    # -- what the rest of passguard reads ----------------------------------

    def targets(self) -> list[Target]:
        return list(self._targets)

    def dataplanes(self) -> list[DataplaneInfo]:
        return [dp for mesh in sorted(self._state.dataplanes)
                for dp in self._state.dataplanes[mesh]]

    def meshes(self) -> list[str]:
        """Meshes of the last known list (those matching ``meshes``)."""
        return sorted(self._state.dataplanes)

    @property
    def version(self) -> Version | None:
        return self._state.version

    def mesh_states(self) -> dict[str, MeshState]:
        """The current policy set of every mesh this CP listed completely at
        least once. A mesh whose last listing failed keeps its older state:
        its ``as_of`` tells the gate how old it is. The same objects until the
        next pass: the gate's memo knows a state by its identity."""
        return self._mesh_states

    def _build_mesh_states(self) -> dict[str, MeshState]:
        st = self._state
        stale_after = self.cfg.stale_after or 3 * self.cfg.discovery_interval
        return {
            mesh: MeshState(mesh, MeshFlag(mesh, info.passthrough), st.policies[mesh],
                            tuple(dp.proxy() for dp in st.dataplanes.get(mesh, ())),
                            st.version, self.base, st.listed_at[mesh], stale_after)
            for mesh, info in st.meshes.items()
            if mesh in st.policies and mesh in st.listed_at
        }

    @property
    def headers(self) -> dict[str, str]:
        """Headers for the CP (inspect endpoints), with the last token read."""
        return bearer(self._token)

    def headers_for(self, target: Target) -> dict[str, str]:
        # Only the CP gets the token; kuma-dp endpoints live on dataplane
        # addresses, where anything listening would receive it.
        return self.headers if self.cfg.stats == "inspect" else {}

    def request_for(self, target: Target) -> StatsRequest:
        if self.cfg.stats == "inspect":
            return StatsRequest(target.url, "/stats", self.headers, "envoy", "/clusters")
        return StatsRequest(target.url, self._paths.get(target.key, DEFAULT_METRICS_PATH), {},
                            "prometheus", None, self._invalid.get(target.key))

    def inherit(self, old: KumaSource) -> None:
        """Start from another source's last known dataplanes (a config reload):
        targets must not vanish, and their evidence with them, while the new
        source has not finished its first pass.  Only from the same CP."""
        if old.base != self.base:
            return
        self._state = _State(dict(old._state.meshes),
                             {m: dps for m, dps in old._state.dataplanes.items()
                              if self.cfg.wants(m)},
                             dict(old._state.policies), dict(old._state.listed_at),
                             old._state.version)
        self._token = old._token
        self.last_success, self.last_error = old.last_success, old.last_error
        self.overview_path = old.overview_path
        self._rebuild()

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # -- one pass ------------------------------------------------------------

    async def discover(self) -> None:
        async with self._lock:
            self.last_attempt = time.time()
            self.mesh_errors = {}
            # The whole pass gets at most one interval (and never less than
            # one request's timeout): a slow CP cannot pile passes up.
            bound = max(self.cfg.discovery_interval, self.cfg.timeout)
            try:
                async with asyncio.timeout(bound):
                    errors = await self._discover()
            except KumaApiError as exc:
                errors = [str(exc)]
            except TimeoutError:
                errors = [f"discovery did not finish within {bound:g}s"]
            except Exception as exc:  # a bug must not stop discovery for good
                log.exception("Kuma discovery from %s failed unexpectedly", self.base)
                errors = [f"internal error: {type(exc).__name__}: {exc}"]
            self._finish(errors)

    def _finish(self, errors: list[str]) -> None:
        if errors:
            self.consecutive_failures += 1
            message = "; ".join(errors)
            if message != self.last_error:
                log.warning("Kuma CP %s: %s (keeping the last known dataplanes)",
                            self.base, message)
            self.last_error = message
            return
        if self.last_error is not None:
            log.info("Kuma CP %s: discovery works again", self.base)
        self.consecutive_failures = 0
        self.last_error = None
        self.last_success = time.time()

    async def _discover(self) -> list[str]:
        try:
            self._token = (secret(self.cfg.token_file, "token_file")
                           if self.cfg.token_file else None)
            self._ssl = self._tls.context() if self.base.startswith("https:") else True
        except HttpProblem as exc:
            raise KumaApiError(str(exc)) from None
        try:
            version = parse_index(await self._get_json("/", {}))
        except KumaApiError as exc:
            # The version only refines the semantics; unknown, the gate takes
            # the stricter reading of each version-dependent rule.
            log.debug("Kuma CP %s: no version from its index: %s", self.base, exc)
            version = None
        meshes = [parse_mesh_item(it, f"GET /meshes: items[{i}]")
                  for i, it in enumerate(await self._list_all("/meshes"))]
        wanted = [m for m in meshes if self.cfg.wants(m.name)]
        gate = asyncio.Semaphore(MESH_CONCURRENCY)

        async def one(mesh: MeshInfo) -> tuple[list[DataplaneInfo], tuple[Policy, ...]] | str:
            async with gate:
                try:
                    return (await self._mesh_dataplanes(mesh.name),
                            await self._mesh_policies(mesh.name))
                except KumaApiError as exc:
                    return str(exc)

        results = await asyncio.gather(*(one(m) for m in wanted))
        listed = time.time()
        errors: list[str] = []
        old = self._state
        new = _State(version=version or old.version)
        for mesh, result in zip(wanted, results, strict=True):
            new.meshes[mesh.name] = mesh
            if isinstance(result, str):
                errors.append(result)
                self.mesh_errors[mesh.name] = result
                # The mesh keeps what its last complete listing said.
                if mesh.name in old.dataplanes:
                    new.dataplanes[mesh.name] = old.dataplanes[mesh.name]
                if mesh.name in old.policies and mesh.name in old.listed_at:
                    new.policies[mesh.name] = old.policies[mesh.name]
                    new.listed_at[mesh.name] = old.listed_at[mesh.name]
            else:
                new.dataplanes[mesh.name], new.policies[mesh.name] = result
                new.listed_at[mesh.name] = listed
        # Meshes gone from the CP, or no longer wanted, are dropped with their dataplanes.
        self._state = new
        self._rebuild()
        return errors

    async def _mesh_policies(self, mesh: str) -> tuple[Policy, ...]:
        """Every MeshPassthrough of ``mesh``. A CP older than the policy
        (before Kuma 2.8) answers 404: there is none."""
        path = f"/meshes/{quote(mesh, safe='')}/meshpassthroughs"
        try:
            items = await self._list_all(path)
        except KumaApiError as exc:
            if exc.status == 404:
                return ()
            raise
        return tuple(parse_policy_item(it, f"GET {path}: items[{i}]", mesh)
                     for i, it in enumerate(items))

    async def _mesh_dataplanes(self, mesh: str) -> list[DataplaneInfo]:
        prefix = f"/meshes/{quote(mesh, safe='')}"
        paths = [self.overview_path] if self.overview_path else list(OVERVIEW_PATHS)
        for n, suffix in enumerate(paths):
            path = prefix + suffix
            try:
                items = await self._list_all(path)
            except KumaApiError as exc:
                # A Kuma without `_overview` reads it as a dataplane named
                # "_overview" and answers 404: ask the older path.
                if exc.status == 404 and n + 1 < len(paths):
                    continue
                raise
            self.overview_path = suffix
            # A dataplane kuma-dp mode cannot read (no address, a bad one) is
            # listed and fails alone (_rebuild), not the whole mesh's listing.
            return [parse_dataplane_item(it, f"GET {path}: items[{i}]", mesh)
                    for i, it in enumerate(items)]
        raise AssertionError("unreachable: the last path raises")

    # -- HTTP --------------------------------------------------------------------

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # trust_env=False: an HTTP(S)_PROXY meant for the internet must not
            # receive the CP token.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=MESH_CONCURRENCY * 2), trust_env=False)
        return self._session

    async def _get_json(self, path: str, params: Mapping[str, str]) -> Any:
        headers = {"Accept": "application/json", **self.headers}
        what = f"GET {path}"
        try:
            async with exchange(self._http(), "GET", self.base + path, timeout=self.cfg.timeout,
                                origin=self.base, server="the Kuma CP", what=what,
                                params=params, headers=headers, ssl=self._ssl) as resp:
                body = await read_bounded(resp, self.cfg.max_response_bytes, f"{what}: the CP",
                                          "max_response_bytes")
        except HttpProblem as exc:
            raise KumaApiError(str(exc)) from None
        if resp.status != 200:
            hint = None
            if resp.status == 401:
                hint = (f"the CP refused the token from {self.cfg.token_file}"
                        if self.cfg.token_file else "the CP wants a token: set token_file")
            elif resp.status == 403:
                hint = "the token lacks access to this resource"
            raise KumaApiError(http_problem(what, resp.status, body, "the Kuma CP", hint),
                               resp.status)
        try:
            return json.loads(body)
        except ValueError:
            head = body[:80].decode("utf-8", "replace").strip()
            raise KumaApiError(f"{what}: the answer is not JSON (starts {head!r})") from None

    async def _list_all(self, path: str) -> list[Any]:
        """Every item of a paginated list.  Raises KumaApiError when the pages do
        not add up (docs/sources.md: an incomplete list is never
        taken for a complete one)."""
        problem = ""
        for _ in range(LIST_ATTEMPTS):
            items, total = await self._list_once(path)
            distinct = len({_identity(it) for it in items})
            if total is None or (distinct == total == len(items)):
                return items
            problem = (f"GET {path}: the CP reported total {total} but its pages held "
                       f"{len(items)} items ({distinct} distinct); the list changed during "
                       f"pagination or the CP miscounts")
        raise KumaApiError(problem)

    async def _list_once(self, path: str) -> tuple[list[Any], int | None]:
        size = self.cfg.page_size
        offset = 0
        items: list[Any] = []
        total: int | None = None
        for _ in range(MAX_PAGES):
            where = f"GET {path}?offset={offset}&size={size}"
            page = parse_list_page(
                await self._get_json(path, {"offset": str(offset), "size": str(size)}), where)
            items.extend(page.items)
            total = page.total
            if page.next is None:
                return items, total
            if not page.items:
                raise KumaApiError(f"{where}: an empty page whose next ({page.next!r}) "
                                   f"points further")
            # Only the offset is taken from `next`: Kuma builds it from the
            # Host it was asked under, which need not be this URL, and the
            # token must only go to the configured CP.
            nxt = _next_offset(page.next, where)
            if nxt <= offset:
                raise KumaApiError(f"{where}: pagination does not advance (next "
                                   f"{page.next!r} points back to offset {nxt})")
            offset = nxt
        raise KumaApiError(f"GET {path}: more than {MAX_PAGES} pages; giving up")

    def _rebuild(self) -> None:
        self._mesh_states = self._build_mesh_states()
        targets: list[Target] = []
        paths: dict[str, str] = {}
        invalid: dict[str, str] = {}
        for dp in self.dataplanes():
            if self.cfg.stats == "inspect":
                url = (f"{self.base}/meshes/{quote(dp.mesh, safe='')}"
                       f"/dataplanes/{quote(dp.name, safe='')}")
            else:
                mesh = self._state.meshes.get(dp.mesh, MeshInfo(dp.mesh))
                endpoint = metrics_endpoint(dp, mesh, self.cfg.allowed_cidrs)
                if isinstance(endpoint, str):
                    # Listed (the gate counts it unknown), never read.
                    url, invalid[f"{dp.mesh}/{dp.name}"] = "", endpoint
                else:
                    url, paths[f"{dp.mesh}/{dp.name}"] = endpoint
            targets.append(Target(url=url, mesh=dp.mesh, dataplane=dp.name, service=dp.service,
                                  tags=dp.tags, offline=dp.online is False,
                                  offline_since=dp.disconnected_at))
        self._targets, self._paths, self._invalid = targets, paths, invalid


def _identity(item: Any) -> Any:
    # An item without a usable name counts as distinct: the item parser, not
    # the page count, is what reports it (naming the field).
    if isinstance(item, dict) and isinstance(item.get("name"), str) and item["name"]:
        return (item.get("mesh"), item["name"])
    return id(item)


def _next_offset(next_url: str, where: str) -> int:
    values = parse_qs(urlsplit(next_url).query).get("offset")
    if not values:
        raise KumaApiError(f"{where}: next {next_url!r} carries no offset")
    try:
        return int(values[-1])
    except ValueError:
        raise KumaApiError(f"{where}: next {next_url!r} has a non-numeric offset") from None


__all__ = ["KumaSource", "KumaSourceConfig", "StatsRequest"]
