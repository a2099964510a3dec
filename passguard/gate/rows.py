"""One dataplane whose passthrough a change shrinks, judged on its window's traffic.

Each observed destination is replayed through the after-state
(``Effective.keeps``): ``lost`` (cut), ``unproven`` (transport or name the
evidence cannot settle), and connections no observed destination explains.
The transport and the appendMatch entry of a destination come from the
``meshpassthrough_*`` cluster that carried it. Pure: no I/O, no clock.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, field
from typing import Any, Protocol

from passguard.envoy.names import parse_route
from passguard.policy.effective import Effective
from passguard.policy.model import Match
from passguard.policy.reach import Reached
from passguard.store.destinations import DestinationView
from passguard.store.snapshot import DataplaneEvidence

MAX_LOST = 20
UNOBSERVED = "(destinations not observed)"


class Window(Protocol):
    """What a row needs of the mesh's evidence."""

    @property
    def window_seconds(self) -> float | None: ...
    @property
    def inventory(self) -> bool: ...
    @property
    def time(self) -> float: ...


@functools.lru_cache(maxsize=65_536)
def reached(address: str, routes: tuple[str, ...]) -> Reached:
    """An observed destination as the policy model sees it: ``ip:port``, and
    the transport and entry when a ``meshpassthrough_*`` cluster carried it
    (one is enough; Kuma 2.8 - 2.9.1 names say no protocol)."""
    host, _, port = address.rpartition(":")
    ip = host[1:-1] if host.startswith("[") else host
    for route in routes:
        parsed = parse_route(route)
        if parsed is None or parsed[0] is None:
            continue
        proto, value, mport = parsed
        kind = "CIDR" if "/" in value else "IP" if _is_ip(value) else "Domain"
        return Reached(ip, int(port), "tls" if proto == "tls" else "raw",
                       Match(kind, value, mport, proto))
    return Reached(ip, int(port))


def via_of(dest: DestinationView) -> tuple[str | None, Match | None]:
    """The transport and the entry a destination went by."""
    r = reached(dest.address, dest.routes)
    return r.transport, r.via


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def transport_word(transport: str | None) -> str | None:
    """``tls`` or ``tcp`` (plain) as the API and appendMatch spell them."""
    return None if transport is None else "tls" if transport == "tls" else "tcp"


@dataclass
class Row:
    """One dataplane a change alters, with what the after-state does to its traffic."""

    name: str
    before: Effective
    after: Effective
    connections: int = 0
    active: int = 0
    lost: list[tuple[str, str | None, int]] = field(default_factory=list)
    unproven: list[tuple[str, str | None, int, str]] = field(default_factory=list)
    missing: int = 0  # window connections no observed destination explains
    unknown: str | None = None
    conflict: str | None = None
    offline: bool = False

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "dataplane": self.name, "before": self.before.label(), "after": self.after.label(),
            "lost": [{"address": a, "transport": transport_word(t), "connections": c}
                     for a, t, c in self.lost[:MAX_LOST]],
            "unproven": [{"address": a, "transport": transport_word(t), "connections": c,
                          "why": w} for a, t, c, w in self.unproven[:MAX_LOST]],
        }
        if self.missing:
            out["unobserved_connections"] = self.missing
        if self.unknown:
            out["unknown"] = self.unknown
        if self.conflict:
            out["conflict"] = self.conflict
        return out


def judge_row(row: Row, d: DataplaneEvidence | None, dests: list[DestinationView],
              ev: Window) -> None:
    if row.after.conflict and row.after.conflict != row.before.conflict:
        row.conflict = row.after.conflict
    if d is None:
        row.unknown = "passguard does not watch it (no scrape target)"
        return
    conns = d.connections
    active = d.active_connections
    row.connections, row.active = conns, active
    if d.state == "offline":
        row.offline = True
        since = d.target.offline_since
        window = ev.window_seconds
        recent = since is not None and window is not None and ev.time - since < window
        if not conns and not active:
            # Offline for less than the window: it applies the change when it
            # reconnects; its evidence must cover the window to vouch for it.
            if recent and not d.covered:
                row.unknown = ("offline for less than the window and its evidence does not "
                               "cover the window: " + d.unknown_reason())
            return
    if not conns and not active:
        if d.unknown:
            row.unknown = d.unknown_reason()
        return
    explained = explained_active = 0
    for dest in dests:
        if not dest.window_connections and not dest.active:
            continue
        explained += dest.window_connections
        explained_active += dest.active
        seen = reached(dest.address, dest.routes)
        count = dest.window_connections or dest.active
        outcome = row.after.keeps(seen)
        if outcome == "cut":
            row.lost.append((dest.address, seen.transport, count))
        elif outcome == "unproven":
            row.unproven.append((dest.address, seen.transport, count, _why(row.after, seen)))
    # Connections no observed destination explains (Envoy drops idle hosts
    # from /clusters within seconds; PromQL evidence has no /clusters at all).
    if ev.inventory and d.origin == "scrape":
        missing, missing_open = max(0, conns - explained), max(0, active - explained_active)
    else:
        missing, missing_open = conns, active
    count = missing or missing_open
    if count:
        if row.after.mode == "off":
            row.lost.append((UNOBSERVED, None, count))
        else:
            row.missing = count


def _why(after: Effective, reached: Reached) -> str:
    if reached.transport is None:
        return ("the evidence does not show whether it is TLS or plain TCP, and the "
                "remaining entries keep only one of them")
    return "only a Domain or HTTP entry may keep it: IP evidence cannot prove a name or HTTP"
