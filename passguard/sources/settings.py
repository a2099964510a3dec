"""What a ``kuma`` and a ``prometheus`` source are configured with, and its checks.

Plain frozen values and pure checks, below the sources that use them: the
config loader builds them without importing a source (and so aiohttp).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Literal

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
StatsMode = Literal["inspect", "kuma-dp"]
MetricsKind = Literal["envoy", "passguard"]
METRICS_KINDS: tuple[MetricsKind, ...] = ("envoy", "passguard")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")


@dataclass(frozen=True)
class KumaSourceConfig:
    url: str  # CP API base, e.g. https://kuma-cp:5682 (may carry a path prefix)
    token_file: str | None = None
    ca_file: str | None = None
    insecure_skip_verify: bool = False
    meshes: tuple[str, ...] = ("*",)
    discovery_interval: float = 30.0
    stats: StatsMode = "inspect"
    timeout: float = 10.0  # per CP request
    page_size: int = 100  # Kuma's default; its maximum is 1000
    max_response_bytes: int = 64 * 1024 * 1024  # per page
    kind: Literal["kuma"] = "kuma"
    # A mesh not listed completely for this long is insufficient data to the
    # gate; None: three discovery intervals.
    stale_after: float | None = None
    # `stats: kuma-dp`: the networks a dataplane's metrics address may be in
    # (None: any IP literal but unspecified, multicast and link-local).
    allowed_cidrs: tuple[Network, ...] | None = None

    def wants(self, mesh: str) -> bool:
        return any(fnmatchcase(mesh, pattern) for pattern in self.meshes)


@dataclass(frozen=True)
class PrometheusLabels:
    """Names of the labels that place a series in a mesh, in *that* Prometheus."""

    mesh: str = "mesh"
    dataplane: str = "dataplane"
    service: str = "service"


@dataclass(frozen=True)
class PrometheusSourceConfig:
    url: str  # base URL; may carry a path prefix (Mimir: http://mimir/prometheus)
    labels: PrometheusLabels = field(default_factory=PrometheusLabels)
    metrics: MetricsKind = "envoy"
    token_file: str | None = None  # bearer token, re-read every round
    username: str | None = None  # basic auth, with password_file
    password_file: str | None = None
    ca_file: str | None = None
    insecure_skip_verify: bool = False
    timeout: float = 10.0  # per query (also sent as Prometheus's `timeout`)
    # Label matchers added to every selector: '{cluster="eu-1", job="kuma-dp"}'.
    extra_selector: str = ""
    # How often that Prometheus scrapes these series (not passguard's own
    # interval): sets the stale threshold and the subquery resolution.
    scrape_interval: float = 30.0
    # Extra request headers, e.g. (("X-Scope-OrgID", "team-a"),) for Mimir.
    headers: tuple[tuple[str, str], ...] = ()
    # Drop a dataplane whose newest sample is older than this (None: keep it,
    # stale, while it has a sample in the window).
    forget_after: float | None = None
    max_response_bytes: int = 256 * 1024 * 1024
    kind: Literal["prometheus"] = "prometheus"


# --------------------------------------------------------------------------- checks

_MATCHER = re.compile(
    r"""\s*(?P<name>[a-zA-Z_][a-zA-Z0-9_]*)\s*(?P<op>=~|!~|!=|=)\s*"""
    r"""(?P<value>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)\s*(?:,|\Z)""",
    re.DOTALL,
)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "a": "\a",
            "b": "\b", "f": "\f", "v": "\v"}


def _unquote(text: str) -> str:
    if text[0] == "`":
        return text[1:-1]
    out: list[str] = []
    body = text[1:-1]
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            if nxt not in _ESCAPES:
                raise ValueError(f"unsupported escape \\{nxt} in {text}")
            out.append(_ESCAPES[nxt])
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


_QUOTE = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"})


def quote(value: str) -> str:
    """A PromQL double-quoted string literal (Go escapes)."""
    return '"' + value.translate(_QUOTE) + '"'


def parse_selector(text: str) -> tuple[str, ...]:
    """``{a="b", c=~"d"}`` (braces optional) → normalised matchers ``('a="b"', 'c=~"d"')``.

    Raises ValueError naming the problem.  Only label matchers are accepted:
    nothing else of PromQL can be slipped into the queries this way."""
    body = text.strip()
    if body.startswith("{"):
        if not body.endswith("}"):
            raise ValueError("starts with { but does not end with }")
        body = body[1:-1]
    body = body.strip()
    if not body:
        return ()
    out: list[str] = []
    pos = 0
    while pos < len(body):
        m = _MATCHER.match(body, pos)
        if m is None:
            raise ValueError(f"not a label matcher at {body[pos:pos + 30]!r} "
                             '(expected name="value", name!="value", name=~"re" or name!~"re")')
        name = m.group("name")
        if name == "__name__":
            raise ValueError("a matcher on __name__ is not allowed: passguard picks the metrics")
        try:
            value = _unquote(m.group("value"))
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        if m.group("op") in ("=~", "!~"):
            # Python's re, not RE2: what only RE2 refuses shows up as the
            # Prometheus error of the first round.
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"{name}: not a regular expression ({exc})") from None
        out.append(f"{name}{m.group('op')}{quote(value)}")
        pos = m.end()
        if m.group(0).rstrip().endswith(",") and not body[pos:].strip():
            break  # a trailing comma, as PromQL allows
    return tuple(out)


def check_config(cfg: PrometheusSourceConfig) -> list[tuple[str, str]]:
    """Problems of a config, as ``(key, message)``; empty when it is usable.

    For ``passguard config check``: the key is relative to the source
    (``labels.mesh``, ``extra_selector``)."""
    problems: list[tuple[str, str]] = []
    if not re.match(r"https?://[^/\s]+", cfg.url):
        problems.append(("url", f"must be an http:// or https:// URL, got {cfg.url!r}"))
    names = {"mesh": cfg.labels.mesh, "dataplane": cfg.labels.dataplane,
             "service": cfg.labels.service}
    for key, name in names.items():
        if not _LABEL_NAME.match(name) or name.startswith("__"):
            problems.append((f"labels.{key}", f"{name!r} is not a usable Prometheus label name"))
    if cfg.labels.mesh == cfg.labels.dataplane:
        problems.append(("labels.dataplane", "must differ from labels.mesh"))
    if cfg.metrics not in METRICS_KINDS:
        problems.append(("metrics", f"must be one of {', '.join(METRICS_KINDS)}, "
                                    f"got {cfg.metrics!r}"))
    try:
        parse_selector(cfg.extra_selector)
    except ValueError as exc:
        problems.append(("extra_selector", str(exc)))
    if cfg.token_file and (cfg.username or cfg.password_file):
        problems.append(("token_file", "bearer token and basic auth (username, "
                                       "password_file) exclude each other"))
    if bool(cfg.username) != bool(cfg.password_file):
        problems.append(("username" if not cfg.username else "password_file",
                         "basic auth needs both username and password_file"))
    if not cfg.timeout > 0:
        problems.append(("timeout", "must be positive"))
    if not cfg.scrape_interval > 0:
        problems.append(("scrape_interval", "must be positive"))
    if cfg.forget_after is not None and not cfg.forget_after > 0:
        problems.append(("forget_after", "must be positive"))
    for name, _ in cfg.headers:
        if name.lower() == "authorization":
            problems.append(("headers", "set Authorization with token_file or "
                                        "username/password_file, not as a header"))
        elif not re.match(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z", name):
            problems.append(("headers", f"{name!r} is not a header name"))
    return problems


# --------------------------------------------------------------------------- PromQL
