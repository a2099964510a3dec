"""Bounds for values that come from a request, before they reach the audit, a log or a metric.

A request may carry names and reasons of up to ``limits.max_scalar_bytes``
(256 KiB) each. Stored whole, five admission requests made a 5 MB audit page
and a 600 KB log line. Here each kind of field has a cap in UTF-8 bytes; a
value over it keeps its head and ends with the SHA-256 of the *whole* value,
so two different long values stay told apart and an operator holding the
original can prove which one it was. The result, marker included, fits the
cap.
"""

from __future__ import annotations

import hashlib
import re

#: Kubernetes object names (DNS subdomains) are 253 characters at most; so are
#: mesh names, which are Kubernetes object names too.
NAME_BYTES = 253
#: Kubernetes user names have no limit of their own; 256 bytes holds every
#: real one (service accounts: ``system:serviceaccount:<ns>:<name>``).
USER_BYTES = 256
#: An audit's ``requester``: a user name and who vouched for it
#: (``alice via cert:kube-apiserver``); the user name is capped on its own
#: first, so its digest is the user name's.
REQUESTER_BYTES = USER_BYTES + 256
#: A break-glass reason, a reason or a warning of a decision.
REASON_BYTES = 1024
#: A log line's message at most; the rest is cut and marked.
LOG_LINE_BYTES = 4096

_MARK = "…[sha256:{}]"
_MARK_BYTES = len(_MARK.format("0" * 64).encode())
# C0 and C1 controls, DEL, and the Unicode line and paragraph separators:
# anything a terminal or a log reader may take as the end of a line.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def cap(value: str, limit: int) -> str:
    """``value`` if it fits in ``limit`` UTF-8 bytes; otherwise its head, cut
    on a character boundary, and the SHA-256 of the whole value."""
    raw = value.encode("utf-8", "surrogatepass")
    if len(raw) <= limit:
        return value
    digest = hashlib.sha256(raw).hexdigest()
    head = raw[:max(0, limit - _MARK_BYTES)].decode("utf-8", "ignore")
    return head + _MARK.format(digest)


def cap_optional(value: str | None, limit: int) -> str | None:
    return None if value is None else cap(value, limit)


def _escape(match: re.Match[str]) -> str:
    ch = match.group()
    named = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(ch)
    if named is not None:
        return named
    return f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}"


def escape_controls(text: str) -> str:
    """Control characters as visible escapes (``\\n``, ``\\x1b``): one log
    record stays one line, and a value cannot forge a line of its own."""
    return _CONTROL.sub(_escape, text)


def log_safe(text: str, limit: int = LOG_LINE_BYTES) -> str:
    """A message as it may go into a log line: escaped, then capped."""
    return cap(escape_controls(text), limit)


__all__ = ["LOG_LINE_BYTES", "NAME_BYTES", "REASON_BYTES", "REQUESTER_BYTES", "USER_BYTES", "cap",
           "cap_optional", "escape_controls", "log_safe"]
