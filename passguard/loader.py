"""Bounded, strict loading of the YAML and JSON documents passguard receives.

Request bodies come from deploy pipelines and the Kubernetes API server, so
they are treated as hostile: every problem is answered with
:class:`passguard.errors.InputError` whose message names the problem (with line
and column where the parser knows them, and the limit that was exceeded).
Nothing else escapes :func:`load_documents`.

Decoding
    UTF-8 only.  A UTF-8 byte order mark is skipped; UTF-16/UTF-32 byte order
    marks, NUL bytes and invalid UTF-8 are refused.  A ``charset`` parameter
    in the content type other than UTF-8 (or its subset US-ASCII) is refused.

Format
    ``application/json`` or any ``+json`` type is parsed as strict JSON;
    ``application/yaml``, ``text/yaml``, ``application/x-yaml`` or any
    ``+yaml`` type as YAML.  Otherwise a body whose first non-blank character
    is ``{`` or ``[`` is tried as JSON, and only if that fails for a *syntax*
    reason is it parsed as YAML (a YAML error is then reported).  JSON that is
    syntactically fine but breaks a rule (duplicate key, ``NaN``, nesting,
    ...) is refused, never re-read as YAML.

JSON
    Exactly one value per body.  ``NaN``/``Infinity``/``-Infinity``, numbers
    that overflow to infinity, duplicate object keys, lone surrogate escapes
    (``"\\ud800"``) and number literals longer than :data:`MAX_NUMBER_CHARS`
    characters are refused.  Nesting is measured by a linear pre-scan before
    the parser runs, so deep input never reaches the recursive decoder.

YAML
    Multi-document streams (``---``).  The loader never uses PyYAML's
    composer or constructor: it walks the parser's event stream (libyaml's
    ``CSafeLoader`` when available, the pure-Python ``SafeLoader`` otherwise,
    same checks for both) and builds plain Python data itself, without
    recursion, so depth, document count, node count and scalar size are all
    checked *before* anything is built.  Every alias adds the full size of the
    node it refers to to the node count (and its height to the depth), so an
    alias bomb ("billion laughs") is refused after a handful of events and is
    never expanded.  Aliases are copied, so the result holds no shared or
    recursive references; copying is bounded by ``max_nodes``.

    Scalar typing follows YAML 1.1 as PyYAML's ``safe_load`` does, with these
    deliberate differences:

    * timestamps are **not** converted to ``datetime``: ``creationTimestamp:
      2024-01-01T00:00:00Z`` stays the string it is in the Kubernetes object
      (an explicit ``!!timestamp`` is checked for shape, then kept as text);
    * sexagesimal numbers (``1:30``) stay strings (Kubernetes' go-yaml does
      the same; PyYAML would read 90);
    * ``.inf``/``.nan`` (and floats overflowing to infinity) are refused, as
      in JSON: such values cannot be represented in a Kubernetes object;
    * number literals longer than :data:`MAX_NUMBER_CHARS` are refused;
    * duplicate mapping keys and duplicate anchors are refused.

    YAML 1.1 booleans are kept: ``yes``/``no``/``on``/``off`` (in the three
    case forms ``yes``, ``Yes``, ``YES``) are ``True``/``False``, as in PyYAML
    and in the go-yaml v2 resolver behind Kubernetes' ``sigs.k8s.io/yaml``,
    including as mapping keys.  ``y``/``Y``/``n``/``N`` stay strings as in
    PyYAML, although go-yaml v2 reads them as booleans: a schema check that
    wants a boolean (``passthrough: n``) then refuses the value instead of
    passguard guessing.  Floats need a dot as in YAML 1.1 (``1e5`` is a
    string, ``1.0e+5`` a float).  Integers may be written as YAML 1.1 octal
    (``0755``), hex (``0x1F``), binary (``0b101``) and with ``_`` separators.

    Tags: only the YAML core tags ``!!str``, ``!!int``, ``!!float``,
    ``!!bool``, ``!!null``, ``!!map``, ``!!seq`` and ``!!timestamp`` (kept as a
    string), plus the non-specific ``!`` (a string), are accepted.  Any other
    tag, including ``!!python/...``, ``!!binary``, ``!!set``, ``!!omap`` and
    local ``!foo`` tags, is refused with its name.

    Merge keys (``<<: *base`` or ``<<: [*a, *b]``) are **allowed**, because
    Kubernetes' YAML decoder and PyYAML both honour them and hand-written
    manifests use them.  Keys written explicitly override merged keys, and
    earlier mappings in a merge list override later ones.  The value of
    ``<<`` must be a mapping or a list of mappings.  Only a plain ``<<`` is a
    merge key; a quoted ``"<<"`` is an ordinary string key.

    Mapping keys must be scalars (strings, numbers, booleans or null); a
    mapping or sequence used as a key is refused.  Two keys that are equal as
    Python values (``1`` and ``1.0``, or ``1`` and ``true``) count as
    duplicates.

Limits
    :class:`Limits` bounds what one body may expand to (documents, depth,
    nodes after alias expansion, scalar size).  The size of the body itself is
    the caller's to bound (the HTTP layer's ``max_body_bytes``): every check
    here costs time linear in the body, but the body is read in full.

Result
    One plain Python value (``dict``, ``list``, ``str``, ``int``, ``float``,
    ``bool``, ``None``) per document; ``null`` documents (an empty document, a
    trailing ``---``) are dropped.  A body without any non-null document is
    refused with "no documents in body".
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, NoReturn

import yaml
import yaml.events as ev

from passguard.errors import InputError

__all__ = ["MAX_NUMBER_CHARS", "Limits", "load_documents"]

#: Longest number literal (sign, digits, point, exponent, ``_``) accepted in
#: JSON or YAML.  Int64 needs 20 characters; anything longer than this is an
#: attack on ``int()`` (quadratic in the number of digits) or a mistake.
MAX_NUMBER_CHARS = 100


@dataclass(frozen=True)
class Limits:
    """Upper bounds enforced while loading one request body."""

    #: Documents in one body (YAML ``---`` separated; JSON always has one).
    max_documents: int = 1000
    #: Nesting of mappings/sequences, counting the outermost as 1.
    max_depth: int = 64
    #: Nodes (scalars, mappings, sequences) in the whole body after alias
    #: expansion: this is what guards against alias bombs.
    max_nodes: int = 100_000
    #: UTF-8 size of a single scalar (string, key, number literal).
    max_scalar_bytes: int = 256 * 1024
    #: ``appendMatch`` entries of one MeshPassthrough: a judgement's cost grows
    #: with them (each observed destination is looked up in their index).
    max_matches: int = 1000


#: libyaml's parser when PyYAML was built with it, else the pure-Python one.
#: Only the parser (event stream) of the loader class is used.
_YAML_LOADER: type[Any] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
try:
    from yaml._yaml import CParser as _C_PARSER
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    _C_PARSER = None  # type: ignore[assignment,misc]

_BOMS: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xfe\x00\x00", "UTF-32 (little-endian)"),
    (b"\x00\x00\xfe\xff", "UTF-32 (big-endian)"),
    (b"\xff\xfe", "UTF-16 (little-endian)"),
    (b"\xfe\xff", "UTF-16 (big-endian)"),
)
_UTF8_BOM = b"\xef\xbb\xbf"
_UTF8_CHARSETS = frozenset({"utf-8", "utf8", "us-ascii", "ascii"})


def load_documents(
    body: bytes, content_type: str | None = None, limits: Limits = Limits()
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
            docs = _load_yaml(text, limits)
        elif text.lstrip(" \t\r\n")[:1] in ("{", "["):
            try:
                docs = _load_json(text, limits)
            except _JSONSyntaxError:
                docs = _load_yaml(text, limits)
        else:
            docs = _load_yaml(text, limits)
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
                    f"unsupported charset {_show(charset)} in content type; only UTF-8 is accepted"
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


def _show(value: object, limit: int = 80) -> str:
    """A short, printable rendering of a (hostile) value for messages."""
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def _position(text: str, index: int) -> str:
    line = text.count("\n", 0, index) + 1
    column = index - (text.rfind("\n", 0, index) + 1) + 1
    return f"line {line} column {column}"


def _at(mark: Any) -> str:
    if mark is None:
        return ""
    return f" at line {mark.line + 1} column {mark.column + 1}"


def _checked_string(value: str, limits: Limits, where: str) -> None:
    """Refuse strings over ``max_scalar_bytes`` or holding lone surrogates."""
    if len(value) > limits.max_scalar_bytes:  # every character is >= 1 byte
        raise InputError(
            f"scalar of at least {len(value)} bytes{where} is larger than "
            f"{limits.max_scalar_bytes} bytes (max_scalar_bytes)"
        )
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise InputError(
            f"string{where} contains a lone surrogate, which is not valid Unicode"
        ) from None
    if size > limits.max_scalar_bytes:
        raise InputError(
            f"scalar of {size} bytes{where} is larger than "
            f"{limits.max_scalar_bytes} bytes (max_scalar_bytes)"
        )


def _check_number_length(literal: str, where: str) -> None:
    if len(literal) > MAX_NUMBER_CHARS:
        raise InputError(
            f"number literal of {len(literal)} characters{where} is longer than "
            f"{MAX_NUMBER_CHARS} characters"
        )


# --------------------------------------------------------------------------
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
                    f"at {_position(text, match.start())}"
                )
        elif token in ("]", "}"):
            depth -= 1


def _json_constant(name: str) -> NoReturn:
    raise _JSONRejected(f"JSON value {name} is not allowed (only finite numbers are)")


def _json_int(literal: str) -> int:
    _check_number_length(literal, " in JSON")
    try:
        return int(literal)
    except ValueError:  # pragma: no cover - the JSON scanner only passes digits
        raise _JSONRejected(f"invalid JSON integer {_show(literal)}") from None


def _json_float(literal: str) -> float:
    _check_number_length(literal, " in JSON")
    try:
        value = float(literal)
    except ValueError:  # pragma: no cover - the JSON scanner only passes numbers
        raise _JSONRejected(f"invalid JSON number {_show(literal)}") from None
    if not math.isfinite(value):
        raise _JSONRejected(f"JSON number {_show(literal)} is out of range")
    return value


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _JSONRejected(f"duplicate key {_show(key)} in JSON object")
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
                _checked_string(key, limits, " in JSON")
                stack.append(child)
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            _checked_string(item, limits, " in JSON")


def _json_walk_cannot_fail(text: str, limits: Limits) -> bool:
    """True when the body is too small for the walk to find anything: every
    node takes at least one character of the text, a string's UTF-8 form is
    at most 4 bytes per character of it, and a lone surrogate can only come
    from a ``\\u`` escape (the text itself was decoded as strict UTF-8)."""
    return (len(text) <= limits.max_nodes and 4 * len(text) <= limits.max_scalar_bytes
            and "\\u" not in text)


# --------------------------------------------------------------------------
# YAML: scalar resolution (YAML 1.1 as in PyYAML, minus timestamps/sexagesimal)

_TAG_PREFIX = "tag:yaml.org,2002:"
_STR = _TAG_PREFIX + "str"
_INT = _TAG_PREFIX + "int"
_FLOAT = _TAG_PREFIX + "float"
_BOOL = _TAG_PREFIX + "bool"
_NULL = _TAG_PREFIX + "null"
_MAP = _TAG_PREFIX + "map"
_SEQ = _TAG_PREFIX + "seq"
_TIMESTAMP = _TAG_PREFIX + "timestamp"

_NULL_RE = re.compile(r"~|null|Null|NULL|")
_BOOL_RE = re.compile(r"yes|Yes|YES|no|No|NO|true|True|TRUE|false|False|FALSE|on|On|ON|off|Off|OFF")
_TRUE = frozenset({"yes", "true", "on"})
_INT_RE = re.compile(
    r"[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+"
    r"|(?P<sexagesimal>[-+]?[1-9][0-9_]*(?::[0-5]?[0-9])+)"
)
_FLOAT_RE = re.compile(
    r"[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?"
    r"|\.[0-9_]+(?:[eE][-+][0-9]+)?"
    r"|(?P<sexagesimal>[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*)"
    r"|(?P<special>[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))"
)
_TIMESTAMP_RE = re.compile(
    r"[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]"
    r"|[0-9][0-9][0-9][0-9]-[0-9][0-9]?-[0-9][0-9]?"
    r"(?:[Tt]|[ \t]+)[0-9][0-9]?:[0-9][0-9]:[0-9][0-9](?:\.[0-9]*)?"
    r"(?:[ \t]*(?:Z|[-+][0-9][0-9]?(?::[0-9][0-9])?))?"
)
_NOT_A_NUMBER = object()


def _tag_name(tag: str) -> str:
    if tag.startswith(_TAG_PREFIX):
        return "!!" + tag[len(_TAG_PREFIX) :]
    return tag


def _yaml_int(value: str, where: str) -> object:
    """An int, or _NOT_A_NUMBER if ``value`` is not a usable YAML 1.1 int."""
    match = _INT_RE.fullmatch(value)
    if match is None or match.group("sexagesimal") is not None:
        return _NOT_A_NUMBER
    _check_number_length(value, where)
    digits = value.replace("_", "")
    sign = 1
    if digits[:1] in "+-":
        sign = -1 if digits[0] == "-" else 1
        digits = digits[1:]
    try:
        if digits == "0":
            return 0
        if digits.startswith("0b"):
            return sign * int(digits[2:], 2)
        if digits.startswith("0x"):
            return sign * int(digits[2:], 16)
        if digits.startswith("0"):
            return sign * int(digits, 8)
        return sign * int(digits)
    except ValueError:  # e.g. "0b_" or "0x_": no digits at all
        return _NOT_A_NUMBER


def _yaml_float(value: str, where: str) -> object:
    """A finite float, or _NOT_A_NUMBER if ``value`` is not a YAML 1.1 float."""
    match = _FLOAT_RE.fullmatch(value)
    if match is None or match.group("sexagesimal") is not None:
        return _NOT_A_NUMBER
    if match.group("special") is not None:
        raise InputError(
            f"YAML float {_show(value)}{where} is not allowed (only finite numbers are)"
        )
    _check_number_length(value, where)
    try:
        number = float(value.replace("_", ""))
    except ValueError:  # e.g. "._"
        return _NOT_A_NUMBER
    if not math.isfinite(number):
        raise InputError(f"YAML float {_show(value)}{where} is out of range")
    return number


def _implicit_scalar(value: str, where: str) -> Any:
    """Type a plain, untagged scalar as YAML 1.1 (timestamps stay strings)."""
    if _NULL_RE.fullmatch(value):
        return None
    if _BOOL_RE.fullmatch(value):
        return value.lower() in _TRUE
    first = value[:1]
    if first and first in "+-.0123456789":
        number = _yaml_int(value, where)
        if number is _NOT_A_NUMBER:
            number = _yaml_float(value, where)
        if number is not _NOT_A_NUMBER:
            return number
    return value


def _tagged_scalar(tag: str, value: str, where: str) -> Any:
    """Construct a scalar with an explicit core tag, refusing any other tag."""
    if tag in ("!", _STR):
        return value
    result: object = _NOT_A_NUMBER
    if tag == _NULL:
        if _NULL_RE.fullmatch(value):
            return None
    elif tag == _BOOL:
        if _BOOL_RE.fullmatch(value):
            return value.lower() in _TRUE
    elif tag == _INT:
        result = _yaml_int(value, where)
    elif tag == _FLOAT:
        result = _yaml_float(value, where)
        if result is _NOT_A_NUMBER:
            integer = _yaml_int(value, where)
            if isinstance(integer, int):
                result = float(integer)
    elif tag == _TIMESTAMP:
        if _TIMESTAMP_RE.fullmatch(value):
            return value
    else:
        raise InputError(f"unsupported YAML tag {_show(_tag_name(tag))}{where}")
    if result is not _NOT_A_NUMBER:
        return result
    raise InputError(f"value {_show(value)}{where} is not a valid {_tag_name(tag)}")


# --------------------------------------------------------------------------
# YAML: event-driven, non-recursive builder


class _Frame:
    """An open collection (or the document) while its events are read."""

    __slots__ = ("anchor", "height", "mark", "start_nodes")

    def __init__(self, anchor: str | None, start_nodes: int, mark: Any) -> None:
        self.anchor = anchor
        self.start_nodes = start_nodes
        self.mark = mark
        self.height = 0  # greatest height of a child collection


class _DocFrame(_Frame):
    __slots__ = ("value",)

    def __init__(self, mark: Any) -> None:
        super().__init__(None, 0, mark)
        self.value: Any = None


class _SeqFrame(_Frame):
    __slots__ = ("items",)

    def __init__(self, anchor: str | None, start_nodes: int, mark: Any) -> None:
        super().__init__(anchor, start_nodes, mark)
        self.items: list[Any] = []


class _MapFrame(_Frame):
    __slots__ = ("data", "has_key", "key", "key_is_merge", "key_lines", "merges")

    def __init__(self, anchor: str | None, start_nodes: int, mark: Any) -> None:
        super().__init__(anchor, start_nodes, mark)
        self.data: dict[Any, Any] = {}
        self.key_lines: dict[Any, int] = {}
        self.has_key = False
        self.key: Any = None
        self.key_is_merge = False
        self.merges: list[dict[Any, Any]] | None = None


_Anchor = tuple[Any, int, int]  # value, node count, height


def _copy(value: Any) -> Any:
    """Deep copy of built data (depth is bounded by max_depth)."""
    if isinstance(value, dict):
        return {key: _copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy(item) for item in value]
    return value


class _YAMLBuilder:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.documents: list[Any] = []
        self.document_count = 0
        self.nodes = 0
        self.stack: list[_Frame] = []
        self.anchors: dict[str, _Anchor | None] = {}  # None: still being built

    # -- limits --------------------------------------------------------

    def _add_nodes(self, count: int, mark: Any) -> None:
        self.nodes += count
        if self.nodes > self.limits.max_nodes:
            raise InputError(
                f"more than {self.limits.max_nodes} nodes after alias expansion "
                f"(max_nodes){_at(mark)}"
            )

    def _check_depth(self, depth: int, mark: Any) -> None:
        if depth > self.limits.max_depth:
            raise InputError(
                f"body nests deeper than {self.limits.max_depth} levels (max_depth){_at(mark)}"
            )

    def _register_anchor(self, anchor: str | None, mark: Any) -> None:
        if anchor is None:
            return
        if anchor in self.anchors:
            raise InputError(f"duplicate anchor &{_show(anchor)[1:-1]}{_at(mark)}")
        self.anchors[anchor] = None

    # -- events --------------------------------------------------------

    def feed(self, event: ev.Event) -> None:
        if isinstance(event, ev.ScalarEvent):
            self._scalar(event)
        elif isinstance(event, ev.MappingStartEvent | ev.SequenceStartEvent):
            self._start(event)
        elif isinstance(event, ev.MappingEndEvent | ev.SequenceEndEvent):
            self._end()
        elif isinstance(event, ev.AliasEvent):
            self._alias(event)
        elif isinstance(event, ev.DocumentStartEvent):
            self.document_count += 1
            if self.document_count > self.limits.max_documents:
                raise InputError(
                    f"more than {self.limits.max_documents} documents in body "
                    f"(max_documents){_at(event.start_mark)}"
                )
            self.anchors = {}
            self.stack = [_DocFrame(event.start_mark)]
        elif isinstance(event, ev.DocumentEndEvent):
            frame = self.stack.pop()
            assert isinstance(frame, _DocFrame) and not self.stack
            if frame.value is not None:
                self.documents.append(frame.value)

    def _scalar(self, event: ev.ScalarEvent) -> None:
        mark = event.start_mark
        where = _at(mark)
        self._add_nodes(1, mark)
        value = event.value
        _checked_string(value, self.limits, where)
        self._register_anchor(event.anchor, mark)
        tag = event.tag
        is_merge = False
        result: Any
        if tag is not None:
            result = _tagged_scalar(tag, value, where)
        elif event.implicit[0]:
            result = _implicit_scalar(value, where)
            is_merge = value == "<<"
        else:
            result = value
        if event.anchor is not None:
            self.anchors[event.anchor] = (result, 1, 0)
        self._emit(result, 0, mark, is_merge)

    def _start(self, event: ev.MappingStartEvent | ev.SequenceStartEvent) -> None:
        mark = event.start_mark
        is_map = isinstance(event, ev.MappingStartEvent)
        tag = event.tag
        if tag is not None and tag != "!" and tag != (_MAP if is_map else _SEQ):
            raise InputError(f"unsupported YAML tag {_show(_tag_name(tag))}{_at(mark)}")
        self._check_depth(len(self.stack), mark)  # the document frame is not a level
        start = self.nodes
        self._add_nodes(1, mark)
        self._register_anchor(event.anchor, mark)
        frame: _Frame
        if is_map:
            frame = _MapFrame(event.anchor, start, mark)
        else:
            frame = _SeqFrame(event.anchor, start, mark)
        self.stack.append(frame)

    def _end(self) -> None:
        frame = self.stack.pop()
        value: Any
        if isinstance(frame, _MapFrame):
            if frame.merges is None:
                value = frame.data
            else:
                value = {}
                for merged in reversed(frame.merges):
                    value.update(merged)
                value.update(frame.data)
        else:
            assert isinstance(frame, _SeqFrame)
            value = frame.items
        height = frame.height + 1
        if frame.anchor is not None:
            self.anchors[frame.anchor] = (value, self.nodes - frame.start_nodes, height)
        self._emit(value, height, frame.mark, False)

    def _alias(self, event: ev.AliasEvent) -> None:
        mark = event.start_mark
        name = event.anchor or ""
        if name not in self.anchors:
            raise InputError(f"alias *{_show(name)[1:-1]} refers to no anchor{_at(mark)}")
        anchor = self.anchors[name]
        if anchor is None:
            raise InputError(f"alias *{_show(name)[1:-1]} refers to itself{_at(mark)}")
        value, size, height = anchor
        self._add_nodes(size, mark)
        self._check_depth(len(self.stack) - 1 + height, mark)
        self._emit(_copy(value), height, mark, False)

    def _emit(self, value: Any, height: int, mark: Any, is_merge: bool) -> None:
        """Hand a finished node to the collection (or document) that holds it."""
        parent = self.stack[-1]
        parent.height = max(parent.height, height)
        if isinstance(parent, _SeqFrame):
            parent.items.append(value)
        elif isinstance(parent, _MapFrame):
            if not parent.has_key:
                self._key(parent, value, mark, is_merge)
            else:
                self._value(parent, value, mark)
        else:
            assert isinstance(parent, _DocFrame)
            parent.value = value

    def _key(self, frame: _MapFrame, key: Any, mark: Any, is_merge: bool) -> None:
        line = mark.line + 1 if mark is not None else 0
        if is_merge:
            if frame.merges is not None:
                raise InputError(f"duplicate merge key '<<'{_at(mark)}")
            frame.merges = []
        elif isinstance(key, dict | list):
            kind = "mapping" if isinstance(key, dict) else "sequence"
            raise InputError(
                f"mapping key{_at(mark)} is a {kind}; keys must be strings, numbers, "
                "booleans or null"
            )
        elif key in frame.key_lines:
            raise InputError(
                f"duplicate key {_show(key)}{_at(mark)} (first at line {frame.key_lines[key]})"
            )
        else:
            frame.key_lines[key] = line
        frame.key = key
        frame.key_is_merge = is_merge
        frame.has_key = True

    def _value(self, frame: _MapFrame, value: Any, mark: Any) -> None:
        frame.has_key = False
        if frame.key_is_merge:
            assert frame.merges is not None
            if isinstance(value, dict):
                frame.merges.append(value)
            elif isinstance(value, list) and all(isinstance(item, dict) for item in value):
                frame.merges.extend(value)
            else:
                raise InputError(f"merge key '<<' needs a mapping or a list of mappings{_at(mark)}")
        else:
            frame.data[frame.key] = value


#: libyaml (0.2.5+) has its own nesting limit of 1000 levels, which it may hit
#: while looking ahead for a simple key, before our depth check sees the events.
_LIBYAML_DEPTH_PROBLEM = "exceeded maximum nesting depth"
_LIBYAML_MAX_DEPTH = 1000


def _yaml_error(exc: yaml.YAMLError, text: str, loader: Any, limits: Limits) -> InputError:
    if isinstance(exc, yaml.MarkedYAMLError):
        problem = exc.problem or exc.context or "malformed YAML"
        mark = exc.problem_mark or exc.context_mark
        if problem == _LIBYAML_DEPTH_PROBLEM and limits.max_depth < _LIBYAML_MAX_DEPTH:
            return InputError(
                f"body nests deeper than {limits.max_depth} levels (max_depth){_at(mark)}"
            )
        message = f"invalid YAML: {problem}{_at(mark)}"
        if exc.context and exc.problem and exc.context_mark is not None:
            message += f" ({exc.context}{_at(exc.context_mark)})"
        return InputError(message)
    if isinstance(exc, yaml.reader.ReaderError):
        position = int(exc.position)
        if _C_PARSER is not None and isinstance(loader, _C_PARSER):
            # libyaml counts bytes of the UTF-8 encoding, not characters
            position = len(text.encode("utf-8")[:position].decode("utf-8", "ignore"))
        character = exc.character
        shown = f"#x{character:04x}" if isinstance(character, int) else _show(character)
        return InputError(
            f"invalid YAML: unacceptable character {shown} ({exc.reason}) "
            f"at {_position(text, position)}"
        )
    return InputError(f"invalid YAML: {exc}")


def _load_yaml(text: str, limits: Limits) -> list[Any]:
    if text.startswith("\ufeff"):
        text = text[1:]
    builder = _YAMLBuilder(limits)
    loader: Any = None
    try:
        loader = _YAML_LOADER(text)
        while loader.check_event():
            builder.feed(loader.get_event())
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, text, loader, limits) from None
    finally:
        if loader is not None:
            loader.dispose()
    return builder.documents
