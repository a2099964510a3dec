"""A failed validation of the config schema as ``key.path: message`` lines.

pydantic's locations carry the discriminated union's tag (``sources.0.kuma.url``):
the type walk drops it and finds the model an unknown key was met in, to
list the keys it knows.
"""

from __future__ import annotations

from types import NoneType, UnionType
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from passguard.config_fields import PROBLEMS, type_name

SOURCE_KINDS = ("envoy", "kuma", "prometheus")


def _unwrap(t: Any) -> Any:
    while True:
        if get_origin(t) is Annotated:
            t = get_args(t)[0]
        elif get_origin(t) in (Union, UnionType) and NoneType in get_args(t):
            rest = [a for a in get_args(t) if a is not NoneType]
            t = rest[0] if len(rest) == 1 else Union[tuple(rest)]  # noqa: UP007
        else:
            return t


def _walk(root: Any, loc: tuple[str | int, ...]) -> tuple[list[str | int], Any]:
    """The shown path of an error's location (the union tags dropped), and the
    type found there."""
    shown: list[str | int] = []
    t: Any = root
    for part in loc:
        t = _unwrap(t)
        if get_origin(t) in (Union, UnionType):  # the discriminated sources: part is the tag
            t = next((m for m in get_args(t) if get_args(
                m.model_fields["kind"].annotation) == (part,)), None)
            continue
        shown.append(part)
        if isinstance(t, type) and issubclass(t, BaseModel):
            field = t.model_fields.get(str(part))
            t = field.annotation if field is not None else None
        elif get_origin(t) in (list, tuple):
            t = get_args(t)[0]
        elif get_origin(t) is dict:
            t = get_args(t)[1]
        else:
            t = None
    return shown, _unwrap(t)


def join(prefix: str, parts: list[str | int] | tuple[str | int, ...]) -> str:
    out = prefix
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _known(model: Any) -> str:
    if isinstance(model, type) and issubclass(model, BaseModel):
        return f" (known keys: {', '.join(sorted(model.model_fields))})"
    return ""


def _message(err: Any, shown: list[str | int], at: Any, parent: Any) -> tuple[list[str | int],
                                                                              str]:
    kind, value = err["type"], err.get("input")
    if kind in ("extra_forbidden", "invalid_key"):
        if kind == "invalid_key":
            shown = [*shown[:-1], str(value)]
        return shown, f"unknown key{_known(parent)}"
    if kind == "missing":
        return shown, "is required"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return shown, f"must be a mapping, got {type_name(value)}"
    if kind in ("list_type", "tuple_type"):
        return shown, f"must be a list, got {type_name(value)}"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        kinds = ", ".join(repr(k) for k in SOURCE_KINDS[:-1]) + f" or {SOURCE_KINDS[-1]!r}"
        tag = value.get("kind") if isinstance(value, dict) else None
        return [*shown, "kind"], f"must be {kinds}, got {tag!r}"
    if shown and shown[-1] == "[key]":
        return shown[:-1], f"keys must be strings, got {type_name(value)}"
    return shown, str(err["msg"])


def problems(exc: ValidationError, root: Any, prefix: str = "") -> list[str]:
    """One ``key.path: message`` line per problem of a failed validation."""
    out: list[str] = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        shown, at = _walk(root, loc)
        if err["type"] == PROBLEMS:
            for sub, message in err["ctx"]["problems"]:
                path = join(prefix, [*shown, *sub])
                out.append(f"{path}: {message}" if path else message)
            continue
        _, parent = _walk(root, loc[:-1]) if loc else (None, root)
        shown, message = _message(err, shown, at, parent)
        path = join(prefix, shown)
        out.append(f"{path}: {message}" if path else message)
    return out
