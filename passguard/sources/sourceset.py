"""Where targets come from: static config and files (``envoy``), or the Kuma CP (``kuma``).

``SourceSet`` is what the daemon and the one-shot ``passguard check -c`` share:
the merged target list, and for each target how to read it (a plain Envoy
admin needs nothing; a CP-discovered one goes through the inspect API with a
token, or kuma-dp's metrics).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from ssl import SSLContext

from passguard.config import Config, EnvoySource
from passguard.httpclient import HttpProblem, client_ssl_context
from passguard.policy.model import MeshState
from passguard.scraper import Request
from passguard.sources.kuma import KumaSource
from passguard.sources.prometheus import PrometheusSource
from passguard.sources.settings import KumaSourceConfig
from passguard.sources.static import StaticSource
from passguard.store.snapshot import DataplaneEvidence
from passguard.targets import Target

log = logging.getLogger(__name__)
AnySource = StaticSource | KumaSource


class SourceSet:
    def __init__(self, config: Config) -> None:
        self.sources: list[AnySource] = []
        self.prometheus: list[PrometheusSource] = []
        for c in config.sources:
            if isinstance(c, EnvoySource):
                self.sources.append(StaticSource(c))
            elif isinstance(c, KumaSourceConfig):
                self.sources.append(KumaSource(c))
            else:
                self.prometheus.append(PrometheusSource(
                    c, config.window, config.stale_after,
                    clusters_pattern=config.passthrough_clusters,
                    outbound_port=config.outbound_port))
        self._kuma_of: dict[str, KumaSource] = {}
        self._ssl: dict[int, SSLContext | None] = {}

    @property
    def kuma(self) -> list[KumaSource]:
        return [s for s in self.sources if isinstance(s, KumaSource)]

    def inherit(self, old: SourceSet) -> None:
        """A reload: each control plane starts from its last known dataplanes."""
        for src in self.kuma:
            for prev in old.kuma:
                src.inherit(prev)

    def targets(self) -> list[Target]:
        out: dict[str, Target] = {}
        kuma_of: dict[str, KumaSource] = {}
        for src in self.sources:
            for t in src.targets():
                if t.key in out and out[t.key].url != t.url:
                    log.warning("dataplane %s is listed twice (%s and %s); keeping the first",
                                t.key, out[t.key].url, t.url)
                    continue
                out.setdefault(t.key, t)
                if isinstance(src, KumaSource):
                    kuma_of[t.key] = src
        self._kuma_of = kuma_of
        return list(out.values())

    def mesh_states(self) -> dict[str, MeshState]:
        """The current policy set per mesh, from every control plane (the
        first source that lists a mesh wins, as for targets)."""
        out: dict[str, MeshState] = {}
        for src in self.kuma:
            for mesh, state in src.mesh_states().items():
                out.setdefault(mesh, state)
        return out

    def complete(self) -> bool:
        """Every control plane answered at least once: a dataplane missing from
        the lists is really gone, not merely unknown while a CP is down."""
        return all(s.last_success is not None for s in self.kuma)

    def request_for(self, target: Target) -> Request | None:
        src = self._kuma_of.get(target.key)
        if src is None:
            return None
        r = src.request_for(target)
        ssl = None
        if r.base.startswith("https:"):
            if id(src) not in self._ssl:
                try:
                    self._ssl[id(src)] = client_ssl_context(src.cfg.ca_file,
                                                            src.cfg.insecure_skip_verify)
                except HttpProblem as exc:
                    log.error("%s", exc)
                    self._ssl[id(src)] = None
            ssl = self._ssl[id(src)]
        return Request(r.base, r.path, dict(r.headers), r.format, r.clusters_path, ssl,
                       r.invalid)

    async def collect(self, now: float) -> list[DataplaneEvidence]:
        """Evidence from every Prometheus source (one round each, concurrently)."""
        rounds = await asyncio.gather(*(p.collect(now) for p in self.prometheus))
        out: list[DataplaneEvidence] = []
        for src, dps in zip(self.prometheus, rounds, strict=True):
            out.extend(replace(d, origin="prometheus", stale_after=src.threshold) for d in dps)
        return out

    async def discover(self) -> None:
        """One pass of every control plane (each bounded by its own timeout)."""
        await asyncio.gather(*(s.discover() for s in self.kuma))

    async def close(self) -> None:
        for src in self.kuma:
            await src.close()
        for prom in self.prometheus:
            await prom.close()
