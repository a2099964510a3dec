"""The per-dataplane part of ``GET /metrics``, rendered straight from a snapshot.

Each dataplane's lines are written (one f-string per series, label values
escaped once) when its evidence is computed, that is when its scrape is
recorded (:meth:`Lines.warm`), and kept while that evidence is the one
published; a render then only joins them, and its result is kept until the
snapshot changes. Invariant: the bytes are exactly what prometheus_client's
encoders (text 0.0.4, OpenMetrics, every name escaping) write for the same
families (``tests/unit/test_exposition.py`` holds the library as the oracle).
Destinations are never labels here (cardinality): they live in the JSON API.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.openmetrics.exposition import escape_label_name
from prometheus_client.openmetrics.exposition import generate_latest as om_generate_latest
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString as _go_float

from passguard.envoy.stats import Counters
from passguard.pacing import Pace, one_turn, turn
from passguard.store.snapshot import STATES, DataplaneEvidence, Snapshot, mesh_summary


@dataclass(frozen=True, slots=True)
class Family:
    name: str
    type: str  # "counter" | "gauge"
    help: str


CONNECTIONS = Family("passguard_passthrough_connections", "counter",
                     "Connections opened through the passthrough clusters "
                     "(Envoy upstream_cx_total)")
ACTIVE = Family("passguard_passthrough_active_connections", "gauge",
                "Passthrough connections open at the latest scrape")
BYTES = Family("passguard_passthrough_bytes", "counter", "Bytes through the passthrough clusters")
BLOCKED = Family("passguard_passthrough_blocked_connections", "counter",
                 "Connections refused by the passthrough listener (downstream_cx_no_route)")
FAILURES = Family("passguard_passthrough_connect_failures", "counter",
                  "Passthrough upstream connect failures")
OVERFLOW = Family("passguard_passthrough_overflow", "counter",
                  "Passthrough circuit breaker overflows")
UP = Family("passguard_target_up", "gauge", "1 if the last scrape succeeded")
DURATION = Family("passguard_target_scrape_duration_seconds", "gauge",
                  "Duration of the last scrape")
LAST_OK = Family("passguard_last_successful_scrape_timestamp_seconds", "gauge",
                 "Unix time of the last successful scrape")
WINDOW = Family("passguard_mesh_passthrough_connections_window", "gauge",
                "Passthrough connections inside the gate window")
STATES_FAMILY = Family("passguard_mesh_dataplanes", "gauge", "Dataplanes by scrape state")

#: The per-family counters and the series each one feeds, in output order.
COUNTER_SERIES: tuple[tuple[Family, Callable[[Counters], int]], ...] = (
    (CONNECTIONS, lambda c: c.cx_total),
    (ACTIVE, lambda c: c.cx_active),
    (BLOCKED, lambda c: c.no_route),
    (FAILURES, lambda c: c.connect_fail),
    (OVERFLOW, lambda c: c.overflow),
)


def _num(v: float) -> str:
    # The client library's number format (Go's): 1e+06, 0.5, NaN, +Inf.
    return str(_go_float(v))  # type: ignore[no-untyped-call]


def _count(v: int) -> str:
    # _num for a counter: Go's format of an integer below 1e6 is "123.0"
    # (above, it switches to exponents), without the float round trip.
    return f"{v}.0" if -1_000_000 < v < 1_000_000 else _num(v)


def _value(s: str) -> str:
    # Label values: the same three escapes in both formats.
    return s.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


ALL_FAMILIES = (CONNECTIONS, ACTIVE, BYTES, BLOCKED, FAILURES, OVERFLOW, UP, DURATION, LAST_OK,
                WINDOW, STATES_FAMILY)


@dataclass(frozen=True, slots=True)
class Format:
    """An exposition format as prometheus_client negotiated it."""

    openmetrics: bool
    escaping: str

    def encode(self, registry: CollectorRegistry) -> bytes:
        if self.openmetrics:
            return bytes(om_generate_latest(  # type: ignore[no-untyped-call]
                registry, escaping=self.escaping))
        return generate_latest(registry, escaping=self.escaping)

    def sample_name(self, fam: Family) -> str:
        return _spelling(self)[fam.name][1]

    def header(self, fam: Family) -> str:
        return _spelling(self)[fam.name][0]

    def label(self, name: str) -> str:
        return str(escape_label_name(name, self.escaping))


class _Probe(Collector):
    """Every family with one labelled sample: the client library spells them."""

    def collect(self) -> Iterator[Metric]:
        for fam in ALL_FAMILIES:
            cls = CounterMetricFamily if fam.type == "counter" else GaugeMetricFamily
            metric = cls(fam.name, fam.help, labels=["l"])
            metric.add_metric(["v"], 1)
            yield metric


@functools.cache
def _spelling(fmt: Format) -> dict[str, tuple[str, str]]:
    """Family → (HELP and TYPE lines, sample name), written by prometheus_client
    itself for this format: the escapings (``dots`` doubles underscores,
    OpenMetrics ``values`` prefixes ``U__``) stay the library's business."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Probe())
    lines = fmt.encode(registry).decode().splitlines(keepends=True)
    if fmt.openmetrics:
        lines = lines[:-1]  # "# EOF"
    spelled = {}
    for i, fam in enumerate(ALL_FAMILIES):
        help_line, type_line, sample = lines[3 * i: 3 * i + 3]
        assert help_line.startswith("# HELP ") and type_line.startswith("# TYPE "), lines
        name, brace, _ = sample.partition("{")
        assert brace and name, sample  # a quoted name would be `{"name",...}`
        spelled[fam.name] = (help_line + type_line, name)
    return spelled


#: The per-dataplane families, in output order: a dataplane's lines are one
#: bytes per section.
SECTIONS = (CONNECTIONS, ACTIVE, BYTES, BLOCKED, FAILURES, OVERFLOW, UP, DURATION, LAST_OK)
#: Rows looked up between two turns of the event loop in a render (~1 ms); a
#: row whose lines must be written counts WRITE_COST.
ROWS_PER_TURN = 2_000
WRITE_COST = 50
#: A format nobody asked for in this long is no longer written ahead.
FORMAT_IDLE_SECONDS = 600.0


@dataclass(frozen=True, slots=True)
class _Names:
    """A format's spelling of every name a dataplane's lines use."""

    samples: tuple[str, ...]  # per SECTIONS
    dataplane: str
    mesh: str
    service: str
    family: str
    direction: str


@functools.cache
def _names(fmt: Format) -> _Names:
    return _Names(tuple(fmt.sample_name(f) for f in SECTIONS), fmt.label("dataplane"),
                  fmt.label("mesh"), fmt.label("service"), fmt.label("family"),
                  fmt.label("direction"))


_Entry = tuple[DataplaneEvidence, tuple[bytes, ...]]


def lines_of(dp: DataplaneEvidence, fmt: Format, before: _Entry | None = None
             ) -> tuple[bytes, ...]:
    """One dataplane's series, one bytes per section (empty where it has none).
    ``before``: its previous lines; their counter sections are reused when the
    target and counters are the same (an idle proxy: only its gauges change).
    Labels are sorted by name, as prometheus_client writes them: dataplane,
    [direction,] family, mesh, service."""
    n = _names(fmt)
    t = dp.target
    head = f'{n.dataplane}="{_value(t.dataplane)}"'
    mesh = f'{n.mesh}="{_value(t.mesh)}"'
    if before is not None and before[0].target == t and before[0].latest == dp.latest:
        out = list(before[1][:6])
    else:
        out = _counter_lines(dp, n, head, f'{mesh},{n.service}="{_value(t.service)}"')
    if dp.state == "offline":
        return (*out, b"", b"", b"")
    short = f"{head},{mesh}"
    for i, g in ((6, 1.0 if dp.state == "fresh" else 0.0), (7, dp.scrape_duration),
                 (8, dp.last_success)):
        out.append(b"" if g is None else f"{n.samples[i]}{{{short}}} {_num(g)}\n".encode())
    return tuple(out)


def _counter_lines(dp: DataplaneEvidence, n: _Names, head: str, tail: str) -> list[bytes]:
    fams = sorted(dp.latest.items())

    def counter(name: str, get: Callable[[Counters], int]) -> bytes:
        return "".join(f'{name}{{{head},{n.family}="{family}",{tail}}} {_count(get(c))}\n'
                       for family, c in fams).encode()

    out = [counter(n.samples[i], get) for i, (_, get) in enumerate(COUNTER_SERIES[:2])]
    out.append("".join(
        f'{n.samples[2]}{{{head},{n.direction}="{direction}",{n.family}="{family}",'
        f"{tail}}} {_count(v)}\n"
        for family, c in fams
        for direction, v in (("sent", c.tx_bytes), ("received", c.rx_bytes))).encode())
    out.extend(counter(n.samples[3 + i], get) for i, (_, get) in enumerate(COUNTER_SERIES[2:]))
    return out


class Lines:
    """Each dataplane's lines per format, kept while its evidence is the same
    object. Formats are the ones asked for lately (a Prometheus asks for one)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # format → dataplane key → the lines of its two latest evidences, newest
        # first: the one being published and the one written ahead for the
        # next snapshot (a render mid-cycle finds both).
        self._by_fmt: dict[Format, dict[str, tuple[_Entry, ...]]] = {}
        self._asked: dict[Format, float] = {}

    def warm(self, dp: DataplaneEvidence) -> None:
        """Write ``dp``'s lines now, for every format asked for lately."""
        if dp.origin != "scrape":
            return
        key = dp.target.key
        for fmt, cache in self._by_fmt.items():
            got = cache.get(key, ())
            cache[key] = ((dp, lines_of(dp, fmt, got[0] if got else None)), *got[:1])

    def parts(self, snap: Snapshot, fmt: Format) -> Iterator[list[bytes]]:
        """The rows of ``snap`` in pieces of about ROWS_PER_TURN lookups (lines
        written ahead where they are of the same evidence), then the sections."""
        now = self._clock()
        self._asked[fmt] = now
        for old in [f for f, t in self._asked.items() if now - t > FORMAT_IDLE_SECONDS]:
            del self._asked[old]
            self._by_fmt.pop(old, None)
        cache = self._by_fmt.setdefault(fmt, {})
        rows: list[tuple[bytes, ...]] = []
        work = 0
        for dp in snap.dataplanes:
            if dp.origin != "scrape":
                # Its series already live in the Prometheus it came from:
                # exporting them again would double them there.
                continue
            got = cache.get(dp.target.key, ())
            lines = next((ln for d, ln in got if d is dp), None)
            if lines is None:
                # Not written ahead (a format just asked for, evidence computed
                # at the assembly): kept unless newer lines are there already.
                lines = lines_of(dp, fmt)
                work += WRITE_COST
                if not got:
                    cache[dp.target.key] = ((dp, lines),)
            rows.append(lines)
            work += 1
            if work >= ROWS_PER_TURN:
                work = 0
                yield []
        if len(cache) > len(rows):
            keys = {d.target.key for d in snap.dataplanes}
            for key in [k for k in cache if k not in keys]:
                del cache[key]
        for i, fam in enumerate(SECTIONS):
            yield [fmt.header(fam).encode(), *(r[i] for r in rows)]
        # A mesh's summary per piece: all of them at once (10,000 dataplanes in
        # 20 meshes) was the longest stretch of a render, ~30 ms.
        summaries = []
        for m in snap.meshes():
            summaries.append((_value(m), mesh_summary(m, snap.for_mesh(m))))
            yield []
        yield [_summaries(summaries, fmt).encode()]


def _summaries(summaries: list[tuple[str, dict[str, Any]]], fmt: Format) -> str:
    mesh_l, state_l = fmt.label("mesh"), fmt.label("state")
    out = [fmt.header(WINDOW)]
    name = fmt.sample_name(WINDOW)
    out.extend(f'{name}{{{mesh_l}="{m}"}} {_num(s["connections"])}\n' for m, s in summaries)
    out.append(fmt.header(STATES_FAMILY))
    name = fmt.sample_name(STATES_FAMILY)
    out.extend(f'{name}{{{mesh_l}="{m}",{state_l}="{state}"}} '
               f'{_num(s["dataplanes"][state])}\n'
               for m, s in summaries for state in STATES)
    return "".join(out)


def render(snap: Snapshot, fmt: Format, lines: Lines | None = None) -> bytes:
    """The whole part at once (tests, and the CLI that has no loop to share)."""
    return b"".join(b for part in (lines or Lines()).parts(snap, fmt) for b in part)


async def render_async(snap: Snapshot, fmt: Format, lines: Lines | None = None,
                       pause: Callable[[], Awaitable[None]] = turn) -> bytes:
    """The same bytes, ``pause()`` between pieces (the daemon's paces itself
    against the gate: passguard.foreground)."""
    chunks: list[bytes] = []
    for part in (lines or Lines()).parts(snap, fmt):
        # Joined piece by piece: one join of every line at the end (90,000
        # at 10,000 dataplanes) was an 8 ms piece; of the parts, a copy.
        chunks.append(b"".join(part))
        await pause()
    return b"".join(chunks)


class SnapshotExposition:
    """Renders each snapshot once per format; concurrent scrapes share the work."""

    def __init__(self, snapshot: Callable[[], Snapshot],
                 pace: Pace = one_turn) -> None:
        self._snapshot = snapshot
        self._pace = pace  # a pause() for each render
        self.lines = Lines()
        self._cache: dict[Format, tuple[Snapshot, asyncio.Future[bytes]]] = {}

    async def get(self, fmt: Format) -> bytes:
        snap = self._snapshot()
        cached = self._cache.get(fmt)
        if cached is None or cached[0] is not snap:
            render = render_async(snap, fmt, self.lines, self._pace())
            cached = (snap, asyncio.ensure_future(render))
            self._cache[fmt] = cached
        # Shielded: a scraper that hangs up must not cancel the render the
        # others (and the next scrape) wait for.
        return await asyncio.shield(cached[1])
