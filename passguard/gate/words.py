"""The gate's words: counts, name lists and what a document does, bounded."""

from __future__ import annotations

from passguard.documents import Resource
from passguard.durations import format_duration

MAX_NAMED = 10


def names(items: list[tuple[str, int]]) -> str:
    items = sorted(items, key=lambda x: (-x[1], x[0]))
    text = ", ".join(f"{n} ({c})" for n, c in items[:MAX_NAMED])
    if len(items) > MAX_NAMED:
        text += f" and {len(items) - MAX_NAMED} more"
    return text


def n(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def window_words(window: float | None) -> str:
    if window is None:
        return "since the proxies started"
    return f"in the last {format_duration(window)}"


def effect_words(r: Resource, operation: str, exact: bool) -> str:
    assumed = "" if exact else " (previous state assumed enabled)"
    if r.kind == "Mesh":
        if operation == "DELETE":
            return f"deletes Mesh {r.name}"
        if r.mode == "None":
            return f"disables passthrough for the whole mesh{assumed}"
        return "enables passthrough for the whole mesh (where no MeshPassthrough applies)"
    scope = r.target_ref.words()
    if operation == "DELETE":
        return (f"deletes MeshPassthrough {r.name} ({scope}): its dataplanes fall back to "
                "the other policies or the Mesh flag")
    mode = r.mode or "unset (the version's default)"
    extra = f", {len(r.matches)} appendMatch entries" if r.matches else ""
    return f"sets passthroughMode {mode} for {scope}{extra}{assumed}"
