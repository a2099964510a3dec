"""The status page (``GET /``): server-rendered HTML, no JavaScript, readable on a phone.

It answers one question per mesh — is it safe to disable passthrough now? —
with the gate's reasons, then lists what is behind the answer: the dataplanes
with passthrough traffic, the proxies passguard cannot vouch for (stale,
failed, not watched long enough, with their error), blocked connections and
when each proxy was last scraped. The page refreshes itself (``<meta
http-equiv=refresh>``); tables turn into stacked cards on narrow screens
(CSS only). Every value that comes from a config, a proxy or a request is
HTML-escaped.

The answer per mesh:

* **NOT safe to disable passthrough now** — a dataplane of the mesh has
  passthrough traffic in the window (whatever the gate mode: in ``warn`` or
  ``audit`` mode the gate would let the change through, but it would still
  cut that traffic), or the gate would refuse the change;
* **not proven safe to disable passthrough now** — no traffic seen, but some
  dataplanes are unknown and the mesh's ``gate.on_insufficient_data`` lets
  the change through anyway;
* **safe to disable passthrough now** — the gate would allow it and every
  watched dataplane vouches for the whole window.

The reasons are the gate's own (``gate.decide.decide`` on a ``Mesh`` probe
that sets ``passthrough: false``, as ``GET /v1/meshes`` computes
``verdict_if_disabled``); the verdict shown is the one the caller passes in
``meshes`` (the ``GET /v1/meshes`` body), so page, JSON and CLI agree.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from typing import Any, Literal
from urllib.parse import quote

from passguard import __version__
from passguard.durations import format_duration
from passguard.gate import service
from passguard.gate.decide import Decision, decide
from passguard.store.snapshot import DataplaneEvidence, Snapshot
from passguard.verdicts import GatePolicy

__all__ = ["ANSWERS", "answer_for", "probe_decision", "render"]

Answer = Literal["safe", "unproven", "unsafe"]

#: The headline per mesh (tests and people look for these exact phrases).
ANSWERS: Mapping[Answer, str] = {
    "safe": "safe to disable passthrough now",
    "unproven": "not proven safe to disable passthrough now",
    "unsafe": "NOT safe to disable passthrough now",
}
_ANSWER_CLASS: Mapping[Answer, str] = {"safe": "allow", "unproven": "warn", "unsafe": "deny"}
_ORDER: Mapping[Answer, int] = {"unsafe": 0, "unproven": 1, "safe": 2}
_GATE_WORDS: Mapping[str, str] = {
    "allow": "would allow it",
    "warn": "would let it through with a warning",
    "deny": "would refuse it",
}

#: Rows per table before the page points to the JSON API instead (big meshes).
MAX_ROWS = 200
#: Bounds of the self-refresh period, in seconds.
REFRESH_MIN, REFRESH_MAX = 5, 60

_STYLE = """
:root{color-scheme:light;--fg:#1d2330;--muted:#5b6472;--line:#dde1e7;--bg:#fff;--head:#f3f5f8}
*{box-sizing:border-box}
body{font:16px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;
max-width:64rem;padding:.75rem 1rem 2rem;color:var(--fg);background:var(--bg)}
h1{font-size:1.35rem;margin:.2rem 0} h2{font-size:1.2rem;margin:0 0 .5rem}
h3{font-size:1rem;margin:1.1rem 0 .4rem}
a{color:#0b57d0} .muted{color:var(--muted)} .small{font-size:.85rem}
header p{margin:.2rem 0}
.banner{padding:.6rem .8rem;border-radius:.4rem;background:#fff1c2;color:#5c4300;margin:.8rem 0}
.mesh{border:1px solid var(--line);border-radius:.6rem;padding:.9rem 1rem;margin:1rem 0}
.answer{display:inline-block;padding:.3rem .7rem;border-radius:.4rem;font-weight:700;
font-size:1.05rem;margin:.1rem 0 .4rem}
.allow{background:#d9f5dd;color:#0a5a1f} .warn{background:#fff1c2;color:#6b4d00}
.deny{background:#fbdada;color:#8f1010}
.tag{display:inline-block;padding:0 .4rem;border-radius:.3rem;font-size:.85rem;font-weight:600}
.reasons{margin:.3rem 0 .6rem;padding-left:1.2rem} .reasons li{margin:.15rem 0}
.overview{list-style:none;padding:0;margin:.6rem 0}
.overview li{margin:.25rem 0;display:flex;flex-wrap:wrap;gap:.4rem;align-items:baseline}
table{border-collapse:collapse;width:100%;font-size:.9rem}
th,td{padding:.35rem .5rem;text-align:left;border-bottom:1px solid var(--line);
vertical-align:top}
th{background:var(--head);font-weight:600} td.num,th.num{text-align:right}
.err{color:#8f1010;overflow-wrap:anywhere}
.state-fresh{color:#0a5a1f} .state-stale,.state-failed{color:#8f1010;font-weight:600}
.state-offline{color:var(--muted)}
details{margin:.6rem 0} summary{cursor:pointer;font-weight:600}
footer{margin-top:2rem;font-size:.85rem;color:var(--muted)}
footer a{margin-right:.8rem}
@media (max-width:40rem){
 body{padding:.5rem .6rem 1.5rem} .mesh{padding:.7rem .7rem}
 table.cards thead{display:none}
 table.cards,table.cards tbody,table.cards tr,table.cards td{display:block;width:100%}
 table.cards tr{border:1px solid var(--line);border-radius:.4rem;margin:.5rem 0;
 padding:.2rem .4rem}
 table.cards td{border:0;padding:.2rem 0;display:flex;gap:.8rem;justify-content:space-between;
 text-align:right}
 table.cards td::before{content:attr(data-label);font-weight:600;color:var(--muted);
 text-align:left;flex:none}
 table.cards td.num{text-align:right}
}
"""


# --------------------------------------------------------------------------- the answer


def probe_decision(snap: Snapshot, mesh: str, states: service.States | None = None,
                   now: float | None = None) -> Decision:
    """The gate's decision for ``passthrough: false`` on ``mesh`` now, in enforce mode
    with ``on_insufficient_data: deny``: its reasons and evidence do not depend on
    the mesh's policy (the policy only caps the verdict)."""
    return decide(service.mesh_off(mesh), service.evidence_of(snap, mesh, states, now),
                  GatePolicy(mode="enforce", on_insufficient_data="deny"), snap.memo)


def answer_for(gate_verdict: str, probe: Decision) -> Answer:
    """The headline: the mesh's real gate verdict, corrected by the facts."""
    with_traffic = (probe.evidence or {}).get("dataplanes", {}).get("with_traffic", 0)
    if with_traffic or gate_verdict == "deny":
        return "unsafe"
    if probe.verdict != "allow":
        return "unproven"  # unknowns, and on_insufficient_data lets it through
    return "safe"


# --------------------------------------------------------------------------- helpers


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _plural(n: object, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _ts(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t)) if t else "never"


def _age(t: float | None, now: float) -> str:
    if not t:
        return "never"
    seconds = max(0.0, now - t)
    if seconds < 1:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def _when(t: float | None, now: float) -> str:
    """``<time>`` with the age as text and the UTC time as tooltip."""
    if not t:
        return "never"
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
    return f"<time datetime='{iso}' title='{_e(_ts(t))}'>{_e(_age(t, now))}</time>"


def _refresh_seconds(interval: float) -> int:
    return int(min(REFRESH_MAX, max(REFRESH_MIN, math.ceil(interval))))


def _table(columns: Sequence[tuple[str, bool]], rows: Iterable[Sequence[str]],
           total: int, more_href: str) -> str:
    """A table that becomes cards on a phone. ``columns``: (label, numeric);
    cells are already-escaped HTML."""
    head = "".join(f"<th scope=col{' class=num' if num else ''}>{_e(label)}</th>"
                   for label, num in columns)
    out = [f"<table class=cards><thead><tr>{head}</tr></thead><tbody>"]
    shown = 0
    for row in rows:
        if shown == MAX_ROWS:
            break
        shown += 1
        cells = "".join(
            f"<td data-label='{_e(label)}'{' class=num' if num else ''}>{cell}</td>"
            for (label, num), cell in zip(columns, row, strict=True))
        out.append(f"<tr>{cells}</tr>")
    out.append("</tbody></table>")
    if total > shown:
        out.append(f"<p class='muted small'>{total - shown} more: see "
                   f"<a href='{_e(more_href)}'>{_e(more_href)}</a>.</p>")
    return "".join(out)


def _mesh_href(mesh: str) -> str:
    return "/v1/meshes/" + quote(mesh, safe="")


def _anchor(mesh: str) -> str:
    return "mesh-" + quote(mesh, safe="")


def _state(d: DataplaneEvidence) -> str:
    state = d.state if d.state in ("fresh", "stale", "failed", "offline") else "unknown"
    return f"<span class='state-{state}'>{_e(d.state)}</span>"


# --------------------------------------------------------------------------- sections


def _mesh_section(snap: Snapshot, m: Mapping[str, Any], now: float,
                  states: service.States | None) -> tuple[str, Answer]:
    mesh = str(m["mesh"])
    gate = str(m.get("verdict_if_disabled", "deny"))
    probe = probe_decision(snap, mesh, states, now)
    answer = answer_for(gate, probe)
    dps = snap.for_mesh(mesh)
    counts = m.get("dataplanes", {})
    window = _window_words(snap.window_seconds)
    href = _mesh_href(mesh)

    gate_words = _GATE_WORDS.get(gate, f"would answer {gate}")
    mode = m.get("mode")
    mode_words = f" ({_e(mode)} mode)" if mode else ""
    parts = [
        f"<section class=mesh id='{_e(_anchor(mesh))}' data-mesh='{_e(mesh)}' "
        f"data-answer='{answer}'>",
        f"<h2>Mesh {_e(mesh)}</h2>",
        f"<p><span class='answer {_ANSWER_CLASS[answer]}'>{_e(ANSWERS[answer])}</span></p>",
        f"<p class=gate>If <code>passthrough: false</code> were applied now, the gate "
        f"{_e(gate_words)}{mode_words}.</p>",
        "<ul class=reasons>",
        *(f"<li>{_e(reason)}</li>" for reason in probe.reasons),
        "</ul>",
        f"<p class='muted small'>{_plural(counts.get('total', len(dps)), 'dataplane')}: "
        f"{counts.get('fresh', 0)} fresh, {counts.get('stale', 0)} stale, "
        f"{counts.get('failed', 0)} failed, {counts.get('offline', 0)} offline · "
        f"{_plural(m.get('connections', 0), 'passthrough connection')} {_e(window)}, "
        f"{m.get('active_connections', 0)} open now, "
        f"{m.get('blocked_connections', 0)} blocked · "
        f"<a href='{_e(href)}'>JSON</a></p>",
    ]

    parts.extend(_dataplane_tables(dps, window, href, now))
    parts.append("</section>")
    return "".join(parts), answer


def _dataplane_tables(dps: Sequence[DataplaneEvidence], window: str, href: str,
                      now: float) -> list[str]:
    """A mesh's blocked-connections banner, then its busy, unknown and all
    dataplanes as tables."""
    parts: list[str] = []
    blocked = sorted((d for d in dps if d.blocked_connections), key=_busiest_blocked)
    if blocked:
        parts.append(
            "<p class='banner'><strong>Blocked connections:</strong> passthrough listeners "
            f"refused {sum(d.blocked_connections for d in blocked)} connections {_e(window)} "
            "(something still needs passthrough where it is already off): "
            + _e(", ".join(f"{d.target.dataplane} ({d.blocked_connections})"
                           for d in blocked[:10]))
            + (f" and {len(blocked) - 10} more" if len(blocked) > 10 else "") + ".</p>")

    busy = sorted((d for d in dps if d.has_traffic), key=_busiest)
    parts.append(f"<h3>Dataplanes with passthrough traffic ({len(busy)})</h3>")
    if busy:
        parts.append(_table(
            [("dataplane", False), ("service", False), ("connections", True),
             ("open now", True), ("blocked", True), ("last scrape", False)],
            ([_e(d.target.dataplane), _e(d.target.service or "-"), str(d.connections),
              str(d.active_connections), str(d.blocked_connections),
              _when(d.last_success, now)] for d in busy),
            len(busy), href))
    else:
        parts.append(f"<p class=muted>None {_e(window)}.</p>")

    problems = sorted((d for d in dps if d.unknown), key=lambda d: d.target.dataplane)
    parts.append(f"<h3>Proxies passguard cannot vouch for ({len(problems)})</h3>")
    if problems:
        parts.append(_table(
            [("dataplane", False), ("service", False), ("state", False), ("why", False),
             ("last success", False), ("last attempt", False)],
            ([_e(d.target.dataplane), _e(d.target.service or "-"), _state(d),
              f"<span class=err>{_e(d.unknown_reason())}</span>",
              _when(d.last_success, now), _when(d.last_attempt, now)] for d in problems),
            len(problems), href))
    else:
        parts.append("<p class=muted>None: every online proxy is fresh and covers the "
                     "window.</p>")

    ordered = sorted(dps, key=lambda d: d.target.dataplane)
    parts.append(f"<details><summary>All {_plural(len(ordered), 'dataplane')}</summary>")
    parts.append(_table(
        [("dataplane", False), ("service", False), ("state", False), ("connections", True),
         ("open now", True), ("blocked", True), ("last scrape", False), ("note", False)],
        ([_e(d.target.dataplane), _e(d.target.service or "-"), _state(d), str(d.connections),
          str(d.active_connections), str(d.blocked_connections), _when(d.last_success, now),
          f"<span class=err>{_e(d.unknown_reason())}</span>" if d.unknown
          else _e(d.error or "")] for d in ordered),
        len(ordered), href))
    parts.append("</details>")
    return parts


def _busiest(d: DataplaneEvidence) -> tuple[int, int, str]:
    return (-d.connections, -d.active_connections, d.target.dataplane)


def _busiest_blocked(d: DataplaneEvidence) -> tuple[int, str]:
    return (-d.blocked_connections, d.target.dataplane)


def _window_words(window: float | None) -> str:
    return f"in the last {format_duration(window)}" if window else "since the proxies started"


def _destinations_section(destinations: Sequence[Mapping[str, Any]], now: float) -> str:
    """External destinations seen through passthrough (``GET /v1/destinations`` items)."""
    parts = ["<section id=destinations>",
             f"<h2>External destinations ({len(destinations)})</h2>"]
    if not destinations:
        parts.append("<p class=muted>No external destination seen through passthrough.</p>")
    else:
        def last_seen(value: Any) -> str:
            if isinstance(value, int | float):
                return _when(float(value), now)
            return _e(value) if value else "-"

        parts.append(_table(
            [("mesh", False), ("dataplane", False), ("address", False), ("connections", True),
             ("last seen", False)],
            ([_e(d.get("mesh", "")), _e(d.get("dataplane", "")), _e(d.get("address", "")),
              _e(d.get("connections", "")), last_seen(d.get("last_seen"))]
             for d in destinations),
            len(destinations), "/v1/destinations"))
    parts.append("</section>")
    return "".join(parts)


# --------------------------------------------------------------------------- page


def render(snap: Snapshot, meshes: Mapping[str, Any], interval: float, *,
           destinations: Sequence[Mapping[str, Any]] | None = None,
           now: float | None = None, states: service.States | None = None,
           extra: Sequence[str] = ()) -> str:
    """The whole page.

    ``meshes`` is the ``GET /v1/meshes`` body (its ``verdict_if_disabled`` is the
    verdict shown); ``interval`` the scrape interval (the page refreshes at that
    pace, within 5–60 s); ``destinations`` the ``GET /v1/destinations`` items,
    shown when given (None: no destinations section); ``now`` for tests;
    ``extra``: more sections, already HTML (shadow policies, 3.0 readiness),
    after the destinations."""
    now = time.time() if now is None else now
    refresh = _refresh_seconds(interval)
    sections: list[str] = []
    overview: list[str] = []
    rendered = []
    for m in meshes.get("meshes", []):
        html, answer = _mesh_section(snap, m, now, states)
        rendered.append((_ORDER[answer], str(m["mesh"]), answer, html, m))
    # What needs attention first: not safe, then not proven, then safe meshes.
    rendered.sort(key=lambda r: (r[0], r[1]))
    unsafe = 0
    for _, mesh, answer, html, m in rendered:
        sections.append(html)
        unsafe += answer != "safe"
        overview.append(
            f"<li><a href='#{_e(_anchor(mesh))}'>{_e(mesh)}</a> "
            f"<span class='tag {_ANSWER_CLASS[answer]}'>{_e(ANSWERS[answer])}</span> "
            f"<span class='muted small'>"
            f"{_plural(m.get('connections', 0), 'connection')}, "
            f"{_plural(m.get('dataplanes', {}).get('total', 0), 'dataplane')}</span></li>")

    total = len(sections)
    title = (f"passguard: {unsafe} of {total} meshes not safe to disable passthrough"
             if total else "passguard")
    window = snap.window_seconds
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        "<meta name=viewport content='width=device-width,initial-scale=1'>",
        f"<meta http-equiv=refresh content='{refresh}'>",
        "<meta name=robots content=noindex>",
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>",
        "<header><h1>passguard — is it safe to disable passthrough?</h1>",
        f"<p class='muted small'>Evidence window: "
        f"{_e(format_duration(window) if window else 'since each proxy started')} · "
        f"last scrape cycle: {_when(snap.time or None, now)} "
        f"<span title='{_e(_ts(snap.time or None))}'>({_e(_ts(snap.time or None))})</span> · "
        f"this page refreshes every {refresh}s</p></header>",
    ]
    if not snap.ready:
        parts.append("<p class=banner><strong>Not ready:</strong> no scrape cycle has finished "
                     "yet; answers below are not evidence.</p>")
    if total:
        parts.append("<nav aria-label=meshes><ul class=overview>")
        parts.extend(overview)
        parts.append("</ul></nav>")
    else:
        parts.append("<p>No dataplanes are configured: add <code>sources</code> to the "
                     "configuration.</p>")
    parts.extend(sections)
    if destinations is not None:
        parts.append(_destinations_section(destinations, now))
    parts.extend(extra)
    parts.append(
        f"<footer>passguard {_e(__version__)} · "
        "<a href='/metrics'>Prometheus metrics</a>"
        "<a href='/v1/meshes'>JSON API (/v1/meshes)</a>"
        "<a href='/-/ready'>readiness</a></footer></body></html>")
    return "".join(parts)
