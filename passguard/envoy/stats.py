"""Parse Envoy admin ``/stats`` text into passthrough counters per family.

The same parser serves a server-side filtered answer (a few hundred bytes)
and a full unfiltered body of many megabytes (the Kuma inspect API cannot
filter), so it scans with one compiled regular expression over the whole text
— the scan runs in C — and keeps only the handful of values it needs.
"""

from __future__ import annotations

import itertools
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
# Envoy's counters and gauges are 64-bit: at most 20 decimal digits. A longer
# run is not Envoy (and past 4,300 digits int() itself refuses).
MAX_DIGITS = 20


def counter(text: str, what: str) -> int:
    """A stat value from Envoy text, or ScrapeError when it cannot be one."""
    if len(text) > MAX_DIGITS:
        raise ScrapeError(f"{what}: a {len(text)}-digit value is not a 64-bit Envoy stat")
    return int(text)
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
        # One pattern for every line passguard wants. Named groups: a user's
        # pattern may carry capture groups of its own.
        line = (
            rf"(?:cluster\.(?P<cl>{clusters_pattern})\.(?P<cs>{'|'.join(CLUSTER_STATS)})"
            rf"|tcp\.(?P<tl>{clusters_pattern})\.(?P<ts>{'|'.join(LISTENER_STATS)})"
            rf"|listener\.(?P<ll>{listener_pattern(clusters_pattern, outbound_port)})"
            r"\.no_filter_chain_match"
            r"|server\.(?P<up>uptime)"
            r"): (?P<v>\d+)$"
        )
        # Searching for the literal "\n" that starts each line lets `re` skip
        # ahead; a `^` anchor under MULTILINE is tried at every character,
        # which made a full inspect-API body (tens of MB) ~12x slower. The
        # first line, which no newline precedes, is matched on its own.
        self._lines = re.compile("\n" + line, re.MULTILINE)
        self._first = re.compile(line, re.MULTILINE)

    def parse(self, text: str) -> StatsReading:
        """Raise ScrapeError when the text is not Envoy's ``/stats`` format."""
        uptime: float | None = None
        acc: dict[Family, list[int]] = {}
        first = self._first.match(text)
        for m in itertools.chain((first,) if first else (), self._lines.finditer(text)):
            if m.group("up"):
                uptime = float(counter(m.group("v"), "server.uptime"))
                continue
            cl = m.group("cl")
            if cl:
                fam, field = family_of(cl), _FIELD[m.group("cs")]
            elif m.group("tl"):
                fam, field = family_of(m.group("tl")), _FIELD[m.group("ts")]
            else:
                # Refused for want of a matching chain: blocked like no_route.
                fam, field = listener_family(m.group("ll")), _FIELD["downstream_cx_no_route"]
            row = acc.get(fam)
            if row is None:
                row = acc[fam] = [0] * 7
            row[field] += counter(m.group("v"), "a passthrough stat")
        if uptime is None:
            raise ScrapeError(_not_envoy(text), text[:1024])
        return StatsReading(uptime, {f: Counters(*v) for f, v in acc.items()})


def _not_envoy(text: str) -> str:
    # What failed, never what was said: the answer is for the log only
    # (ScrapeError.answer), since a target may be some other service.
    if not text.strip():
        return "empty body: not an Envoy admin /stats answer (no server.uptime)"
    return (f"not an Envoy admin /stats answer (no server.uptime in {len(text)} characters; "
            "the start of the answer is in the log)")
