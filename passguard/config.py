"""Configuration: load a YAML file into typed, immutable settings.

Validation collects every problem with its key path (``sources[0].targets[2].url:
…``) instead of stopping at the first, so an operator fixes a file in one pass.
Unknown keys are errors: a misspelt key that is silently ignored is how a gate
ends up running in a mode nobody chose.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from passguard.durations import excerpt as _excerpt
from passguard.durations import format_duration, parse_duration
from passguard.envoy.names import DEFAULT_CLUSTERS_PATTERN, stats_filter
from passguard.errors import ConfigError, InputError
from passguard.loader import Limits, load_documents
from passguard.sources.settings import (
    KumaSourceConfig,
    Network,
    PrometheusLabels,
    PrometheusSourceConfig,
    check_config,
)
from passguard.verdicts import (
    FALLBACKS,
    MODES,
    UNPROVEN,
    GateConfig,
)

# Bounded digit runs: no duration needs more, and longer ones overflow floats.
_SIZE = re.compile(r"^\s*(\d{1,12})\s*(B|KiB|MiB|GiB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
# A label value ends up as a Prometheus label and in decision text.
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


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
class LogConfig:
    # text | json (passguard.logqueue.JsonFormatter); `--log-format` overrides it.
    format: str = "text"


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
    log: LogConfig = field(default_factory=LogConfig)
    # Where the file was read from: relative paths in it are resolved
    # against its folder, so `passguard run -c /etc/passguard/x.yaml`
    # does not depend on the working directory systemd happens to use.
    base_dir: Path = Path(".")

    @property
    def stale_after(self) -> float:
        """A target with no successful scrape for this long is stale (DESIGN: 3 intervals)."""
        return 3 * self.scrape.interval


class _Errors:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(f"{path}: {message}" if path else message)


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


class _Reader:
    """Small helpers that check one value and record an error under its path."""

    def __init__(self, errors: _Errors) -> None:
        self.errors = errors

    def mapping(self, value: Any, path: str, allowed: set[str]) -> dict[str, Any] | None:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.errors.add(path, f"must be a mapping, got {_type_name(value)}")
            return None
        for key in value:
            if not isinstance(key, str) or key not in allowed:
                known = ", ".join(sorted(allowed))
                self.errors.add(_join(path, str(key)), f"unknown key (known keys: {known})")
        return value

    def string(self, value: Any, path: str) -> str | None:
        if not isinstance(value, str) or not value:
            self.errors.add(path, f"must be a non-empty string, got {_type_name(value)}")
            return None
        return value

    def duration(self, value: Any, path: str, minimum: float = 0.001) -> float | None:
        if not isinstance(value, str):
            self.errors.add(path, f"must be a duration string like '15s', got {_type_name(value)}")
            return None
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            self.errors.add(path, str(exc))
            return None
        if seconds < minimum:
            self.errors.add(path, f"must be at least {format_duration(minimum)}")
            return None
        return seconds

    def spread(self, value: Any, path: str) -> float | None:
        """``auto`` (None) or a duration, ``0s`` included (all at once)."""
        if value == "auto":
            return None
        if not isinstance(value, str):
            self.errors.add(path, f"must be 'auto' or a duration like '5s', got "
                                  f"{_type_name(value)}")
            return None
        return self.duration(value, path, 0.0)

    def integer(self, value: Any, path: str, minimum: int, maximum: int) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int):
            self.errors.add(path, f"must be a whole number, got {_type_name(value)}")
            return None
        if not minimum <= value <= maximum:
            self.errors.add(path, f"must be between {minimum} and {maximum}, got {value}")
            return None
        return value

    def size(self, value: Any, path: str) -> int | None:
        if isinstance(value, int) and not isinstance(value, bool):
            return self.integer(value, path, 1, 1024**3)
        if isinstance(value, str) and (m := _SIZE.match(value)):
            return self.integer(int(m.group(1)) * _SIZE_UNITS[m.group(2)], path, 1, 1024**4)
        self.errors.add(path, f"must be a size like 1048576 or '1MiB', got {_excerpt(value)}")
        return None

    def choice(self, value: Any, path: str, choices: tuple[str, ...]) -> str | None:
        if value not in choices:
            self.errors.add(path, f"must be one of {', '.join(choices)}, got {_excerpt(value)}")
            return None
        return str(value)

    def boolean(self, value: Any, path: str) -> bool | None:
        if not isinstance(value, bool):
            self.errors.add(path, f"must be true or false, got {_type_name(value)}")
            return None
        return value

    def string_list(self, value: Any, path: str) -> list[str]:
        if not isinstance(value, list):
            self.errors.add(path, f"must be a list of strings, got {_type_name(value)}")
            return []
        out = []
        for i, item in enumerate(value):
            s = self.string(item, f"{path}[{i}]")
            if s is not None:
                out.append(s)
        return out


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def parse_listen(value: str) -> Listen:
    """``127.0.0.1:9110``, ``[::1]:9110`` or ``:9110`` (all addresses)."""
    m = re.match(r"^\[([0-9a-fA-F:.]+)\]:(\d+)$", value) or re.match(r"^([^:\[\]]*):(\d+)$", value)
    if not m:
        raise ValueError(f"{value!r} is not host:port (IPv6 as [::1]:9110)")
    host, port = m.group(1) or "0.0.0.0", int(m.group(2))  # noqa: S104 - ":9110" means all
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range")
    return Listen(host, port)


_RE2_UNSUPPORTED = (("(?<=", "a lookbehind"), ("(?<!", "a lookbehind"),
                    ("(?=", "a lookahead"), ("(?!", "a lookahead"), ("(?>", "an atomic group"),
                    ("(?(", "a conditional group"), ("(?P=", "a backreference"))


def _not_re2(pattern: str) -> str | None:
    """The first construct Python's ``re`` accepts and RE2 does not, or None.
    Escapes and character classes are skipped, where these are literals."""
    i, in_class = 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            if not in_class and pattern[i + 1:i + 2] in tuple("123456789"):
                return "a backreference"
            i += 2
            continue
        if in_class:
            # `]` right after `[` or `[^` is a literal, not the end.
            if c == "]" and pattern[i - 1] != "[" and pattern[i - 2:i] != "[^":
                in_class = False
        elif c == "[":
            in_class = True
        else:
            for token, name in _RE2_UNSUPPORTED:
                if pattern.startswith(token, i):
                    return name
            quantifier = c in "*+}" or (c == "?" and pattern[i - 1:i] != "(")
            if quantifier and pattern[i + 1:i + 2] == "+":
                return "a possessive quantifier"
        i += 1
    return None


def _check_clusters_pattern(pattern: str) -> str | None:
    """The pattern is embedded in every parser and in Envoy's filter: build
    them all now, so a pattern that breaks one is refused here with the reason
    instead of stopping the daemon at start."""
    from passguard.envoy.clusters import ClustersParser
    from passguard.envoy.promtext import PromStatsParser
    from passguard.envoy.stats import StatsParser

    try:
        re.compile(pattern)
    except (re.error, OverflowError, RecursionError, ValueError) as exc:
        return f"invalid regular expression: {exc}"
    if "(?P<" in pattern or re.search(r"\(\?[aiLmsux]+\)", pattern):
        return ("must not use named groups or global inline flags (it is embedded in larger "
                "expressions); use (?:...) groups")
    if (construct := _not_re2(pattern)) is not None:
        return (f"uses {construct}, which Envoy's regular expressions (RE2) do not support: "
                "Envoy would refuse the /stats filter and every scrape would fail")
    try:
        StatsParser(pattern)
        PromStatsParser(pattern)
        ClustersParser(pattern)
        re.compile(stats_filter(pattern))
    except (re.error, OverflowError, RecursionError, ValueError) as exc:
        return f"cannot be embedded in passguard's parsers: {exc}"
    return None


def userinfo_problem(url: str, hint: str) -> str | None:
    """Why a URL with user information (``http://user:pass@host``) is refused,
    or None. A URL is not a secret: it is a label in /metrics and a word in
    log lines and errors, so a password in it would be published. The
    message does not repeat the URL, for the same reason."""
    try:
        netloc = urlsplit(url).netloc
    except ValueError:
        netloc = url.split("//", 1)[-1].split("/", 1)[0]
    if "@" not in netloc:
        return None
    return (f"must not carry user information (user:password@ before the host): URLs are "
            f"shown in /metrics labels and in logs; {hint}")


def validate_target_url(url: str) -> str | None:
    """Return why a target URL is unusable, or None when it is fine."""
    if problem := userinfo_problem(url, "Envoy's admin takes no credentials"):
        return problem
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. "http://[::1" (an unclosed IPv6 literal)
        return f"{url!r} is not a URL: {exc}"
    if parts.scheme in ("http", "https"):
        if not parts.hostname:
            return f"{url!r} has no host"
        try:
            _ = parts.port
        except ValueError:
            return f"{url!r} has an invalid port"
        if parts.query or parts.fragment:
            return f"{url!r} must not carry a query or fragment"
        return None
    if parts.scheme == "unix":
        if not parts.path.startswith("/"):
            return f"{url!r} must name an absolute socket path (unix:///run/kuma/admin.sock)"
        return None
    return f"{url!r} must start with http://, https:// or unix://"


def parse_targets(value: Any, path: str, errors: _Errors) -> list[TargetConfig]:
    """A list of ``{url, labels}``; shared by inline targets and target files."""
    r = _Reader(errors)
    if not isinstance(value, list):
        errors.add(path, f"must be a list of targets, got {_type_name(value)}")
        return []
    out: list[TargetConfig] = []
    for i, item in enumerate(value):
        ipath = f"{path}[{i}]"
        m = r.mapping(item, ipath, {"url", "labels"})
        if m is None:
            continue
        url = r.string(m.get("url"), _join(ipath, "url"))
        if url is not None and (problem := validate_target_url(url)):
            errors.add(_join(ipath, "url"), problem)
            url = None
        labels_raw = m.get("labels", {})
        labels: dict[str, str] = {}
        if not isinstance(labels_raw, dict):
            errors.add(_join(ipath, "labels"), f"must be a mapping, got {_type_name(labels_raw)}")
        else:
            for k, v in labels_raw.items():
                lpath = _join(_join(ipath, "labels"), str(k))
                if not isinstance(k, str) or not _LABEL_NAME.match(k):
                    errors.add(lpath, "label names are letters, digits and _ (Prometheus rules)")
                elif not isinstance(v, str | int | float) or isinstance(v, bool):
                    errors.add(lpath, f"must be a string, got {_type_name(v)}")
                else:
                    labels[k] = str(v)
        if url is not None:
            out.append(TargetConfig(url=url.rstrip("/"), labels=labels))
    return out


def _check_unique(targets: list[TargetConfig], path: str, errors: _Errors) -> None:
    seen: dict[tuple[str, str], str] = {}
    for t in targets:
        key = (t.mesh, t.dataplane)
        if key in seen:
            errors.add(path, f"dataplane {t.dataplane!r} of mesh {t.mesh!r} is listed twice "
                             f"({seen[key]} and {t.url}); give each a distinct labels.dataplane")
        seen[key] = t.url


def build(raw: Any, base_dir: Path = Path(".")) -> Config:
    """Validate a parsed YAML document into a Config, or raise ConfigError."""
    errors = _Errors()
    r = _Reader(errors)
    top = r.mapping(raw, "", {"listen", "scrape", "window", "state", "passthrough", "sources",
                              "gate", "limits", "auth", "audit", "destinations", "log"})
    if top is None:
        raise ConfigError(errors.items)
    defaults = Config()

    listen = defaults.listen
    if "listen" in top and (s := r.string(top["listen"], "listen")) is not None:
        try:
            listen = parse_listen(s)
        except ValueError as exc:
            errors.add("listen", str(exc))

    scrape = defaults.scrape
    sc = r.mapping(top.get("scrape"), "scrape",
                   {"interval", "timeout", "concurrency", "max_response_bytes",
                    "max_buffered_bytes", "spread"})
    if sc is not None:
        interval = r.duration(sc["interval"], "scrape.interval", 0.1) if "interval" in sc else None
        timeout = r.duration(sc["timeout"], "scrape.timeout", 0.01) if "timeout" in sc else None
        conc = r.integer(sc["concurrency"], "scrape.concurrency", 1, 100_000) \
            if "concurrency" in sc else None
        maxb = r.size(sc["max_response_bytes"], "scrape.max_response_bytes") \
            if "max_response_bytes" in sc else None
        buffered = r.size(sc["max_buffered_bytes"], "scrape.max_buffered_bytes") \
            if "max_buffered_bytes" in sc else None
        spread = r.spread(sc["spread"], "scrape.spread") if "spread" in sc else None
        scrape = ScrapeConfig(
            interval=interval or scrape.interval,
            timeout=timeout or scrape.timeout,
            concurrency=conc or scrape.concurrency,
            max_response_bytes=maxb or scrape.max_response_bytes,
            max_buffered_bytes=buffered or scrape.max_buffered_bytes,
            spread=spread,
        )
        if scrape.max_buffered_bytes < scrape.max_response_bytes:
            errors.add("scrape.max_buffered_bytes",
                       f"({scrape.max_buffered_bytes} bytes) must be at least "
                       f"scrape.max_response_bytes ({scrape.max_response_bytes} bytes): "
                       "one answer of the largest size must fit")
        if scrape.timeout > scrape.interval:
            errors.add("scrape.timeout", f"({format_duration(scrape.timeout)}) must not exceed "
                                         f"scrape.interval ({format_duration(scrape.interval)})")
        elif spread is not None and spread + scrape.timeout > scrape.interval:
            errors.add("scrape.spread", f"({format_duration(spread)}) plus scrape.timeout "
                                        f"({format_duration(scrape.timeout)}) must not exceed "
                                        f"scrape.interval ({format_duration(scrape.interval)}): "
                                        "a cycle would run into the next")

    window = defaults.window
    if "window" in top and (w := r.duration(top["window"], "window", 1.0)) is not None:
        window = w
        if window < 2 * scrape.interval:
            errors.add("window", f"({format_duration(window)}) must span at least two scrape "
                                 f"intervals ({format_duration(2 * scrape.interval)})")

    state_path = defaults.state_path
    st = r.mapping(top.get("state"), "state", {"path"})
    if st is not None and "path" in st and (p := r.string(st["path"], "state.path")):
        state_path = Path(p)
    if not state_path.is_absolute():
        state_path = base_dir / state_path

    clusters = defaults.passthrough_clusters
    outbound_port = defaults.outbound_port
    pt = r.mapping(top.get("passthrough"), "passthrough", {"clusters", "outbound_port"})
    if pt is not None and "outbound_port" in pt and (
            op := r.integer(pt["outbound_port"], "passthrough.outbound_port", 1, 65535)):
        outbound_port = op
    if pt is not None and "clusters" in pt:
        c = r.string(pt["clusters"], "passthrough.clusters")
        if c is not None:
            if (problem := _check_clusters_pattern(c)) is None:
                clusters = c
            else:
                errors.add("passthrough.clusters", problem)

    sources: list[Source] = []
    if "sources" in top:
        raw_sources = top["sources"]
        if not isinstance(raw_sources, list):
            errors.add("sources", f"must be a list, got {_type_name(raw_sources)}")
        else:
            all_targets: list[TargetConfig] = []
            for i, src in enumerate(raw_sources):
                spath = f"sources[{i}]"
                if not isinstance(src, dict):
                    errors.add(spath, f"must be a mapping, got {_type_name(src)}")
                    continue
                kind = src.get("kind")
                if kind == "kuma":
                    if (ks := _kuma_source(src, spath, base_dir, r)) is not None:
                        sources.append(ks)
                    continue
                if kind == "prometheus":
                    if (ps := _prometheus_source(src, spath, base_dir, r)) is not None:
                        sources.append(ps)
                    continue
                if kind != "envoy":
                    errors.add(f"{spath}.kind",
                               f"must be 'envoy', 'kuma' or 'prometheus', got {kind!r}")
                    continue
                m = r.mapping(src, spath, {"kind", "targets", "target_files"})
                if m is None:
                    continue
                targets = parse_targets(m.get("targets", []), f"{spath}.targets", errors)
                files = r.string_list(m.get("target_files", []), f"{spath}.target_files")
                files = [f if Path(f).is_absolute() else str(base_dir / f) for f in files]
                all_targets.extend(targets)
                sources.append(EnvoySource(targets=tuple(targets), target_files=tuple(files)))
            _check_unique(all_targets, "sources", errors)

    gate = defaults.gate
    g = r.mapping(top.get("gate"), "gate", {"mode", "on_insufficient_data", "meshes",
                                            "on_unproven"})
    if g is not None:
        mode = r.choice(g.get("mode", gate.mode), "gate.mode", MODES)
        fb = r.choice(g.get("on_insufficient_data", gate.on_insufficient_data),
                      "gate.on_insufficient_data", FALLBACKS)
        unproven = r.choice(g.get("on_unproven", gate.on_unproven), "gate.on_unproven",
                            UNPROVEN)
        meshes: dict[str, dict[str, str]] = {}
        raw_meshes = g.get("meshes")
        gm = r.mapping(raw_meshes, "gate.meshes",
                       {str(k) for k in raw_meshes} if isinstance(raw_meshes, dict) else set())
        for name, ov in (gm or {}).items():
            opath = f"gate.meshes.{name}"
            o = r.mapping(ov, opath, {"mode", "on_insufficient_data", "on_unproven"})
            if o is None:
                continue
            entry: dict[str, str] = {}
            if "mode" in o and (v := r.choice(o["mode"], f"{opath}.mode", MODES)):
                entry["mode"] = v
            if "on_insufficient_data" in o and (v := r.choice(
                    o["on_insufficient_data"], f"{opath}.on_insufficient_data", FALLBACKS)):
                entry["on_insufficient_data"] = v
            if "on_unproven" in o and (v := r.choice(
                    o["on_unproven"], f"{opath}.on_unproven", UNPROVEN)):
                entry["on_unproven"] = v
            meshes[str(name)] = entry
        gate = GateConfig(mode=mode or "enforce",  # type: ignore[arg-type]
                          on_insufficient_data=fb or "deny",  # type: ignore[arg-type]
                          meshes=meshes,
                          on_unproven=unproven or "deny")  # type: ignore[arg-type]

    limits = defaults.limits
    lm = r.mapping(top.get("limits"), "limits",
                   {"max_body_bytes", "max_documents", "max_depth", "keepalive_timeout",
                    "body_timeout", "max_nodes", "max_scalar_bytes", "max_connections",
                    "max_matches", "first_byte_timeout", "unverified_rate",
                    "unverified_burst", "rate_limit_loopback"})
    if lm is not None and lm:
        body = r.size(lm["max_body_bytes"], "limits.max_body_bytes") \
            if "max_body_bytes" in lm else None
        docs = r.integer(lm["max_documents"], "limits.max_documents", 1, 1_000_000) \
            if "max_documents" in lm else None
        depth = r.integer(lm["max_depth"], "limits.max_depth", 4, 10_000) \
            if "max_depth" in lm else None
        keepalive = r.duration(lm["keepalive_timeout"], "limits.keepalive_timeout", 1.0) \
            if "keepalive_timeout" in lm else None
        body_timeout = r.duration(lm["body_timeout"], "limits.body_timeout", 0.1) \
            if "body_timeout" in lm else None
        nodes = r.integer(lm["max_nodes"], "limits.max_nodes", 100, 100_000_000) \
            if "max_nodes" in lm else None
        scalar = r.size(lm["max_scalar_bytes"], "limits.max_scalar_bytes") \
            if "max_scalar_bytes" in lm else None
        conns = r.integer(lm["max_connections"], "limits.max_connections", 4, 1_000_000) \
            if "max_connections" in lm else None
        matches = r.integer(lm["max_matches"], "limits.max_matches", 1, 100_000) \
            if "max_matches" in lm else None
        dl = limits.documents
        limits = LimitsConfig(
            max_body_bytes=body or limits.max_body_bytes,
            keepalive_timeout=keepalive or limits.keepalive_timeout,
            body_timeout=body_timeout or limits.body_timeout,
            max_connections=conns or limits.max_connections,
            documents=Limits(max_documents=docs or dl.max_documents,
                             max_depth=depth or dl.max_depth,
                             max_nodes=nodes or dl.max_nodes,
                             max_scalar_bytes=scalar or dl.max_scalar_bytes,
                             max_matches=matches or dl.max_matches),
            **_caller_limits(lm, r),
        )

    auth = _auth(top.get("auth"), base_dir, r)
    if (problem := auth_rule_error(str(listen), listen.is_loopback, auth)) is not None:
        errors.add("listen", problem)

    audit = defaults.audit
    ad = r.mapping(top.get("audit"), "audit", {"retention", "max_bytes"})
    if ad is not None and "retention" in ad and (
            ret := r.duration(ad["retention"], "audit.retention", 3600.0)) is not None:
        audit = replace(audit, retention=ret)
    if ad is not None and "max_bytes" in ad and (
            mb := r.size(ad["max_bytes"], "audit.max_bytes")) is not None:
        if mb < 1024**2:
            errors.add("audit.max_bytes", f"must be at least 1MiB, got {mb} bytes")
        else:
            audit = replace(audit, max_bytes=mb)

    dests = defaults.destinations
    dc = r.mapping(top.get("destinations"), "destinations", {"interval", "spread"})
    if dc is not None:
        di = r.duration(dc["interval"], "destinations.interval", 1.0) \
            if "interval" in dc else None
        dspread = r.spread(dc["spread"], "destinations.spread") if "spread" in dc else None
        dests = DestinationsConfig(interval=di or dests.interval, spread=dspread)
        if dspread is not None and dspread + scrape.timeout > dests.interval:
            errors.add("destinations.spread",
                       f"({format_duration(dspread)}) plus scrape.timeout "
                       f"({format_duration(scrape.timeout)}) must not exceed "
                       f"destinations.interval ({format_duration(dests.interval)})")

    log_cfg = defaults.log
    lc = r.mapping(top.get("log"), "log", {"format"})
    if lc is not None and "format" in lc and (
            lf := r.string(lc["format"], "log.format")) is not None:
        if lf not in ("text", "json"):
            errors.add("log.format", f"must be text or json, got {lf!r}")
        else:
            log_cfg = LogConfig(format=lf)

    if errors.items:
        raise ConfigError(errors.items)
    return Config(listen=listen, scrape=scrape, window=window, state_path=state_path,
                  passthrough_clusters=clusters, outbound_port=outbound_port,
                  sources=tuple(sources), gate=gate,
                  limits=limits, auth=auth, audit=audit, destinations=dests,
                  log=log_cfg, base_dir=base_dir)


def _is_api_url(url: str) -> bool:
    """``http(s)://host[:port][/prefix]``, no query: the base of an HTTP API."""
    try:
        parts = urlsplit(url)
        return parts.scheme in ("http", "https") and bool(parts.hostname) and not parts.query
    except ValueError:  # e.g. an unclosed IPv6 literal
        return False


def _kuma_source(src: dict[str, Any], spath: str, base_dir: Path,
                 r: _Reader) -> KumaSourceConfig | None:
    m = r.mapping(src, spath, {"kind", "url", "token_file", "ca_file", "insecure_skip_verify",
                               "meshes", "discovery_interval", "stats", "timeout", "page_size",
                               "max_response_bytes", "stale_after", "allowed_cidrs"})
    if m is None:
        return None
    before = len(r.errors.items)
    url = r.string(m.get("url"), f"{spath}.url")
    if url is not None and (problem := userinfo_problem(url, "put the token in token_file")):
        r.errors.add(f"{spath}.url", problem)
    elif url is not None and not _is_api_url(url):
        r.errors.add(f"{spath}.url", f"{_excerpt(url)} must be http(s)://host[:port][/prefix] "
                                     "(the Kuma API, e.g. https://kuma-control-plane:5682)")
    token = _path(m["token_file"], f"{spath}.token_file", base_dir, r) \
        if "token_file" in m else None
    ca = _path(m["ca_file"], f"{spath}.ca_file", base_dir, r) if "ca_file" in m else None
    insecure = r.boolean(m["insecure_skip_verify"], f"{spath}.insecure_skip_verify") \
        if "insecure_skip_verify" in m else False
    meshes = tuple(r.string_list(m["meshes"], f"{spath}.meshes")) if "meshes" in m else ("*",)
    interval = r.duration(m["discovery_interval"], f"{spath}.discovery_interval", 1.0) \
        if "discovery_interval" in m else 30.0
    stats = r.choice(m.get("stats", "inspect"), f"{spath}.stats", ("inspect", "kuma-dp"))
    timeout = r.duration(m["timeout"], f"{spath}.timeout", 0.1) if "timeout" in m else 10.0
    page = r.integer(m["page_size"], f"{spath}.page_size", 1, 1000) if "page_size" in m else 100
    page_bytes = r.size(m["max_response_bytes"], f"{spath}.max_response_bytes") \
        if "max_response_bytes" in m else None
    # Past it, the source's meshes are insufficient data (default: 3 passes).
    stale = r.duration(m["stale_after"], f"{spath}.stale_after", 1.0) \
        if "stale_after" in m else None
    if stale is not None and stale < (interval or 30.0):
        r.errors.add(f"{spath}.stale_after", f"must be at least discovery_interval "
                                             f"({format_duration(interval or 30.0)})")
    cidrs = _cidrs(m["allowed_cidrs"], f"{spath}.allowed_cidrs", r) \
        if "allowed_cidrs" in m else None
    if cidrs is not None and stats == "inspect":
        # Inspect mode reads the CP, never a dataplane's address: a setting
        # that would do nothing is refused rather than ignored.
        r.errors.add(f"{spath}.allowed_cidrs", "applies to stats: kuma-dp only (the addresses "
                                               "of the dataplanes' metrics endpoints)")
    if len(r.errors.items) != before or url is None:
        return None
    return KumaSourceConfig(url=url.rstrip("/"), token_file=str(token) if token else None,
                            ca_file=str(ca) if ca else None, insecure_skip_verify=bool(insecure),
                            meshes=meshes or ("*",), discovery_interval=interval or 30.0,
                            stats=stats or "inspect",  # type: ignore[arg-type]
                            timeout=timeout or 10.0, page_size=page or 100,
                            max_response_bytes=page_bytes or KumaSourceConfig.max_response_bytes,
                            stale_after=stale, allowed_cidrs=cidrs)


def _cidrs(value: Any, path: str, r: _Reader) -> tuple[Network, ...] | None:
    """``allowed_cidrs``: a non-empty list of networks (``10.0.0.0/8``, ``fd00::/8``)."""
    if not isinstance(value, list) or not value:
        r.errors.add(path, f"must be a non-empty list of CIDRs like '10.0.0.0/8' (leave it out "
                           f"to allow any IP address), got {_type_name(value)}")
        return None
    out: list[Network] = []
    for i, item in enumerate(value):
        ipath = f"{path}[{i}]"
        if not isinstance(item, str):
            r.errors.add(ipath, f"must be a CIDR string like '10.0.0.0/8', got "
                                f"{_type_name(item)}")
            continue
        try:
            out.append(ipaddress.ip_network(item.strip(), strict=True))
        except ValueError as exc:
            r.errors.add(ipath, f"{_excerpt(item)} is not a CIDR: {exc}")
    return tuple(out) if len(out) == len(value) else None


def _prometheus_source(src: dict[str, Any], spath: str, base_dir: Path,
                       r: _Reader) -> PrometheusSourceConfig | None:
    m = r.mapping(src, spath, {"kind", "url", "labels", "metrics", "token_file", "username",
                               "password_file", "ca_file", "insecure_skip_verify", "timeout",
                               "extra_selector", "scrape_interval", "headers", "forget_after",
                               "max_response_bytes"})
    if m is None:
        return None
    before = len(r.errors.items)
    url = r.string(m.get("url"), f"{spath}.url")
    if url is not None and (problem := userinfo_problem(
            url, "use username and password_file, or token_file")):
        r.errors.add(f"{spath}.url", problem)
    elif url is not None and not _is_api_url(url):
        r.errors.add(f"{spath}.url", f"{_excerpt(url)} must be http(s)://host[:port][/prefix]"
                                     " (the Prometheus API)")
    labels = PrometheusLabels()
    lm = r.mapping(m.get("labels"), f"{spath}.labels", {"mesh", "dataplane", "service"})
    if lm:
        names = {k: r.string(v, f"{spath}.labels.{k}") for k, v in lm.items()}
        labels = PrometheusLabels(**{k: v for k, v in names.items() if v})
    files = {k: _path(m[k], f"{spath}.{k}", base_dir, r) if k in m else None
             for k in ("token_file", "password_file", "ca_file")}
    headers: tuple[tuple[str, str], ...] = ()
    hm = r.mapping(m.get("headers"), f"{spath}.headers", set(m.get("headers") or {}))
    if hm:
        headers = tuple((str(k), str(v)) for k, v in hm.items())
    kwargs: dict[str, Any] = {}
    for key, minimum in (("timeout", 0.1), ("scrape_interval", 1.0), ("forget_after", 1.0)):
        if key in m and (d := r.duration(m[key], f"{spath}.{key}", minimum)) is not None:
            kwargs[key] = d
    if "max_response_bytes" in m and (
            size := r.size(m["max_response_bytes"], f"{spath}.max_response_bytes")):
        kwargs["max_response_bytes"] = size
    if "metrics" in m and (mk := r.choice(m["metrics"], f"{spath}.metrics",
                                          ("envoy", "passguard"))):
        kwargs["metrics"] = mk
    if "username" in m and (u := r.string(m["username"], f"{spath}.username")):
        kwargs["username"] = u
    if "extra_selector" in m and (es := r.string(m["extra_selector"],
                                                 f"{spath}.extra_selector")):
        kwargs["extra_selector"] = es
    if "insecure_skip_verify" in m:
        kwargs["insecure_skip_verify"] = bool(r.boolean(m["insecure_skip_verify"],
                                                        f"{spath}.insecure_skip_verify"))
    if len(r.errors.items) != before or url is None:
        return None
    def text(p: Path | None) -> str | None:
        return str(p) if p is not None else None

    cfg = PrometheusSourceConfig(
        url=url, labels=labels, headers=headers, token_file=text(files["token_file"]),
        password_file=text(files["password_file"]), ca_file=text(files["ca_file"]), **kwargs)
    for key, message in check_config(cfg):
        r.errors.add(f"{spath}.{key}", message)
    return cfg


def _path(value: Any, path: str, base_dir: Path, r: _Reader) -> Path | None:
    s = r.string(value, path)
    if s is None:
        return None
    p = Path(s)
    return p if p.is_absolute() else base_dir / p


def _auth(raw: Any, base_dir: Path, r: _Reader) -> AuthConfig:
    au = r.mapping(raw, "auth", {"tokens_file", "tls", "protect_metrics", "insecure"})
    if not au:
        return AuthConfig()
    tokens = _path(au["tokens_file"], "auth.tokens_file", base_dir, r) \
        if "tokens_file" in au else None
    tls = None
    t = r.mapping(au.get("tls"), "auth.tls",
                  {"cert_file", "key_file", "client_ca_file", "reload_interval"})
    if t:
        cert = _path(t.get("cert_file"), "auth.tls.cert_file", base_dir, r)
        key = _path(t.get("key_file"), "auth.tls.key_file", base_dir, r)
        ca = _path(t["client_ca_file"], "auth.tls.client_ca_file", base_dir, r) \
            if "client_ca_file" in t else None
        every = r.duration(t["reload_interval"], "auth.tls.reload_interval", 1.0) \
            if "reload_interval" in t else 10.0
        if cert is not None and key is not None:
            tls = TLSConfig(cert, key, ca, every or 10.0)
    protect = r.boolean(au["protect_metrics"], "auth.protect_metrics") \
        if "protect_metrics" in au else False
    insecure = r.boolean(au["insecure"], "auth.insecure") if "insecure" in au else False
    return AuthConfig(tokens_file=tokens, tls=tls, protect_metrics=bool(protect),
                      insecure=bool(insecure))


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


# Operator-owned files may list a whole fleet; request bodies keep the tight
# default. Still bounded: an alias bomb in a target file is refused too.
def _caller_limits(lm: dict[str, Any], r: _Reader) -> dict[str, Any]:
    """The ``limits`` keys about connections and unverified callers that are set."""
    out: dict[str, Any] = {}
    if "first_byte_timeout" in lm and (
            v := r.duration(lm["first_byte_timeout"], "limits.first_byte_timeout", 0.1)):
        out["first_byte_timeout"] = v
    if "unverified_rate" in lm:
        rate = lm["unverified_rate"]
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not \
                0 <= rate <= 1_000_000:
            r.errors.add("limits.unverified_rate", "must be a number of requests a second "
                         f"from 0 (no limit) to 1000000, got {_excerpt(rate)}")
        else:
            out["unverified_rate"] = float(rate)
    if "unverified_burst" in lm and (
            b := r.integer(lm["unverified_burst"], "limits.unverified_burst", 1, 1_000_000)):
        out["unverified_burst"] = b
    if "rate_limit_loopback" in lm and (
            lb := r.boolean(lm["rate_limit_loopback"], "limits.rate_limit_loopback")) is not None:
        out["rate_limit_loopback"] = lb
    return out


FILE_LIMITS = Limits(max_documents=10_000, max_depth=64, max_nodes=5_000_000)


def load_target_file(path: Path) -> list[TargetConfig]:
    """A target file: a list of targets, or a mapping with a ``targets`` list."""
    try:
        docs = load_documents(path.read_bytes(), "application/yaml", FILE_LIMITS)
    except OSError as exc:
        raise ConfigError([f"cannot read {path}: {exc.strerror or exc}"]) from None
    except InputError as exc:
        raise ConfigError([f"{path}: {exc}"]) from None
    errors = _Errors()
    targets: list[TargetConfig] = []
    for doc in docs:
        if isinstance(doc, dict) and set(doc) == {"targets"}:
            doc = doc["targets"]
        targets.extend(parse_targets(doc, str(path), errors))
    if errors.items:
        raise ConfigError(errors.items)
    return targets
