"""The settings a config file becomes: frozen values the rest of passguard reads.

Their defaults are the only place a default is written: the declared schema
(``passguard.config_schema``) reads them from here.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from passguard.envoy.names import DEFAULT_CLUSTERS_PATTERN
from passguard.loader import Limits
from passguard.sources.settings import KumaSourceConfig, PrometheusSourceConfig
from passguard.verdicts import GateConfig

LogFormat = Literal["text", "json"]


@dataclass(frozen=True)
class Listen:
    host: str
    port: int

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ScrapeConfig:
    interval: float = 15.0
    timeout: float = 5.0
    concurrency: int = 256
    # Guards against a proxy (or something pretending to be one) that sends
    # an endless body: a filtered /stats answer is a few hundred bytes.
    max_response_bytes: int = 64 * 1024 * 1024
    # All admin answers being read at once, together: what bounds memory
    # (concurrency x max_response_bytes would be 16 GiB).
    max_buffered_bytes: int = 256 * 1024 * 1024
    # Seconds over which a cycle's scrapes start; None = auto (passguard.pacing).
    spread: float | None = None
    # Where the admin APIs are read: "process", a worker process of its own
    # (passguard/scrape_process.py); "inline", the daemon's event loop;
    # "auto", the worker from AUTO_WORKER_TARGETS targets in a pass.
    worker: str = "auto"


@dataclass(frozen=True)
class TargetConfig:
    url: str
    labels: Mapping[str, str]

    @property
    def mesh(self) -> str:
        return self.labels.get("mesh", "default")

    @property
    def dataplane(self) -> str:
        return self.labels.get("dataplane") or self.url

    @property
    def service(self) -> str:
        return self.labels.get("service", "")


@dataclass(frozen=True)
class EnvoySource:
    targets: tuple[TargetConfig, ...] = ()
    target_files: tuple[str, ...] = ()
    kind: Literal["envoy"] = "envoy"


Source = EnvoySource | KumaSourceConfig | PrometheusSourceConfig


@dataclass(frozen=True)
class LimitsConfig:
    max_body_bytes: int = 1024 * 1024
    keepalive_timeout: float = 75.0
    # A client that sends its body slower than this gets 408 (slowloris).
    body_timeout: float = 30.0
    # Open HTTP connections at most (idle keep-alives included); more get 503.
    max_connections: int = 1024
    documents: Limits = field(default_factory=Limits)
    # A connection that sends nothing for this long after it opens is closed:
    # silent sockets held the connection cap's places for keepalive_timeout.
    first_byte_timeout: float = 5.0
    # /v1/check and /v1/admission requests a second per peer address from
    # callers no token or client certificate vouches for (0: no limit), with
    # bursts of up to unverified_burst; past it 429 and Retry-After.
    unverified_rate: float = 10.0
    unverified_burst: int = 50
    # Loopback callers are the host itself (a local pipeline, the CLI): not
    # limited unless this says so.
    rate_limit_loopback: bool = False


@dataclass(frozen=True)
class DestinationsConfig:
    # Envoy drops an idle ORIGINAL_DST host after ~5 s, so a shorter interval
    # sees more short-lived destinations (each read is one /clusters request).
    interval: float = 60.0
    # Seconds over which a pass's /clusters reads start; None = auto.
    spread: float | None = None


@dataclass(frozen=True)
class TLSConfig:
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None
    # Kubernetes secret mounts change files without inotify events that
    # survive the symlink swap: passguard compares digests on this period.
    reload_interval: float = 10.0


@dataclass(frozen=True)
class AuthConfig:
    tokens_file: Path | None = None
    tls: TLSConfig | None = None
    protect_metrics: bool = False
    insecure: bool = False

    @property
    def configured(self) -> bool:
        """Some authentication stands between the network and the gate."""
        return self.tokens_file is not None or (
            self.tls is not None and self.tls.client_ca_file is not None)


@dataclass(frozen=True)
class AuditConfig:
    retention: float = 90 * 86400.0
    # The oldest entries go once the audit database uses more than this.
    max_bytes: int = 256 * 1024**2


@dataclass(frozen=True)
class Config:
    listen: Listen = field(default_factory=lambda: Listen("127.0.0.1", 9110))
    scrape: ScrapeConfig = field(default_factory=ScrapeConfig)
    window: float = 900.0
    state_path: Path = Path("passguard-state.db")
    passthrough_clusters: str = DEFAULT_CLUSTERS_PATTERN
    outbound_port: int = 15001
    sources: tuple[Source, ...] = ()
    gate: GateConfig = field(default_factory=GateConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    destinations: DestinationsConfig = field(default_factory=DestinationsConfig)
    # `log.format`: text lines for people, or one JSON object a line.
    log_format: LogFormat = "text"
    # Where the file was read from: relative paths in it are resolved
    # against its folder, so `passguard run -c /etc/passguard/x.yaml`
    # does not depend on the working directory systemd happens to use.
    base_dir: Path = Path(".")

    @property
    def stale_after(self) -> float:
        """A target with no successful scrape for this long is stale (DESIGN: 3 intervals)."""
        return 3 * self.scrape.interval


def auth_rule_error(address: str, loopback: bool, auth: AuthConfig) -> str | None:
    """Why serving on ``address`` with ``auth`` is refused, or None. Checked
    against the file at load and against the sockets actually bound at start
    and reload: a reload cannot move a socket, so the file's address alone
    could let a reload drop the authentication of a public socket."""
    if loopback or auth.configured or auth.insecure:
        return None
    return (f"{address} is not a loopback address and no authentication is configured "
            "(auth.tokens_file or auth.tls.client_ca_file); bind 127.0.0.1, or set "
            "auth.insecure: true to expose the gate without authentication on purpose")
