"""The leaf types of the config schema: durations, sizes, bounded numbers, choices.

Each is one check (raising ``PydanticCustomError`` in passguard's words), its
JSON Schema, and how its value is written back, so defaults show as the file
spells them. ``many()`` carries several problems under sub-paths of one value.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pydantic_core import PydanticCustomError, core_schema

from passguard.config_checks import (
    check_clusters_pattern,
    parse_listen,
    userinfo_problem,
    validate_target_url,
)
from passguard.config_types import Listen
from passguard.durations import excerpt, format_duration, parse_duration

Problem = tuple[tuple[str | int, ...], str]
PROBLEMS = "passguard_problems"
_SIZE = re.compile(r"^\s*(\d{1,12})\s*(B|KiB|MiB|GiB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_DURATION_PATTERN = r"^\s*\d{1,9}(\.\d{1,9})?\s*(ms|s|m|h|d)\s*$"
_SIZE_PATTERN = r"^\s*\d{1,12}\s*(B|KiB|MiB|GiB)?\s*$"


def type_name(value: object) -> str:
    if value is None:
        return "null"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _fail(message: str) -> PydanticCustomError:
    return PydanticCustomError("passguard", message)


def many(problems: list[Problem]) -> PydanticCustomError:
    """Several problems under sub-paths of one value (a model's cross-field checks)."""
    return PydanticCustomError(PROBLEMS, "; ".join(m for _, m in problems),
                               {"problems": problems})


# --------------------------------------------------------------------------- leaf types

@dataclass(frozen=True)
class Check:
    """A leaf type: one check function, its JSON Schema, and how its value is
    written back (``15.0`` → ``15s``, so the schema's defaults read as the file)."""

    check: Callable[[Any], Any]
    schema: Mapping[str, Any]
    show: Callable[[Any], Any] | None = None

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        ser = core_schema.plain_serializer_function_ser_schema(self.show) if self.show else None
        return core_schema.no_info_plain_validator_function(self.check, serialization=ser)

    def __get_pydantic_json_schema__(self, schema: Any, handler: Any) -> dict[str, Any]:
        return dict(self.schema)


def _seconds(value: Any, minimum: float) -> float:
    if not isinstance(value, str):
        raise _fail(f"must be a duration string like '15s', got {type_name(value)}")
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    if seconds < minimum:
        raise _fail(f"must be at least {format_duration(minimum)}")
    return seconds


def _show_duration(value: float | None) -> str | None:
    return None if value is None else format_duration(value)


def duration(minimum: float) -> Check:
    return Check(lambda v: _seconds(v, minimum),
                  {"type": "string", "pattern": _DURATION_PATTERN,
                   "description": f"a duration (500ms, 15s, 15m, 1h, 90d), at least "
                                  f"{format_duration(minimum)}"}, _show_duration)


def _spread(value: Any) -> float | None:
    if value == "auto":
        return None
    if not isinstance(value, str):
        raise _fail(f"must be 'auto' or a duration like '5s', got {type_name(value)}")
    return _seconds(value, 0.0)


SPREAD = Check(_spread, {"anyOf": [{"const": "auto"},
                                    {"type": "string", "pattern": _DURATION_PATTERN}],
                          "description": "auto, or a duration (0s: all at once)"},
                lambda v: "auto" if v is None else format_duration(v))


def _whole(value: Any, minimum: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(f"must be a whole number, got {type_name(value)}")
    if not minimum <= value <= maximum:
        raise _fail(f"must be between {minimum} and {maximum}, got {value}")
    return value


def whole(minimum: int, maximum: int) -> Check:
    return Check(lambda v: _whole(v, minimum, maximum),
                  {"type": "integer", "minimum": minimum, "maximum": maximum})


def _bytes(value: Any, minimum: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        size = _whole(value, 1, 1024**3)
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        size = _whole(int(m.group(1)) * _SIZE_UNITS[m.group(2)], 1, 1024**4)
    else:
        raise _fail(f"must be a size like 1048576 or '1MiB', got {excerpt(value)}")
    if size < minimum:
        raise _fail(f"must be at least {minimum // 1024**2}MiB, got {size} bytes")
    return size


def size(minimum: int = 1) -> Check:
    return Check(lambda v: _bytes(v, minimum),
                  {"anyOf": [{"type": "integer", "minimum": max(minimum, 1)},
                             {"type": "string", "pattern": _SIZE_PATTERN}],
                   "description": "bytes, or a size like 64KiB, 1MiB, 1GiB"})


def choice(choices: tuple[str, ...]) -> Check:
    def check(value: Any) -> str:
        if not isinstance(value, str) or value not in choices:
            raise _fail(f"must be one of {', '.join(choices)}, got {excerpt(value)}")
        return value
    return Check(check, {"enum": list(choices)})


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(f"must be true or false, got {type_name(value)}")
    return value


BOOL = Check(_boolean, {"type": "boolean"})


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(f"must be a non-empty string, got {type_name(value)}")
    return value


TEXT = Check(_text, {"type": "string", "minLength": 1})
PATH = Check(_text, {"type": "string", "minLength": 1,
                      "description": "a file; relative to the config file's folder"})


def request_rate(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not \
            0 <= value <= 1_000_000:
        raise _fail("must be a number of requests a second from 0 (no limit) to 1000000, "
                    f"got {excerpt(value)}")
    return float(value)


def listen_value(value: Any) -> Listen:
    try:
        return parse_listen(_text(value))
    except ValueError as exc:
        raise _fail(str(exc)) from None


def cluster_pattern(value: Any) -> str:
    if (problem := check_clusters_pattern(_text(value))) is not None:
        raise _fail(problem)
    return str(value)


def _is_api_url(url: str) -> bool:
    """``http(s)://host[:port][/prefix]``, no query: the base of an HTTP API."""
    try:
        parts = urlsplit(url)
        return parts.scheme in ("http", "https") and bool(parts.hostname) and not parts.query
    except ValueError:  # e.g. an unclosed IPv6 literal
        return False


def api_url(hint: str, what: str) -> Check:
    def check(value: Any) -> str:
        url = _text(value)
        if problem := userinfo_problem(url, hint):
            raise _fail(problem)
        if not _is_api_url(url):
            raise _fail(f"{excerpt(url)} must be http(s)://host[:port][/prefix] ({what})")
        return url
    return Check(check, {"type": "string", "pattern": "^https?://", "format": "uri"})


def admin_url(value: Any) -> str:
    url = _text(value)
    if (problem := validate_target_url(url)) is not None:
        raise _fail(problem)
    return url.rstrip("/")


def label_set(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise _fail(f"must be a mapping, got {type_name(value)}")
    out: dict[str, str] = {}
    bad: list[Problem] = []
    for k, v in value.items():
        if not isinstance(k, str) or not LABEL_NAME.match(k):
            bad.append(((str(k),), "label names are letters, digits and _ (Prometheus rules)"))
        elif not isinstance(v, str | int | float) or isinstance(v, bool):
            bad.append(((k,), f"must be a string, got {type_name(v)}"))
        else:
            out[k] = str(v)
    if bad:
        raise many(bad)
    return out


def cidr_list(value: Any) -> tuple[Any, ...]:
    if not isinstance(value, list) or not value:
        raise _fail("must be a non-empty list of CIDRs like '10.0.0.0/8' (leave it out "
                    f"to allow any IP address), got {type_name(value)}")
    out: list[Any] = []
    bad: list[Problem] = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            bad.append(((i,), f"must be a CIDR string like '10.0.0.0/8', got {type_name(item)}"))
            continue
        try:
            out.append(ipaddress.ip_network(item.strip(), strict=True))
        except ValueError as exc:
            bad.append(((i,), f"{excerpt(item)} is not a CIDR: {exc}"))
    if bad:
        raise many(bad)
    return tuple(out)


def header_set(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise _fail(f"must be a mapping, got {type_name(value)}")
    return tuple((str(k), str(v)) for k, v in value.items())
