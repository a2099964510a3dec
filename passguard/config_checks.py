"""The checks of single config values that need more than a type: addresses,
URLs, the passthrough cluster pattern. Pure functions, each returning why a
value is refused (or raising ValueError), for the schema to word as errors.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from passguard.config_types import Listen
from passguard.envoy.names import stats_filter


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


def check_clusters_pattern(pattern: str) -> str | None:
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
