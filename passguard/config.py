"""Configuration: load a YAML file into typed, immutable settings.

The keys, types, defaults and checks are declared once, in
``passguard.config_schema``; this module reads the file, validates it there
(every problem reported at once, each with its key path), resolves relative
paths against the file's folder and returns the frozen settings of
``passguard.config_types``, which it re-exports. Unknown keys are errors: a
misspelt key that is silently ignored is how a gate ends up running in a mode
nobody chose.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from passguard import config_schema as schema
from passguard.config_checks import parse_listen, userinfo_problem, validate_target_url
from passguard.config_errors import join, problems
from passguard.config_types import (
    AuditConfig,
    AuthConfig,
    Config,
    DestinationsConfig,
    EnvoySource,
    LimitsConfig,
    Listen,
    LogFormat,
    ScrapeConfig,
    Source,
    TargetConfig,
    TLSConfig,
    auth_rule_error,
)
from passguard.durations import format_duration, parse_duration
from passguard.errors import ConfigError, InputError
from passguard.loader import Limits, load_documents
from passguard.sources.settings import KumaSourceConfig, PrometheusSourceConfig
from passguard.verdicts import GateConfig

__all__ = [
    "FILE_LIMITS", "AuditConfig", "AuthConfig", "Config", "ConfigError", "DestinationsConfig",
    "EnvoySource", "GateConfig", "KumaSourceConfig", "LimitsConfig", "Listen", "LogFormat",
    "PrometheusSourceConfig", "ScrapeConfig", "Source", "TLSConfig", "TargetConfig",
    "auth_rule_error", "build", "format_duration", "json_schema", "load", "load_target_file",
    "parse_duration", "parse_listen", "restart_changes", "userinfo_problem",
    "validate_target_url",
]

# Operator-owned files may list a whole fleet; request bodies keep the tight
# default. Still bounded: an alias bomb in a target file is refused too.
FILE_LIMITS = Limits(max_documents=10_000, max_depth=64, max_nodes=5_000_000)
json_schema = schema.json_schema


def build(raw: Any, base_dir: Path = Path(".")) -> Config:
    """Validate a parsed YAML document into a Config, or raise ConfigError."""
    try:
        root = schema.Root.model_validate(raw)
    except ValidationError as exc:
        errors = problems(exc, schema.Root)
        errors += [f"{join('', path)}: {message}"
                   for path, message in schema.root_problems(_valid_sections(raw, exc))]
        raise ConfigError(errors) from None
    return _settings(root, base_dir)


def _valid_sections(raw: Any, exc: ValidationError) -> dict[str, Any]:
    """The top-level sections without an error, validated one by one, so the
    checks across sections still run for them in the same pass."""
    if not isinstance(raw, dict):
        return {}
    failed = {str(e["loc"][0]) if e["loc"] else "" for e in exc.errors()}
    out: dict[str, Any] = {}
    for name in schema.Root.model_fields:
        if name in failed:
            continue
        try:
            one = schema.Root.model_validate({name: raw[name]} if name in raw else {},
                                             context={"partial": True})
        except ValidationError:
            continue
        out[name] = getattr(one, name)
    return out


def _settings(root: schema.Root, base_dir: Path) -> Config:
    def path(p: str) -> Path:
        return Path(p) if Path(p).is_absolute() else base_dir / p

    def text(p: str | None) -> str | None:
        return None if p is None else str(path(p))

    sc, lm, au = root.scrape, root.limits, root.auth
    tls = None if au.tls is None else TLSConfig(
        path(au.tls.cert_file), path(au.tls.key_file),
        path(au.tls.client_ca_file) if au.tls.client_ca_file else None, au.tls.reload_interval)
    return Config(
        listen=root.listen,
        scrape=ScrapeConfig(interval=sc.interval, timeout=sc.timeout,
                            concurrency=sc.concurrency,
                            max_response_bytes=sc.max_response_bytes,
                            max_buffered_bytes=sc.max_buffered_bytes, spread=sc.spread,
                            worker=sc.worker),
        window=root.window,
        state_path=path(root.state.path),
        passthrough_clusters=root.passthrough.clusters,
        outbound_port=root.passthrough.outbound_port,
        sources=tuple(_source(s, path, text) for s in root.sources),
        gate=GateConfig(mode=root.gate.mode,  # type: ignore[arg-type]
                        on_insufficient_data=root.gate.on_insufficient_data,  # type: ignore[arg-type]
                        on_unproven=root.gate.on_unproven,  # type: ignore[arg-type]
                        meshes={name: o.model_dump(exclude_none=True)
                                for name, o in root.gate.meshes.items()}),
        limits=LimitsConfig(
            max_body_bytes=lm.max_body_bytes, keepalive_timeout=lm.keepalive_timeout,
            body_timeout=lm.body_timeout, max_connections=lm.max_connections,
            documents=Limits(max_documents=lm.max_documents, max_depth=lm.max_depth,
                             max_nodes=lm.max_nodes, max_scalar_bytes=lm.max_scalar_bytes,
                             max_matches=lm.max_matches),
            first_byte_timeout=lm.first_byte_timeout, unverified_rate=lm.unverified_rate,
            unverified_burst=lm.unverified_burst, rate_limit_loopback=lm.rate_limit_loopback),
        auth=AuthConfig(tokens_file=path(au.tokens_file) if au.tokens_file else None, tls=tls,
                        protect_metrics=au.protect_metrics, insecure=au.insecure),
        audit=AuditConfig(retention=root.audit.retention, max_bytes=root.audit.max_bytes),
        destinations=DestinationsConfig(interval=root.destinations.interval,
                                        spread=root.destinations.spread),
        log_format=root.log.format,
        base_dir=base_dir,
    )


def _source(src: Any, path: Any, text: Any) -> Source:
    if isinstance(src, schema.KumaSourceModel):
        return KumaSourceConfig(
            url=src.url.rstrip("/"), token_file=text(src.token_file), ca_file=text(src.ca_file),
            insecure_skip_verify=src.insecure_skip_verify, meshes=tuple(src.meshes) or ("*",),
            discovery_interval=src.discovery_interval, stats=src.stats, timeout=src.timeout,
            page_size=src.page_size, max_response_bytes=src.max_response_bytes,
            stale_after=src.stale_after, allowed_cidrs=src.allowed_cidrs)
    if isinstance(src, schema.PrometheusSourceModel):
        return src.settings(text)
    return EnvoySource(targets=tuple(TargetConfig(url=t.url, labels=t.labels)
                                     for t in src.targets),
                       target_files=tuple(str(path(f)) for f in src.target_files))


def restart_changes(old: Config, new: Config) -> list[str]:
    """The settings ``new`` changes that only a restart can apply, each as a
    message naming its key: a reload that changes one is refused, since
    accepting it would report a configuration that is not the one running."""
    problems: list[str] = []
    if new.listen != old.listen:
        problems.append(f"listen: changed from {old.listen} to {new.listen}; the socket is "
                        "bound at start: restart passguard to apply it")
    if new.state_path != old.state_path:
        problems.append(f"state.path: changed from {old.state_path} to {new.state_path}; "
                        "the database is opened at start: restart passguard to apply it")
    if (old.auth.tls is None) != (new.auth.tls is None):
        turned = "on" if new.auth.tls is not None else "off"
        problems.append(f"auth.tls: turning TLS {turned} changes how the socket is served: "
                        "restart passguard to apply it")
    return problems


def load(path: str | Path) -> Config:
    """Read and validate a config file; every problem is reported with its key path."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError([f"cannot read {p}: {exc.strerror or exc}"]) from None
    try:
        docs = load_documents(data, "application/yaml", FILE_LIMITS)
    except InputError as exc:
        raise ConfigError([f"{p}: {exc}"]) from None
    if len(docs) != 1:
        raise ConfigError([f"{p}: expected one YAML document, found {len(docs)}"])
    return build(docs[0], p.resolve().parent)


_TARGETS: TypeAdapter[list[schema.Target]] = TypeAdapter(list[schema.Target])


def load_target_file(path: Path) -> list[TargetConfig]:
    """A target file: a list of targets, or a mapping with a ``targets`` list."""
    try:
        docs = load_documents(path.read_bytes(), "application/yaml", FILE_LIMITS)
    except OSError as exc:
        raise ConfigError([f"cannot read {path}: {exc.strerror or exc}"]) from None
    except InputError as exc:
        raise ConfigError([f"{path}: {exc}"]) from None
    errors: list[str] = []
    targets: list[TargetConfig] = []
    for doc in docs:
        if isinstance(doc, dict) and set(doc) == {"targets"}:
            doc = doc["targets"]
        try:
            found = _TARGETS.validate_python(doc)
        except ValidationError as exc:
            errors += problems(exc, list[schema.Target], str(path))
            continue
        targets += [TargetConfig(url=t.url, labels=t.labels) for t in found]
    if errors:
        raise ConfigError(errors)
    return targets
