"""The status page's "Ready for Kuma 3.0?" panel, one line per mesh.

Rendered from the ``GET /v1/readiness?to=3.0`` body, so the page and the API
never disagree; the details (documents to apply) stay in the API and in
``passguard upgrade-check``.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

_WORDS = {"ready": ("ready", "allow"), "not_ready": ("not ready", "deny"),
          "unknown": ("cannot tell", "warn")}


def render(body: Mapping[str, Any]) -> str:
    e = html.escape
    to = str(body.get("to", "3.0"))
    src = body.get("source", {})
    rows = []
    for m in body.get("meshes", []):
        word, cls = _WORDS.get(str(m.get("status")), ("?", "warn"))
        why = "; ".join(str(r) for r in m.get("reasons", [])[:3])
        rows.append(f"<tr><td data-label=Mesh>{e(str(m['mesh']))}</td>"
                    f"<td data-label='Ready for {e(to)}?'><span class='tag {cls}'>"
                    f"{e(word)}</span></td><td data-label=Why class=small>{e(why)}</td></tr>")
    if not rows:
        rows.append("<tr><td colspan=3 class=muted>No mesh known.</td></tr>")
    return (f"<section id=readiness class=mesh><h2>Ready for Kuma {e(to)}?</h2>"
            "<p class='muted small'>Each dataplane's passthrough traffic in the window judged "
            f"under Kuma {e(to)}'s rules (source: {e(str(src.get('repository', '')))} "
            f"{e(str(src.get('commit', ''))[:12])}), both where no policy means passthrough "
            "on and where it means None (kumahq/kuma#18801). Details and the documents that "
            f"fix it: <a href='/v1/readiness?to={e(to)}'>/v1/readiness?to={e(to)}</a> or "
            f"<code>passguard upgrade-check --to {e(to)}</code>.</p>"
            "<table class=cards><thead><tr><th scope=col>Mesh</th>"
            f"<th scope=col>Ready for {e(to)}?</th><th scope=col>Why</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table></section>")
