"""What the routes need of the daemon, and nothing more: the ``Backend`` protocol.

The route modules read the app's backend (``request.app[BACKEND]``) and
never import ``passguard.app``: ``passguard.app.Daemon`` satisfies the
protocol structurally (mypy checks it where the daemon hands itself to
``build_app``), and a test can hand ``build_app`` a small fake instead and
drive the routes with aiohttp's test client, with no scraping and no Envoy
(tests/unit/test_routes_backend.py).

Every member is read-only here (a property): the routes never replace
anything of the daemon's. The daemon replaces its config, tokens and store
contents on a reload; the routes read them anew on each request.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import Counter

from passguard.audit import AuditEntry
from passguard.config import AuthConfig, LimitsConfig, ScrapeConfig
from passguard.foreground import Foreground
from passguard.gate.shadow import Shadow
from passguard.policy.model import MeshState
from passguard.store.snapshot import Snapshot
from passguard.store.window import History
from passguard.targets import Target
from passguard.verdicts import GateConfig


class Settings(Protocol):
    """The sections of the running config the routes read (``passguard.config.Config``)."""

    @property
    def limits(self) -> LimitsConfig: ...
    @property
    def auth(self) -> AuthConfig: ...
    @property
    def gate(self) -> GateConfig: ...
    @property
    def scrape(self) -> ScrapeConfig: ...
    @property
    def window(self) -> float: ...


class Evidence(Protocol):
    """The published evidence (``passguard.store.store.Store``): the snapshot
    for every route, the targets and their segments for ``/v1/verify``."""

    @property
    def snapshot(self) -> Snapshot: ...
    @property
    def targets(self) -> Mapping[str, Target]: ...
    @property
    def histories(self) -> Mapping[str, History]: ...
    @property
    def window(self) -> float: ...
    @property
    def stale_after(self) -> float: ...


class Audit(Protocol):
    """The audit log (``passguard.audit.AuditLog``)."""

    async def record(self, entries: list[AuditEntry]) -> None:
        """On disk when it returns; raises when the entries cannot be written."""
        ...

    def query(self, since: float | None, mesh: str | None, verdict: str | None,
              limit: int, before_id: int | None) -> tuple[list[AuditEntry], int | None]:
        """Newest first, and the id to pass as ``before_id`` for the next page
        (blocking: the routes call it in a thread)."""
        ...


class Counters(Protocol):
    """The daemon's counters the routes move, and ``GET /metrics``
    (``passguard.metrics.Metrics``)."""

    @property
    def decisions(self) -> Counter: ...
    @property
    def audit_failures(self) -> Counter: ...
    @property
    def rate_limited(self) -> Counter: ...

    async def exposition(self, accept: str) -> tuple[tuple[bytes, bytes], str]: ...


class Shadows(Protocol):
    """The shadow policies (``passguard.shadows.Shadows``)."""

    @property
    def items(self) -> Mapping[str, Shadow]: ...

    async def add(self, name: str, docs: list[Any], requester: str, now: float,
                  max_matches: int) -> tuple[Shadow, list[str]]: ...

    async def remove(self, name: str) -> bool: ...

    def summary(self, s: Shadow, window: float, now: float,
                blocks_unproven: Callable[[str], bool]) -> dict[str, Any]: ...

    def report(self, name: str, since: float, window: float, now: float,
               blocks_unproven: Callable[[str], bool]) -> dict[str, Any] | None: ...


class Tokens(Protocol):
    """The bearer tokens (``passguard.web.auth.TokenStore``)."""

    def name_for(self, token: str) -> str | None: ...


class Backend(Protocol):
    """What the HTTP routes read and call; ``passguard.app.Daemon`` is one."""

    @property
    def config(self) -> Settings: ...
    @property
    def store(self) -> Evidence: ...
    @property
    def audit(self) -> Audit: ...
    @property
    def metrics(self) -> Counters: ...
    @property
    def shadows(self) -> Shadows: ...
    @property
    def tokens(self) -> Tokens | None:
        """None: no tokens file, nothing is behind a token."""
        ...
    @property
    def foreground(self) -> Foreground:
        """The requests in flight, counted for the daemon's bulk work to give way."""
        ...

    def mesh_states(self) -> Mapping[str, MeshState]:
        """The control planes' current policy sets, per mesh."""
        ...

    async def reload(self) -> str | None:
        """Re-read the config file; the error when it is refused, else None."""
        ...


#: The backend of an app built by ``passguard.web.routes.build_app``.
BACKEND: web.AppKey[Backend] = web.AppKey("backend")
