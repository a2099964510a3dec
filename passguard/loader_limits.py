"""The bounds of one loaded body and the checks the JSON and YAML readers share.

:class:`Limits` caps what a body may expand to; every helper here answers
with :class:`passguard.errors.InputError`, never another exception, and
renders hostile values short and printable (docs/architecture.md, "The
document loader").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from passguard.errors import InputError

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



def show_value(value: object, limit: int = 80) -> str:
    """A short, printable rendering of a (hostile) value for messages."""
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def line_column(text: str, index: int) -> str:
    line = text.count("\n", 0, index) + 1
    column = index - (text.rfind("\n", 0, index) + 1) + 1
    return f"line {line} column {column}"


def at_mark(mark: Any) -> str:
    if mark is None:
        return ""
    return f" at line {mark.line + 1} column {mark.column + 1}"


def check_string(value: str, limits: Limits, where: str) -> None:
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


def check_number_length(literal: str, where: str) -> None:
    if len(literal) > MAX_NUMBER_CHARS:
        raise InputError(
            f"number literal of {len(literal)} characters{where} is longer than "
            f"{MAX_NUMBER_CHARS} characters"
        )


# --------------------------------------------------------------------------
