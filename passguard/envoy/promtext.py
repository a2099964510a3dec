"""Parse Envoy stats in Prometheus text format into the same reading as ``/stats``.

kuma-dp serves every Envoy stat, merged with the application's metrics, on
``:5670/metrics`` (DESIGN §2).  There a passthrough counter looks like

    envoy_cluster_upstream_cx_total{envoy_cluster_name="outbound_passthrough_ipv4"} 8
    envoy_tcp_downstream_cx_no_route{envoy_tcp_prefix="outbound_passthrough_ipv4"} 0
    envoy_server_uptime 12

which is Envoy's own ``/stats/prometheus`` rewritten by kuma-dp: ``{}`` label
sets dropped, values printed as floats (``9.217064e+06``), extra labels such as
``kuma_io_mesh_traffic="true"`` added, clusters with a hash suffix merged.
``PromStatsParser`` reads either form and returns exactly the ``StatsReading``
that ``StatsParser`` returns for the same proxy's ``/stats`` text, so the store
and the gate cannot tell which endpoint a sample came from.

Like ``StatsParser`` it scans the body once with one compiled regular
expression (the scan runs in C) and hands Python only the few lines it keeps:
a merged ``/metrics`` body can be megabytes of application metrics.
"""

from __future__ import annotations

import itertools
import math
import re

from passguard.envoy.names import (
    CLUSTER_STATS,
    DEFAULT_OUTBOUND_PORT,
    LISTENER_STATS,
    Family,
    family_of,
    listener_family,
)
from passguard.envoy.stats import Counters, StatsReading, counter
from passguard.errors import ScrapeError

# Same positions as Counters' fields (and as stats._FIELD).
_FIELD = {name: i for i, name in enumerate((*CLUSTER_STATS, *LISTENER_STATS))}

# A label set: quoted values may hold any escaped character, including `}` and `,`.
_LABELS = r'(?:[^"}\n]|"(?:[^"\\\n]|\\.)*")*'
# A sample value: Go/Prometheus float syntax, `+Inf`, `NaN`, integers.
_VALUE = r"[-+]?(?:[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?|[0-9]+\.|Inf|inf|NaN|nan)"


def _label_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf'(?:^|,)\s*{name}\s*=\s*"((?:[^"\\\n]|\\.)*)"')


_NAME_LABELS = "(?:envoy_cluster_name|envoy_tcp_prefix)"
_CLUSTER_LABEL = _label_pattern("envoy_cluster_name")
_TCP_LABEL = _label_pattern("envoy_tcp_prefix")
_ESCAPE = re.compile(r"\\(.)")


class PromStatsParser:
    """Compiled once per ``passthrough.clusters`` pattern, used for every scrape."""

    def __init__(self, clusters_pattern: str,
                 outbound_port: int = DEFAULT_OUTBOUND_PORT) -> None:
        # The passthrough listener's refusals (see names.listener_pattern): Envoy
        # tags an address-named listener (`envoy_listener_address="0.0.0.0_15001"`)
        # and leaves a stat-prefixed one in the metric name.
        self._listener = re.compile(
            r"^envoy_listener_(?:"
            rf'no_filter_chain_match\{{(?:{_LABELS},)?\s*envoy_listener_address\s*=\s*'
            rf'"(?P<addr>[0-9a-fA-F.:_\[\]]+_{outbound_port})"'
            rf"|(?P<name>{clusters_pattern})_no_filter_chain_match(?:\{{)?)"
            rf"{_LABELS}\}}?[ \t]+(?P<v>{_VALUE})", re.MULTILINE)
        # The user's pattern is matched against the label value, whole, like
        # StatsParser matches it against the stat name between two dots.
        self._cluster = re.compile(rf"(?:{clusters_pattern})")
        sample = (
            r"envoy_(?:"
            rf"(?:cluster_(?P<cs>{'|'.join(CLUSTER_STATS)})|tcp_(?P<ts>{'|'.join(LISTENER_STATS)}))"
            r"(?:\{"
            # Envoy writes the cluster (listener) label first: when it is there
            # and names no passthrough cluster, the line is dropped here, in C,
            # instead of in Python (a big mesh has thousands of clusters).
            # Any other first label falls through to the full check in parse().
            rf'(?=\s*{_NAME_LABELS}\s*=\s*"(?:{clusters_pattern})"\s*[,}}]'
            rf"|(?!\s*{_NAME_LABELS}\s*=))"
            rf"(?P<labels>{_LABELS})\}})?"
            rf"|(?P<up>server_uptime)(?:\{{{_LABELS}\}})?"
            rf")[ \t]+(?P<v>{_VALUE})"
            # An optional timestamp (milliseconds) is allowed by the format.
            r"(?:[ \t]+-?[0-9]+)?[ \t]*\r?$"
        )
        # Lines are found by the literal "\nenvoy_", which re searches for
        # quickly, instead of trying `^` at every character (several times
        # faster on a big body); the first line, which no "\n" precedes, is
        # matched on its own.
        self._lines = re.compile("\n" + sample, re.MULTILINE)
        self._first = re.compile(sample, re.MULTILINE)

    def parse(self, text: str) -> StatsReading:
        """Raise ScrapeError when the text has no ``envoy_server_uptime`` sample
        (not Envoy's Prometheus output, or a metrics profile that strips it)."""
        uptime: float | None = None
        acc: dict[Family, list[int]] = {}
        first = self._first.match(text)
        for m in itertools.chain((first,) if first else (), self._lines.finditer(text)):
            if m.group("up"):
                uptime = float(_number(m.group("v"), "envoy_server_uptime"))
                continue
            labels = m.group("labels") or ""
            cs = m.group("cs")
            if cs:
                stat, lm = cs, _CLUSTER_LABEL.search(labels)
            else:
                stat, lm = m.group("ts"), _TCP_LABEL.search(labels)
            if lm is None:
                continue  # not per cluster / listener: cannot be a passthrough stat
            name = _unescape(lm.group(1))
            if self._cluster.fullmatch(name) is None:
                continue
            fam = family_of(name)
            row = acc.get(fam)
            if row is None:
                row = acc[fam] = [0] * len(_FIELD)
            # Summed per family exactly like StatsParser; kuma-dp may also split
            # one stat over several label sets (extra labels), which sums too.
            # Named by the stat alone: the labels are the answer's bytes.
            row[_FIELD[stat]] += _number(m.group("v"), f"envoy_{'cluster' if cs else 'tcp'}_"
                                                       f"{stat} of a passthrough "
                                                       f"{'cluster' if cs else 'listener'}")
        if uptime is None:
            raise ScrapeError(_not_envoy(text), text[:1024])
        for m in self._listener.finditer(text):
            fam = listener_family(m.group("addr") or m.group("name"))
            row = acc.get(fam)
            if row is None:
                row = acc[fam] = [0] * len(_FIELD)
            row[_FIELD["downstream_cx_no_route"]] += _number(
                m.group("v"), "envoy_listener_no_filter_chain_match")
        return StatsReading(uptime, {f: Counters(*v) for f, v in acc.items()})


def _unescape(value: str) -> str:
    if "\\" not in value:
        return value
    return _ESCAPE.sub(lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def _number(text: str, what: str) -> int:
    """A counter or gauge value as an integer: Envoy prints integers, kuma-dp
    prints Go floats (``9.217064e+06``), both exact for these values."""
    if text.isdigit():
        return counter(text, what)
    value = float(text)
    # 2**64: larger is not an Envoy stat (and would not survive as a float).
    if not math.isfinite(value) or value < 0 or value >= 1.8446744073709552e19:
        raise ScrapeError(f"{what} has a value that is not a count (negative, not finite, or "
                          "over 64 bits)", text[:40])
    return round(value)


def _not_envoy(text: str) -> str:
    # What failed, never what was said: the answer is for the log only
    # (ScrapeError.answer), since a kuma-dp address may be some other service.
    if not text.strip():
        return "empty body: not Envoy stats in Prometheus format (no envoy_server_uptime)"
    return ("not Envoy stats in Prometheus format (no envoy_server_uptime sample in "
            f"{len(text)} characters; a metrics profile may have filtered Envoy's stats out; "
            "the start of the answer is in the log)")
