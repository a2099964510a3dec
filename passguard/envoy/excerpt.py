"""The start of a scraped answer, made safe for one log line.

What a target answers is never shown by the API, the status page or a
decision (a dataplane's metrics address comes from the Dataplane object, so
the "target" may be any internal service, and echoing its answer would make
passguard a reader of it). The log is where an operator looks for it: cut to
a few hundred characters, and with control characters escaped, so the
answer cannot forge log lines or move a terminal's cursor.
"""

from __future__ import annotations

#: Characters of an answer kept for the log: enough to recognise a login page
#: or a wrong service, too few to copy a document out through the log.
LOG_CHARS = 200


def for_log(data: str | bytes, limit: int = LOG_CHARS) -> str:
    """``data`` cut to ``limit`` characters, every non-printable character
    (and the backslash) escaped as Python does in a string literal."""
    text = data.decode("utf-8", "backslashreplace") if isinstance(data, bytes) else data
    cut = len(text) > limit
    out = []
    for ch in text[:limit]:
        if ch == "\\":
            out.append("\\\\")
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(repr(ch)[1:-1])  # '\n' -> \n, '\x1b' -> \x1b, '\u202e' -> \u202e
    return "".join(out) + (f"... ({len(text)} characters)" if cut else "")
