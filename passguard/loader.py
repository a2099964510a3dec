"""Bounded, strict loading of the YAML and JSON documents passguard receives.

Bodies are hostile: every problem is an :class:`passguard.errors.InputError`
naming it (line and column where known, and the limit exceeded); nothing
else escapes :func:`load_documents`.  UTF-8 only; the content type picks JSON
or YAML, else a ``{``/``[`` body is tried as JSON and falls back to YAML
only on a syntax error.  The rules, limits and YAML typing are in
docs/architecture.md, "The document loader".
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, NoReturn

from passguard.errors import InputError
from passguard.loader_limits import (
    MAX_NUMBER_CHARS,
    Limits,
    check_number_length,
    check_string,
    line_column,
    show_value,
)
from passguard.loader_yaml import load_yaml

__all__ = ["MAX_NUMBER_CHARS", "Limits", "load_documents"]


_BOMS: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xfe\x00\x00", "UTF-32 (little-endian)"),
    (b"\x00\x00\xfe\xff", "UTF-32 (big-endian)"),
    (b"\xff\xfe", "UTF-16 (little-endian)"),
    (b"\xfe\xff", "UTF-16 (big-endian)"),
)
_UTF8_BOM = b"\xef\xbb\xbf"
_UTF8_CHARSETS = frozenset({"utf-8", "utf8", "us-ascii", "ascii"})



#: The bounds used when the caller gives none.
_DEFAULT_LIMITS = Limits()


def load_documents(
    body: bytes, content_type: str | None = None, limits: Limits = _DEFAULT_LIMITS
) -> list[Any]:
    """Decode ``body`` and return its documents as plain Python data.

    Raises :class:`InputError` for anything that is not a well-formed body
    within ``limits``; nothing else escapes.
    """
    fmt = _format_from_content_type(content_type)
    text = _decode(bytes(body))
    try:
        if fmt == "json":
            docs = _load_json(text, limits)
        elif fmt == "yaml":
            docs = load_yaml(text, limits)
        elif text.lstrip(" \t\r\n")[:1] in ("{", "["):
            try:
                docs = _load_json(text, limits)
            except _JSONSyntaxError:
                docs = load_yaml(text, limits)
        else:
            docs = load_yaml(text, limits)
    except _JSONSyntaxError as exc:
        raise InputError(str(exc)) from None
    except RecursionError:  # defence in depth: nothing here should recurse deeply
        raise InputError(
            f"body nests too deeply to load (max_depth is {limits.max_depth})"
        ) from None
    except MemoryError:
        raise InputError("body is too large to load") from None
    if not docs:
        raise InputError("no documents in body")
    return docs


# --------------------------------------------------------------------------
# content type and decoding


def _format_from_content_type(content_type: str | None) -> str | None:
    if not content_type:
        return None
    mime, _, params = content_type.partition(";")
    mime = mime.strip().lower()
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            charset = value.strip().strip('"').lower()
            if charset not in _UTF8_CHARSETS:
                raise InputError(
                    f"unsupported charset {show_value(charset)} in content type; "
                    "only UTF-8 is accepted"
                )
    _, _, subtype = mime.partition("/")
    if subtype == "json" or subtype.endswith("+json"):
        return "json"
    if subtype in ("yaml", "x-yaml") or subtype.endswith("+yaml"):
        return "yaml"
    return None


def _decode(body: bytes) -> str:
    for bom, name in _BOMS:
        if body.startswith(bom):
            raise InputError(f"body starts with a {name} byte order mark; only UTF-8 is accepted")
    if body.startswith(_UTF8_BOM):
        body = body[len(_UTF8_BOM) :]
        offset = len(_UTF8_BOM)
    else:
        offset = 0
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"body is not valid UTF-8 at byte {exc.start + offset}") from None
    nul = body.find(b"\x00")
    if nul >= 0:
        raise InputError(
            f"body contains a NUL byte at byte {nul + offset}; "
            "only UTF-8 text is accepted (is it UTF-16 or UTF-32?)"
        )
    return text


# --------------------------------------------------------------------------
# helpers


# JSON


class _JSONSyntaxError(Exception):
    """JSON that is not well-formed (the only failure that may fall back to YAML)."""


class _JSONRejected(Exception):
    """Raised from json hooks; converted to InputError."""


# A JSON string (possibly unterminated: then it runs to the end, which keeps
# the scan linear) or a bracket.  Possessive quantifiers: no backtracking.
_JSON_TOKEN = re.compile(r'"(?:[^"\\]++|\\.)*+"?|[\[\]{}]', re.DOTALL)


def _json_depth_check(text: str, limits: Limits) -> None:
    # Fewer brackets than the limit cannot nest past it: the usual body (an
    # AdmissionReview has ~20) skips the token walk, a tenth of a gate
    # request's CPU under load. Counting is done in C.
    if text.count("[") + text.count("{") <= limits.max_depth:
        return
    depth = 0
    for match in _JSON_TOKEN.finditer(text):
        token = match.group()
        if token in ("[", "{"):
            depth += 1
            if depth > limits.max_depth:
                raise InputError(
                    f"body nests deeper than {limits.max_depth} levels (max_depth) "
                    f"at {line_column(text, match.start())}"
                )
        elif token in ("]", "}"):
            depth -= 1


def _json_constant(name: str) -> NoReturn:
    raise _JSONRejected(f"JSON value {name} is not allowed (only finite numbers are)")


def _json_int(literal: str) -> int:
    check_number_length(literal, " in JSON")
    try:
        return int(literal)
    except ValueError:  # pragma: no cover - the JSON scanner only passes digits
        raise _JSONRejected(f"invalid JSON integer {show_value(literal)}") from None


def _json_float(literal: str) -> float:
    check_number_length(literal, " in JSON")
    try:
        value = float(literal)
    except ValueError:  # pragma: no cover - the JSON scanner only passes numbers
        raise _JSONRejected(f"invalid JSON number {show_value(literal)}") from None
    if not math.isfinite(value):
        raise _JSONRejected(f"JSON number {show_value(literal)} is out of range")
    return value


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _JSONRejected(f"duplicate key {show_value(key)} in JSON object")
            seen.add(key)
    return result


def _load_json(text: str, limits: Limits) -> list[Any]:
    if not text.strip(" \t\r\n"):
        return []
    _json_depth_check(text, limits)
    try:
        value = json.loads(
            text,
            parse_constant=_json_constant,
            parse_int=_json_int,
            parse_float=_json_float,
            object_pairs_hook=_json_object,
        )
    except json.JSONDecodeError as exc:
        raise _JSONSyntaxError(
            f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except _JSONRejected as exc:
        raise InputError(str(exc)) from None
    _json_walk(value, limits, text)
    return [] if value is None else [value]


def _json_walk(value: Any, limits: Limits, text: str | None = None) -> None:
    """Count nodes and check strings, without recursion (depth is known bounded)."""
    if text is not None and _json_walk_cannot_fail(text, limits):
        return
    nodes = 0
    stack = [value]
    while stack:
        item = stack.pop()
        nodes += 1 + (len(item) if isinstance(item, dict) else 0)  # keys are nodes too
        if nodes > limits.max_nodes:
            raise InputError(f"JSON has more than {limits.max_nodes} nodes (max_nodes)")
        if isinstance(item, dict):
            for key, child in item.items():
                check_string(key, limits, " in JSON")
                stack.append(child)
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            check_string(item, limits, " in JSON")


def _json_walk_cannot_fail(text: str, limits: Limits) -> bool:
    """True when the body is too small for the walk to find anything: every
    node takes at least one character of the text, a string's UTF-8 form is
    at most 4 bytes per character of it, and a lone surrogate can only come
    from a ``\\u`` escape (the text itself was decoded as strict UTF-8)."""
    return (len(text) <= limits.max_nodes and 4 * len(text) <= limits.max_scalar_bytes
            and "\\u" not in text)

