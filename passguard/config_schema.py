"""The config file's schema, declared once: every key, its type, default and check.

pydantic models mirror the YAML; ``passguard.config`` turns a validated
``Root`` into the frozen settings of ``passguard.config_types``, whose
dataclass defaults are the ones the models declare (read, never rewritten).
Unknown keys are errors (``extra="forbid"``); leaf values are checked by
``passguard.config_fields`` in passguard's words; checks across keys run in
the models' after-validators (across sections: :func:`root_problems`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from passguard.config_fields import (
    BOOL,
    LABEL_NAME,
    PATH,
    SPREAD,
    TEXT,
    Check,
    Problem,
    admin_url,
    api_url,
    choice,
    cidr_list,
    cluster_pattern,
    duration,
    header_set,
    label_set,
    listen_value,
    many,
    request_rate,
    size,
    whole,
)
from passguard.config_types import (
    AuditConfig,
    AuthConfig,
    Config,
    DestinationsConfig,
    LimitsConfig,
    Listen,
    ScrapeConfig,
    TLSConfig,
    auth_rule_error,
)
from passguard.durations import format_duration
from passguard.sources.settings import (
    KumaSourceConfig,
    PrometheusLabels,
    PrometheusSourceConfig,
    check_config,
)
from passguard.verdicts import FALLBACKS, MODES, UNPROVEN, GateConfig

_D = Config()
WORKERS = ("auto", "process", "inline")
_LIMITS = LimitsConfig()


# --------------------------------------------------------------------------- sections

class Section(BaseModel):
    """A mapping of known keys; a key left empty (``scrape:``) is the empty mapping."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_empty(cls, data: Any) -> Any:
        return {} if data is None else data


class Scrape(Section):
    interval: Annotated[float, duration(0.1)] = ScrapeConfig.interval
    timeout: Annotated[float, duration(0.01)] = ScrapeConfig.timeout
    concurrency: Annotated[int, whole(1, 100_000)] = ScrapeConfig.concurrency
    max_response_bytes: Annotated[int, size()] = ScrapeConfig.max_response_bytes
    max_buffered_bytes: Annotated[int, size()] = ScrapeConfig.max_buffered_bytes
    spread: Annotated[float | None, SPREAD] = ScrapeConfig.spread
    worker: Annotated[str, choice(WORKERS)] = ScrapeConfig.worker

    @model_validator(mode="after")
    def _fits(self) -> Scrape:
        bad: list[Problem] = []
        if self.max_buffered_bytes < self.max_response_bytes:
            bad.append((("max_buffered_bytes",),
                        f"({self.max_buffered_bytes} bytes) must be at least "
                        f"scrape.max_response_bytes ({self.max_response_bytes} bytes): "
                        "one answer of the largest size must fit"))
        every, timeout = format_duration(self.interval), format_duration(self.timeout)
        if self.timeout > self.interval:
            bad.append((("timeout",), f"({timeout}) must not exceed scrape.interval ({every})"))
        elif self.spread is not None and self.spread + self.timeout > self.interval:
            bad.append((("spread",), f"({format_duration(self.spread)}) plus scrape.timeout "
                                     f"({timeout}) must not exceed scrape.interval ({every}): "
                                     "a cycle would run into the next"))
        if bad:
            raise many(bad)
        return self


class State(Section):
    path: Annotated[str, PATH] = str(_D.state_path)


class Passthrough(Section):
    clusters: Annotated[str, Check(cluster_pattern, {"type": "string", "minLength": 1,
                                                "description": "RE2 regex of stat names"})] \
        = _D.passthrough_clusters
    outbound_port: Annotated[int, whole(1, 65535)] = _D.outbound_port


class Target(Section):
    url: Annotated[str, Check(admin_url, {
        "type": "string", "pattern": "^(https?|unix)://",
        "description": "http(s)://host:port[/base/path] or unix:///path/to/admin.sock"})]
    labels: Annotated[dict[str, str], Check(label_set, {
        "type": "object", "propertyNames": {"pattern": LABEL_NAME.pattern},
        "additionalProperties": {"type": ["string", "number"]}})] = Field(default_factory=dict)


class EnvoySourceModel(Section):
    kind: Literal["envoy"]
    targets: list[Target] = Field(default_factory=list)
    target_files: list[Annotated[str, PATH]] = Field(default_factory=list)


_K = KumaSourceConfig


class KumaSourceModel(Section):
    kind: Literal["kuma"]
    url: Annotated[str, api_url("put the token in token_file",
                                 "the Kuma API, e.g. https://kuma-control-plane:5682")]
    token_file: Annotated[str | None, PATH] = None
    ca_file: Annotated[str | None, PATH] = None
    insecure_skip_verify: Annotated[bool, BOOL] = _K.insecure_skip_verify
    meshes: list[Annotated[str, TEXT]] = Field(default_factory=lambda: list(_K.meshes))
    discovery_interval: Annotated[float, duration(1.0)] = _K.discovery_interval
    stats: Annotated[Literal["inspect", "kuma-dp"], choice(("inspect", "kuma-dp"))] = _K.stats
    timeout: Annotated[float, duration(0.1)] = _K.timeout
    page_size: Annotated[int, whole(1, 1000)] = _K.page_size
    max_response_bytes: Annotated[int, size()] = _K.max_response_bytes
    # Past it, the source's meshes are insufficient data (default: 3 passes).
    stale_after: Annotated[float | None, duration(1.0)] = _K.stale_after
    allowed_cidrs: Annotated[tuple[Any, ...] | None, Check(cidr_list, {
        "type": "array", "minItems": 1, "items": {"type": "string"}})] = None

    @model_validator(mode="after")
    def _consistent(self) -> KumaSourceModel:
        bad: list[Problem] = []
        if self.stale_after is not None and self.stale_after < self.discovery_interval:
            bad.append((("stale_after",), f"must be at least discovery_interval "
                                          f"({format_duration(self.discovery_interval)})"))
        if self.allowed_cidrs is not None and self.stats == "inspect":
            # Inspect mode reads the CP, never a dataplane's address: a setting
            # that would do nothing is refused rather than ignored.
            bad.append((("allowed_cidrs",), "applies to stats: kuma-dp only (the addresses "
                                            "of the dataplanes' metrics endpoints)"))
        if bad:
            raise many(bad)
        return self


class PrometheusLabelsModel(Section):
    mesh: Annotated[str, TEXT] = PrometheusLabels.mesh
    dataplane: Annotated[str, TEXT] = PrometheusLabels.dataplane
    service: Annotated[str, TEXT] = PrometheusLabels.service


_P = PrometheusSourceConfig


class PrometheusSourceModel(Section):
    kind: Literal["prometheus"]
    url: Annotated[str, api_url("use username and password_file, or token_file",
                                 "the Prometheus API")]
    labels: PrometheusLabelsModel = Field(default_factory=PrometheusLabelsModel)
    metrics: Annotated[Literal["envoy", "passguard"], choice(("envoy", "passguard"))] \
        = _P.metrics
    token_file: Annotated[str | None, PATH] = None
    username: Annotated[str | None, TEXT] = None
    password_file: Annotated[str | None, PATH] = None
    ca_file: Annotated[str | None, PATH] = None
    insecure_skip_verify: Annotated[bool, BOOL] = _P.insecure_skip_verify
    timeout: Annotated[float, duration(0.1)] = _P.timeout
    extra_selector: Annotated[str, TEXT] = _P.extra_selector
    scrape_interval: Annotated[float, duration(1.0)] = _P.scrape_interval
    headers: Annotated[tuple[tuple[str, str], ...], Check(header_set, {
        "type": "object", "additionalProperties": {"type": "string"}})] = ()
    forget_after: Annotated[float | None, duration(1.0)] = _P.forget_after
    max_response_bytes: Annotated[int, size()] = _P.max_response_bytes

    def settings(self, resolve: Callable[[str | None], str | None]) -> PrometheusSourceConfig:
        return PrometheusSourceConfig(
            url=self.url, labels=PrometheusLabels(**self.labels.model_dump()),
            metrics=self.metrics, token_file=resolve(self.token_file), username=self.username,
            password_file=resolve(self.password_file), ca_file=resolve(self.ca_file),
            insecure_skip_verify=self.insecure_skip_verify, timeout=self.timeout,
            extra_selector=self.extra_selector, scrape_interval=self.scrape_interval,
            headers=self.headers, forget_after=self.forget_after,
            max_response_bytes=self.max_response_bytes)

    @model_validator(mode="after")
    def _usable(self) -> PrometheusSourceModel:
        problems = check_config(self.settings(lambda p: p))
        if problems:
            raise many([((*key.split("."),), message) for key, message in problems])
        return self


SourceModel = Annotated[EnvoySourceModel | KumaSourceModel | PrometheusSourceModel,
                        Field(discriminator="kind")]


class MeshOverride(Section):
    mode: Annotated[str | None, choice(MODES)] = None
    on_insufficient_data: Annotated[str | None, choice(FALLBACKS)] = None
    on_unproven: Annotated[str | None, choice(UNPROVEN)] = None


_G = GateConfig


class Gate(Section):
    mode: Annotated[str, choice(MODES)] = _G.mode
    on_insufficient_data: Annotated[str, choice(FALLBACKS)] = _G.on_insufficient_data
    on_unproven: Annotated[str, choice(UNPROVEN)] = _G.on_unproven
    meshes: dict[Annotated[str, TEXT], MeshOverride] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _null_meshes(cls, data: Any) -> Any:
        if isinstance(data, dict) and "meshes" in data and data["meshes"] is None:
            return {k: v for k, v in data.items() if k != "meshes"}
        return data


_DOCS = _LIMITS.documents


class Limits(Section):
    max_body_bytes: Annotated[int, size()] = _LIMITS.max_body_bytes
    max_documents: Annotated[int, whole(1, 1_000_000)] = _DOCS.max_documents
    max_depth: Annotated[int, whole(4, 10_000)] = _DOCS.max_depth
    max_nodes: Annotated[int, whole(100, 100_000_000)] = _DOCS.max_nodes
    max_scalar_bytes: Annotated[int, size()] = _DOCS.max_scalar_bytes
    max_matches: Annotated[int, whole(1, 100_000)] = _DOCS.max_matches
    keepalive_timeout: Annotated[float, duration(1.0)] = _LIMITS.keepalive_timeout
    body_timeout: Annotated[float, duration(0.1)] = _LIMITS.body_timeout
    max_connections: Annotated[int, whole(4, 1_000_000)] = _LIMITS.max_connections
    first_byte_timeout: Annotated[float, duration(0.1)] = _LIMITS.first_byte_timeout
    unverified_rate: Annotated[float, Check(request_rate, {"type": "number", "minimum": 0,
                                                      "maximum": 1_000_000})] \
        = _LIMITS.unverified_rate
    unverified_burst: Annotated[int, whole(1, 1_000_000)] = _LIMITS.unverified_burst
    rate_limit_loopback: Annotated[bool, BOOL] = _LIMITS.rate_limit_loopback


class TLS(Section):
    cert_file: Annotated[str, PATH]
    key_file: Annotated[str, PATH]
    client_ca_file: Annotated[str | None, PATH] = None
    reload_interval: Annotated[float, duration(1.0)] = TLSConfig.reload_interval


class Auth(Section):
    tokens_file: Annotated[str | None, PATH] = None
    tls: TLS | None = None
    protect_metrics: Annotated[bool, BOOL] = AuthConfig.protect_metrics
    insecure: Annotated[bool, BOOL] = AuthConfig.insecure


class Audit(Section):
    retention: Annotated[float, duration(3600.0)] = AuditConfig.retention
    max_bytes: Annotated[int, size(1024**2)] = AuditConfig.max_bytes


class Destinations(Section):
    interval: Annotated[float, duration(1.0)] = DestinationsConfig.interval
    spread: Annotated[float | None, SPREAD] = DestinationsConfig.spread


class Log(Section):
    format: Annotated[Literal["text", "json"], choice(("text", "json"))] = _D.log_format


class Root(Section):
    """passguard's configuration file (config/passguard.example.yaml documents every key)."""

    model_config = ConfigDict(title="passguard configuration")

    listen: Annotated[Listen, Check(listen_value, {
        "type": "string", "description": "host:port, [::1]:port or :port (all addresses)"},
        str)] = _D.listen
    scrape: Scrape = Field(default_factory=Scrape)
    window: Annotated[float, duration(1.0)] = _D.window
    state: State = Field(default_factory=State)
    passthrough: Passthrough = Field(default_factory=Passthrough)
    sources: list[SourceModel] = Field(default_factory=list)
    gate: Gate = Field(default_factory=Gate)
    limits: Limits = Field(default_factory=Limits)
    auth: Auth = Field(default_factory=Auth)
    audit: Audit = Field(default_factory=Audit)
    destinations: Destinations = Field(default_factory=Destinations)
    log: Log = Field(default_factory=Log)

    @model_validator(mode="after")
    def _whole_file(self, info: Any) -> Root:
        if info.context and info.context.get("partial"):
            return self
        if bad := root_problems({name: getattr(self, name) for name in type(self).model_fields}):
            raise many(bad)
        return self


def _auth_settings(auth: Auth) -> AuthConfig:
    tls = None if auth.tls is None else TLSConfig(
        Path(auth.tls.cert_file), Path(auth.tls.key_file),
        Path(auth.tls.client_ca_file) if auth.tls.client_ca_file else None)
    return AuthConfig(tokens_file=Path(auth.tokens_file) if auth.tokens_file else None, tls=tls,
                      insecure=auth.insecure)


def root_problems(sections: Mapping[str, Any]) -> list[Problem]:
    """The checks across sections, each run when the sections it reads are valid
    (``sections`` holds the valid ones), so one pass reports them all."""
    bad: list[Problem] = []
    scrape: Scrape | None = sections.get("scrape")
    window: float | None = sections.get("window")
    if scrape is not None and window is not None and window < 2 * scrape.interval:
        bad.append((("window",), f"({format_duration(window)}) must span at least two scrape "
                                 f"intervals ({format_duration(2 * scrape.interval)})"))
    listen: Listen | None = sections.get("listen")
    auth: Auth | None = sections.get("auth")
    if listen is not None and auth is not None and (problem := auth_rule_error(
            str(listen), listen.is_loopback, _auth_settings(auth))) is not None:
        bad.append((("listen",), problem))
    dests: Destinations | None = sections.get("destinations")
    if scrape is not None and dests is not None and dests.spread is not None \
            and dests.spread + scrape.timeout > dests.interval:
        bad.append((("destinations", "spread"),
                    f"({format_duration(dests.spread)}) plus scrape.timeout "
                    f"({format_duration(scrape.timeout)}) must not exceed "
                    f"destinations.interval ({format_duration(dests.interval)})"))
    sources: list[Any] | None = sections.get("sources")
    seen: dict[tuple[str, str], str] = {}
    for src in sources or ():
        for t in getattr(src, "targets", ()):
            mesh, dp = t.labels.get("mesh", "default"), t.labels.get("dataplane") or t.url
            if (mesh, dp) in seen:
                bad.append((("sources",), f"dataplane {dp!r} of mesh {mesh!r} is listed twice "
                                          f"({seen[mesh, dp]} and {t.url}); give each a "
                                          "distinct labels.dataplane"))
            seen[mesh, dp] = t.url
    return bad


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the config file, for editors."""
    # Serialization mode: defaults are written as the file spells them ("15s",
    # not 15.0); no key becomes required (json_schema_serialization_defaults_required
    # is off), and every leaf declares its own input schema either way.
    schema = Root.model_json_schema(mode="serialization")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
