"""The YAML half of the bounded loader: an event-driven, non-recursive builder.

It never uses PyYAML's composer or constructor: it walks the parser's events
(libyaml when built, else pure Python; same checks for both) and builds plain
data itself, so depth, document count, nodes (aliases counted at full size)
and scalar size are checked before anything is built.  Typing and tag rules:
docs/architecture.md, "The document loader".
"""

from __future__ import annotations

import math
import re
from typing import Any

import yaml
import yaml.events as ev

from passguard.errors import InputError
from passguard.loader_limits import (
    Limits,
    at_mark,
    check_number_length,
    check_string,
    line_column,
    show_value,
)

#: libyaml's parser when PyYAML was built with it, else the pure-Python one.
#: Only the parser (event stream) of the loader class is used.
_YAML_LOADER: type[Any] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
try:
    from yaml._yaml import CParser as _C_PARSER
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    _C_PARSER = None  # type: ignore[assignment,misc]

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
    check_number_length(value, where)
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
            f"YAML float {show_value(value)}{where} is not allowed (only finite numbers are)"
        )
    check_number_length(value, where)
    try:
        number = float(value.replace("_", ""))
    except ValueError:  # e.g. "._"
        return _NOT_A_NUMBER
    if not math.isfinite(number):
        raise InputError(f"YAML float {show_value(value)}{where} is out of range")
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
        raise InputError(f"unsupported YAML tag {show_value(_tag_name(tag))}{where}")
    if result is not _NOT_A_NUMBER:
        return result
    raise InputError(f"value {show_value(value)}{where} is not a valid {_tag_name(tag)}")


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
                f"(max_nodes){at_mark(mark)}"
            )

    def _check_depth(self, depth: int, mark: Any) -> None:
        if depth > self.limits.max_depth:
            raise InputError(
                f"body nests deeper than {self.limits.max_depth} levels (max_depth){at_mark(mark)}"
            )

    def _register_anchor(self, anchor: str | None, mark: Any) -> None:
        if anchor is None:
            return
        if anchor in self.anchors:
            raise InputError(f"duplicate anchor &{show_value(anchor)[1:-1]}{at_mark(mark)}")
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
                    f"(max_documents){at_mark(event.start_mark)}"
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
        where = at_mark(mark)
        self._add_nodes(1, mark)
        value = event.value
        check_string(value, self.limits, where)
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
            raise InputError(f"unsupported YAML tag {show_value(_tag_name(tag))}{at_mark(mark)}")
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
            raise InputError(f"alias *{show_value(name)[1:-1]} refers to no anchor{at_mark(mark)}")
        anchor = self.anchors[name]
        if anchor is None:
            raise InputError(f"alias *{show_value(name)[1:-1]} refers to itself{at_mark(mark)}")
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
                raise InputError(f"duplicate merge key '<<'{at_mark(mark)}")
            frame.merges = []
        elif isinstance(key, dict | list):
            kind = "mapping" if isinstance(key, dict) else "sequence"
            raise InputError(
                f"mapping key{at_mark(mark)} is a {kind}; keys must be strings, numbers, "
                "booleans or null"
            )
        elif key in frame.key_lines:
            raise InputError(
                f"duplicate key {show_value(key)}{at_mark(mark)} "
                f"(first at line {frame.key_lines[key]})"
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
                raise InputError(
                    f"merge key '<<' needs a mapping or a list of mappings{at_mark(mark)}"
                )
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
                f"body nests deeper than {limits.max_depth} levels (max_depth){at_mark(mark)}"
            )
        message = f"invalid YAML: {problem}{at_mark(mark)}"
        if exc.context and exc.problem and exc.context_mark is not None:
            message += f" ({exc.context}{at_mark(exc.context_mark)})"
        return InputError(message)
    if isinstance(exc, yaml.reader.ReaderError):
        position = int(exc.position)
        if _C_PARSER is not None and isinstance(loader, _C_PARSER):
            # libyaml counts bytes of the UTF-8 encoding, not characters
            position = len(text.encode("utf-8")[:position].decode("utf-8", "ignore"))
        character = exc.character
        shown = f"#x{character:04x}" if isinstance(character, int) else show_value(character)
        return InputError(
            f"invalid YAML: unacceptable character {shown} ({exc.reason}) "
            f"at {line_column(text, position)}"
        )
    return InputError(f"invalid YAML: {exc}")


def load_yaml(text: str, limits: Limits) -> list[Any]:
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
