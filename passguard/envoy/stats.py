"""Parse Envoy admin ``/stats`` text into passthrough counters per family.

The same parser serves a server-side filtered answer (a few hundred bytes)
and a full unfiltered body of many megabytes (the Kuma inspect API cannot
filter), so it scans with one compiled regular expression over the whole text
— the scan runs in C — and keeps only the handful of values it needs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

from passguard.envoy.names import (
    CLUSTER_STATS,
    DEFAULT_OUTBOUND_PORT,
    LISTENER_STATS,
    Family,
    family_of,
    listener_family,
    listener_pattern,
)
from passguard.errors import ScrapeError


class Counters(NamedTuple):
    """Passthrough stats of one family, summed over its clusters."""

    cx_total: int = 0
    cx_active: int = 0
    tx_bytes: int = 0
    rx_bytes: int = 0
    connect_fail: int = 0
    overflow: int = 0
    no_route: int = 0

    def __add__(self, other: tuple[object, ...]) -> Counters:
        assert isinstance(other, Counters)
        return Counters(*(a + b for a, b in zip(self, other, strict=True)))


ZERO = Counters()
_FIELD = {
    "upstream_cx_total": 0,
    "upstream_cx_active": 1,
    "upstream_cx_tx_bytes_total": 2,
    "upstream_cx_rx_bytes_total": 3,
    "upstream_cx_connect_fail": 4,
    "upstream_cx_overflow": 5,
    "downstream_cx_no_route": 6,
}


@dataclass(frozen=True, slots=True)
class StatsReading:
    """What one scrape of one proxy says about passthrough."""

    uptime: float | None
    families: dict[Family, Counters]


class StatsParser:
    """Compiled once per ``passthrough.clusters`` pattern, used for every scrape."""

    def __init__(self, clusters_pattern: str,
                 outbound_port: int = DEFAULT_OUTBOUND_PORT) -> None:
        self._listener = re.compile(
            rf"^listener\.(?P<l>{listener_pattern(clusters_pattern, outbound_port)})"
            r"\.no_filter_chain_match: (?P<v>\d+)$", re.MULTILINE)
        self._stat = re.compile(
            # Named groups: a user's pattern may carry capture groups of its own.
            rf"^(?:cluster\.(?P<cl>{clusters_pattern})\.(?P<cs>{'|'.join(CLUSTER_STATS)})"
            rf"|tcp\.(?P<tl>{clusters_pattern})\.(?P<ts>{'|'.join(LISTENER_STATS)})"
            r"): (?P<v>\d+)$",
            re.MULTILINE,
        )
        self._uptime = re.compile(r"^server\.uptime: (\d+)$", re.MULTILINE)

    def parse(self, text: str) -> StatsReading:
        """Raise ScrapeError when the text is not Envoy's ``/stats`` format."""
        m = self._uptime.search(text)
        if m is None:
            raise ScrapeError(_not_envoy(text))
        uptime = float(m.group(1))
        acc: dict[Family, list[int]] = {}
        for m in self._stat.finditer(text):
            cl = m.group("cl")
            name, stat = (cl, m.group("cs")) if cl else (m.group("tl"), m.group("ts"))
            value = m.group("v")
            fam = family_of(name)
            row = acc.get(fam)
            if row is None:
                row = acc[fam] = [0] * 7
            row[_FIELD[stat]] += int(value)
        for m in self._listener.finditer(text):
            # Refused for want of a matching chain: blocked like no_route.
            fam = listener_family(m.group("l"))
            row = acc.get(fam)
            if row is None:
                row = acc[fam] = [0] * 7
            row[_FIELD["downstream_cx_no_route"]] += int(m.group("v"))
        return StatsReading(uptime, {f: Counters(*v) for f, v in acc.items()})


def _not_envoy(text: str) -> str:
    head = text.lstrip()[:60].replace("\n", "\\n")
    if not head:
        return "empty body: not an Envoy admin /stats answer (no server.uptime)"
    return f"not an Envoy admin /stats answer (no server.uptime); body starts {head!r}"
