"""The status page: server-rendered HTML, no JavaScript, readable on a phone.

It answers one question per mesh — is it safe to disable passthrough now? —
with the reasons, and lists the proxies behind the answer.
"""

from __future__ import annotations

import time
from html import escape
from typing import Any

from passguard import __version__
from passguard.config import format_duration
from passguard.store.snapshot import Snapshot

_STYLE = """
body{font-family:system-ui,sans-serif;margin:0 auto;max-width:60rem;padding:1rem;color:#222}
h1{font-size:1.4rem} h2{font-size:1.15rem;margin-top:2rem}
table{border-collapse:collapse;width:100%;font-size:.9rem} td,th{padding:.3rem .5rem;
text-align:left;border-bottom:1px solid #ddd} th{background:#f4f4f4}
.verdict{display:inline-block;padding:.2rem .6rem;border-radius:.3rem;font-weight:bold}
.allow{background:#d4f4d4;color:#064} .warn{background:#fff1c2;color:#750}
.deny{background:#fbd5d5;color:#900} .state-failed,.state-stale{color:#900}
.wrap{overflow-x:auto} footer{margin-top:2rem;font-size:.8rem;color:#666}
"""

_ANSWER = {"allow": "safe to disable passthrough now",
           "warn": "disabling passthrough now would be allowed with a warning",
           "deny": "NOT safe to disable passthrough now"}


def _ts(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t)) if t else "never"


def render(snap: Snapshot, meshes: dict[str, Any], interval: float) -> str:
    window = snap.window_seconds
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        "<meta name=viewport content='width=device-width,initial-scale=1'>",
        f"<meta http-equiv=refresh content='{max(5, int(interval))}'>",
        f"<title>passguard</title><style>{_STYLE}</style></head><body>",
        "<h1>passguard — passthrough readiness</h1>",
        f"<p>Window: {format_duration(window) if window else 'since proxy start'}. "
        f"Last cycle: {_ts(snap.time or None)}.</p>",
    ]
    if not snap.ready:
        parts.append("<p><strong>Not ready:</strong> no scrape cycle has finished yet.</p>")
    if not meshes["meshes"]:
        parts.append("<p>No dataplanes are configured.</p>")
    for m in meshes["meshes"]:
        mesh, verdict = m["mesh"], m["verdict_if_disabled"]
        dps = sorted(snap.for_mesh(mesh), key=lambda d: (-d.connections, d.target.dataplane))
        counts = m["dataplanes"]
        parts.append(f"<section id='mesh-{escape(mesh)}'><h2>Mesh {escape(mesh)}</h2>")
        parts.append(f"<p><span class='verdict {verdict}'>{escape(_ANSWER[verdict])}</span></p>")
        parts.append(
            f"<p>{counts['total']} dataplanes: {counts['fresh']} fresh, {counts['stale']} stale, "
            f"{counts['failed']} failed, {counts['offline']} offline; "
            f"{counts['with_traffic']} with passthrough traffic, {counts['unknown']} unknown. "
            f"{m['connections']} passthrough connections in the window, "
            f"{m['active_connections']} open now, {m['blocked_connections']} blocked.</p>")
        parts.append("<div class=wrap><table><tr><th>dataplane</th><th>service</th><th>state</th>"
                     "<th>connections</th><th>open</th><th>blocked</th><th>last scrape</th>"
                     "<th>note</th></tr>")
        for d in dps:
            note = d.unknown_reason() if d.unknown else ""
            parts.append(
                f"<tr class='dp'><td>{escape(d.target.dataplane)}</td>"
                f"<td>{escape(d.target.service)}</td>"
                f"<td class='state-{d.state}'>{d.state}</td><td>{d.connections}</td>"
                f"<td>{d.active_connections}</td><td>{d.blocked_connections}</td>"
                f"<td>{_ts(d.last_success)}</td><td>{escape(note)}</td></tr>")
        parts.append("</table></div></section>")
    parts.append(f"<footer>passguard {escape(__version__)} · <a href='/metrics'>metrics</a> · "
                 "<a href='/v1/meshes'>JSON API</a></footer></body></html>")
    return "".join(parts)
