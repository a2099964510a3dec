"""passguard.exposition writes what prometheus_client would, byte for byte.

The oracle is the collector /metrics used before the fast renderer: the same
families built as prometheus_client ``Metric`` objects and encoded by the
library itself (text 0.0.4 and OpenMetrics, every name escaping). Snapshots
come from hypothesis, with label values that need escaping (quotes,
backslashes, newlines, non-ASCII), several families, offline and
Prometheus-sourced dataplanes and missing durations.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics import exposition as om
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from passguard import exposition
from passguard.envoy.stats import Counters
from passguard.exposition import Format, SnapshotExposition, render, render_async
from passguard.metrics import Metrics
from passguard.store.snapshot import STATES, DataplaneEvidence, Snapshot, mesh_summary
from passguard.targets import Target

DP_LABELS = ["mesh", "service", "dataplane", "family"]


class OracleCollector(Collector):
    """The per-dataplane families as prometheus_client objects (the old code)."""

    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap

    def collect(self) -> Iterator[Metric]:
        snap = self.snap
        conns = CounterMetricFamily("passguard_passthrough_connections",
                                    "Connections opened through the passthrough clusters "
                                    "(Envoy upstream_cx_total)", labels=DP_LABELS)
        active = GaugeMetricFamily("passguard_passthrough_active_connections",
                                   "Passthrough connections open at the latest scrape",
                                   labels=DP_LABELS)
        nbytes = CounterMetricFamily("passguard_passthrough_bytes",
                                     "Bytes through the passthrough clusters",
                                     labels=[*DP_LABELS, "direction"])
        blocked = CounterMetricFamily("passguard_passthrough_blocked_connections",
                                      "Connections refused by the passthrough listener "
                                      "(downstream_cx_no_route)", labels=DP_LABELS)
        fails = CounterMetricFamily("passguard_passthrough_connect_failures",
                                    "Passthrough upstream connect failures", labels=DP_LABELS)
        overflow = CounterMetricFamily("passguard_passthrough_overflow",
                                       "Passthrough circuit breaker overflows", labels=DP_LABELS)
        up = GaugeMetricFamily("passguard_target_up", "1 if the last scrape succeeded",
                               labels=["mesh", "dataplane"])
        duration = GaugeMetricFamily("passguard_target_scrape_duration_seconds",
                                     "Duration of the last scrape", labels=["mesh", "dataplane"])
        last_ok = GaugeMetricFamily("passguard_last_successful_scrape_timestamp_seconds",
                                    "Unix time of the last successful scrape",
                                    labels=["mesh", "dataplane"])
        for dp in snap.dataplanes:
            if dp.origin != "scrape":
                continue
            t = dp.target
            for fam, c in sorted(dp.latest.items()):
                lv = [t.mesh, t.service, t.dataplane, fam]
                conns.add_metric(lv, c.cx_total)
                active.add_metric(lv, c.cx_active)
                nbytes.add_metric([*lv, "sent"], c.tx_bytes)
                nbytes.add_metric([*lv, "received"], c.rx_bytes)
                blocked.add_metric(lv, c.no_route)
                fails.add_metric(lv, c.connect_fail)
                overflow.add_metric(lv, c.overflow)
            if dp.state == "offline":
                continue
            up.add_metric([t.mesh, t.dataplane], 1.0 if dp.state == "fresh" else 0.0)
            if dp.scrape_duration is not None:
                duration.add_metric([t.mesh, t.dataplane], dp.scrape_duration)
            if dp.last_success is not None:
                last_ok.add_metric([t.mesh, t.dataplane], dp.last_success)
        yield from (conns, active, nbytes, blocked, fails, overflow, up, duration, last_ok)
        window = GaugeMetricFamily("passguard_mesh_passthrough_connections_window",
                                   "Passthrough connections inside the gate window",
                                   labels=["mesh"])
        states = GaugeMetricFamily("passguard_mesh_dataplanes", "Dataplanes by scrape state",
                                   labels=["mesh", "state"])
        for mesh in snap.meshes():
            summary = mesh_summary(mesh, snap.for_mesh(mesh))
            window.add_metric([mesh], summary["connections"])
            for state in STATES:
                states.add_metric([mesh, state], summary["dataplanes"][state])
        yield window
        yield states


def oracle(snap: Snapshot, fmt: Format) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(OracleCollector(snap))
    if fmt.openmetrics:
        body = om.generate_latest(registry, escaping=fmt.escaping)
        assert body.endswith(b"# EOF\n")
        return body[:-len(b"# EOF\n")]
    return generate_latest(registry, escaping=fmt.escaping)


FORMATS = [Format(o, e) for o in (False, True)
           for e in (om.UNDERSCORES, om.DOTS, om.VALUES, om.ALLOWUTF8)]
label_text = st.text(alphabet=st.sampled_from('ab-_./"\\\n é✓0'), max_size=8)
counts = st.integers(0, 2**64)
counters = st.builds(Counters, counts, counts, counts, counts, counts, counts, counts)


@st.composite
def snapshots(draw: st.DrawFn) -> Snapshot:
    dps = []
    for i in range(draw(st.integers(0, 6))):
        target = Target(f"http://dp{i}", draw(label_text), f"{draw(label_text)}{i}",
                        draw(label_text))
        latest = draw(st.dictionaries(st.sampled_from(["ipv4", "ipv6", "unified"]), counters,
                                      max_size=3))
        state = draw(st.sampled_from(STATES))
        dps.append(DataplaneEvidence(
            target, state, True, None, {k: v for k, v in latest.items()},
            draw(st.integers(0, 5)), latest, 10.0,
            draw(st.none() | st.floats(0, 2e9, allow_nan=False)), 1.0, None,
            draw(st.none() | st.floats(0, 30, allow_nan=False)),
            origin=draw(st.sampled_from(["scrape", "scrape", "prometheus"]))))
    return Snapshot(100.0, 900.0, 45.0, tuple(dps))


@settings(max_examples=200, deadline=None)
@given(snapshots(), st.sampled_from(FORMATS))
def test_render_matches_prometheus_client(snap: Snapshot, fmt: Format) -> None:
    assert render(snap, fmt) == oracle(snap, fmt)


def _fleet(n: int, t: float = 5.0) -> tuple[DataplaneEvidence, ...]:
    return tuple(DataplaneEvidence(Target(f"http://{i}", f"m{i % 3}", f"dp{i}", "s"), "fresh",
                                   True, None, {}, 0, {"ipv4": Counters(i)}, 1.0, t, t,
                                   None, 0.1) for i in range(n))


def test_a_render_hands_the_loop_back_and_gives_the_same_bytes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exposition, "ROWS_PER_TURN", 10)
    snap = Snapshot(10.0, 900.0, 45.0, _fleet(50))
    fmt = Format(False, om.UNDERSCORES)
    yields = 0

    async def count() -> bytes:
        nonlocal yields
        task = asyncio.ensure_future(render_async(snap, fmt))
        while not task.done():
            yields += 1
            await asyncio.sleep(0)
        return task.result()

    assert asyncio.run(count()) == oracle(snap, fmt)
    # 5 pieces of 10 dataplanes, one per section, the mesh summaries.
    assert yields >= 5 + len(exposition.SECTIONS) + 1


def test_lines_written_ahead_are_the_ones_rendered(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lines warmed as evidence is computed are used as they are; evidence the
    render has no lines for (or older lines) is written then; the bytes match
    the oracle either way, and keys gone from the snapshot are forgotten."""
    fmt = Format(True, om.UNDERSCORES)
    lines = exposition.Lines()
    first = Snapshot(10.0, 900.0, 45.0, _fleet(20))
    assert render(first, fmt, lines) == oracle(first, fmt)  # asks for fmt: now warmed
    written: list[str] = []
    real = exposition.lines_of

    def counting(dp: DataplaneEvidence, f: Format,
                 before: exposition._Entry | None = None) -> tuple[bytes, ...]:
        written.append(dp.target.key)
        return real(dp, f, before)

    monkeypatch.setattr(exposition, "lines_of", counting)
    newer = _fleet(10, t=20.0)
    for dp in newer:
        lines.warm(dp)  # as each scrape is recorded
    assert len(written) == 10
    # A render of the snapshot still published (mid-cycle): 10 of its
    # dataplanes have newer lines ahead; their published ones are still kept.
    assert render(first, fmt, lines) == oracle(first, fmt)
    assert len(written) == 10
    second = Snapshot(21.0, 900.0, 45.0, newer)
    written.clear()
    assert render(second, fmt, lines) == oracle(second, fmt)
    assert written == []  # everything was written ahead
    assert render(second, fmt, lines) == oracle(second, fmt) and written == []
    assert sorted(lines._by_fmt[fmt]) == sorted(d.target.key for d in newer)


@settings(max_examples=50, deadline=None)
@given(snap=snapshots(), fmt=st.sampled_from(FORMATS), data=st.data())
def test_lines_reused_from_an_idle_proxys_previous_ones_are_exact(
        snap: Snapshot, fmt: Format, data: st.DataObject) -> None:
    """The counter sections of a dataplane whose target and counters did not
    change are taken from its previous lines: the bytes are still exact."""
    lines = exposition.Lines()
    render(snap, fmt, lines)
    later = tuple(
        replace(d, state=data.draw(st.sampled_from(STATES)), scrape_duration=0.5,
                last_success=d.last_success and d.last_success + 15)
        for d in snap.dataplanes)
    for d in later:
        lines.warm(d)
    again = Snapshot(snap.time + 15, 900.0, 45.0, later)
    assert render(again, fmt, lines) == oracle(again, fmt)


def test_a_format_nobody_asks_for_is_no_longer_written_ahead() -> None:
    clock = [0.0]
    lines = exposition.Lines(lambda: clock[0])
    text, om_fmt = Format(False, om.UNDERSCORES), Format(True, om.UNDERSCORES)
    snap = Snapshot(10.0, 900.0, 45.0, _fleet(3))
    render(snap, text, lines)
    clock[0] = exposition.FORMAT_IDLE_SECONDS + 1
    render(snap, om_fmt, lines)
    assert list(lines._by_fmt) == [om_fmt]
    lines.warm(_fleet(1, t=30.0)[0])
    assert list(lines._by_fmt) == [om_fmt]


def test_rendered_once_per_snapshot_and_shared() -> None:
    snaps = [Snapshot(1.0, 900.0, 45.0, ())]
    fmt = Format(True, om.UNDERSCORES)
    calls = 0
    real = exposition.render_async

    async def counting(snap: Snapshot, f: Format, lines: exposition.Lines | None = None,
                       pause: object = None) -> bytes:
        nonlocal calls
        calls += 1
        return await real(snap, f, lines)

    async def main() -> None:
        ex = SnapshotExposition(lambda: snaps[-1])
        exposition.render_async = counting
        try:
            a, b = await asyncio.gather(ex.get(fmt), ex.get(fmt))
            assert a == b and calls == 1
            await ex.get(fmt)
            assert calls == 1
            snaps.append(Snapshot(2.0, 900.0, 45.0, ()))
            await ex.get(fmt)
            assert calls == 2
        finally:
            exposition.render_async = real

    asyncio.run(main())


@pytest.mark.parametrize("accept", [
    "", "text/plain", "text/plain;version=1.0.0;escaping=dots",
    "application/openmetrics-text", "application/openmetrics-text;version=1.0.0",
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8",
])
def test_whole_body_parses_for_every_negotiated_format(accept: str) -> None:
    dp = DataplaneEvidence(Target("http://a", 'm"1', "dp\\1", "svc\n"), "fresh", True, None,
                           {}, 2, {"ipv4": Counters(5, 2, 10, 20)}, 1.0, 7.0, 7.0, None, 0.2)
    metrics = Metrics(lambda: Snapshot(8.0, 900.0, 45.0, (dp,)))
    parts, content_type = asyncio.run(metrics.exposition(accept))
    text = b"".join(parts).decode()
    if content_type.startswith("application/openmetrics-text"):
        # The strict OpenMetrics parser: one # EOF, at the very end.
        names = {f.name for f in text_string_to_metric_families(text)}
        assert text.endswith("# EOF\n") and text.count("# EOF") == 1
    else:
        from prometheus_client.parser import text_string_to_metric_families as parse_text
        names = {f.name for f in parse_text(text)}
    assert any("passthrough" in n and "connections" in n for n in names)
    assert any("build" in n and "info" in n for n in names)
