"""Durations as the config and the messages spell them: ``500ms``, ``15s``, ``15m``, ``1h``."""

from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(\d{1,9}(?:\.\d{1,9})?)\s*(ms|s|m|h|d)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: str) -> float:
    """``"15s"`` → 15.0 seconds. Raises ValueError with the accepted form."""
    m = _DURATION.match(value)
    if not m:
        raise ValueError(f"{excerpt(value)} is not a duration (use e.g. 500ms, 15s, 15m, 1h, "
                         "90d)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def excerpt(value: object) -> str:
    """A value for an error message: quoted, and cut when it is long."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def format_duration(seconds: float) -> str:
    """The inverse for messages: 900 → ``15m``, 90 → ``90s``, 5400 → ``90m``."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{seconds:g}s"
