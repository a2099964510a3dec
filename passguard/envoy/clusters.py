"""Parse Envoy admin ``/clusters`` into passthrough destinations.

An ``ORIGINAL_DST`` cluster has one host per real destination, so the hosts of
the passthrough clusters are the external addresses a proxy talks to
(DESIGN §2).  The text form is one ``<cluster>::<host>::<stat>::<value>`` line
per host stat, e.g.::

    outbound:passthrough:ipv4::observability_name::outbound_passthrough_ipv4
    outbound:passthrough:ipv4::93.184.216.34:443::cx_active::1
    outbound:passthrough:ipv4::93.184.216.34:443::cx_total::7

Things that shape this parser:

* Lines carry the *cluster name* (``outbound:passthrough:ipv4``,
  ``meshpassthrough_tcp_10.0.0.1_443``) while ``passthrough.clusters`` is a
  pattern on *stat names* (``outbound_passthrough_ipv4``,
  ``meshpassthrough_tcp_10_0_0_1_443``).  Each cluster's
  ``::observability_name::`` line gives its stat name, so the one pattern
  serves both naming schemes.  Envoys too old to print that line get Envoy's
  own default: the cluster name with ``:`` turned into ``_``.
* A cluster name may itself contain ``::`` (a MeshPassthrough match on the
  IPv6 literal ``::1`` is the cluster ``meshpassthrough_tcp_::1_443``), so a
  line is split from its end: value, stat, then the host address.
* One destination can appear on several host lines of one cluster (Envoy
  creates a host per concurrent first connection, see
  ``passguard.demo.sidecar``): the counts are summed per address.
* The body has no server-side filter and can be many megabytes on a big
  mesh.  Two regular-expression scans do the work in C: one finds each
  cluster's name lines, the other matches only the host lines of the
  passthrough clusters, so Python touches passthrough hosts only.  Both
  patterns start with a literal (``::``, ``\\n``) that ``re`` searches for
  quickly: a 36 MB body with 30,000 hosts reads in about 0.2 s, about as long
  as ``str.splitlines()`` takes on it.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from passguard.envoy.names import FAMILIES, Family, family_of
from passguard.envoy.stats import counter
from passguard.errors import ScrapeError

# `::observability_name::<stat name>` (recent Envoys) and `::added_via_api::`
# (every Envoy): together they name every cluster of the body.  Two literal
# patterns, each found by re's fast literal search, beat one alternation.
_OBSERVABILITY_LINE = re.compile(r"::observability_name::([^\n]*?)\r?$", re.MULTILINE)
_ADDED_VIA_API_LINE = re.compile(r"::added_via_api::")
# A host address as Envoy prints it: `1.2.3.4:443` or `[2001:db8::1]:443`.
_ADDRESS = r"\[[0-9A-Za-z:.%_-]*\]:[0-9]+|[0-9A-Za-z.%_-]+:[0-9]+"


@dataclass(frozen=True, slots=True)
class Destination:
    """One external address on the passthrough clusters: its host lines summed."""

    address: str  # "93.184.216.34:443", IPv6 as "[2001:db8::1]:443"
    family: Family
    cx_total: int  # connections opened since Envoy created the host(s)
    cx_active: int
    # The meshpassthrough_* clusters (names as Envoy lists them) that carry
    # it: each names the appendMatch entry, and so the transport, it went by.
    routes: tuple[str, ...] = ()


class ClustersParser:
    """Compiled once per ``passthrough.clusters`` pattern, used for every read."""

    def __init__(self, clusters_pattern: str) -> None:
        self._pattern = re.compile(rf"(?:{clusters_pattern})")

    def parse(self, text: str) -> list[Destination]:
        """Text or JSON (``?format=json``) body → one Destination per address,
        sorted by family and address.  Raises ScrapeError when the body is
        neither."""
        if text.lstrip()[:1] == "{":
            return self.parse_json(text)
        return self.parse_text(text)

    # -- text ---------------------------------------------------------------

    def passthrough_clusters(self, text: str) -> dict[str, str]:
        """Cluster name → stat name of the passthrough clusters in a text body."""
        names: dict[str, str | None] = {}
        for m in _OBSERVABILITY_LINE.finditer(text):
            names[text[text.rfind("\n", 0, m.start()) + 1:m.start()]] = m.group(1).strip()
        for m in _ADDED_VIA_API_LINE.finditer(text):
            names.setdefault(text[text.rfind("\n", 0, m.start()) + 1:m.start()], None)
        out: dict[str, str] = {}
        for cluster, stat in names.items():
            stat_name = stat or cluster.replace(":", "_")
            if self._pattern.fullmatch(stat_name):
                out[cluster] = stat_name
        return out

    def parse_text(self, text: str) -> list[Destination]:
        clusters = self.passthrough_clusters(text)
        if not clusters:
            if "::" not in text and text.strip():
                raise ScrapeError(_not_clusters(text), text[:1024])
            return []
        # The alternation backtracks, so a name that is a prefix of another
        # (`outbound:passthrough`, `outbound:passthrough:ipv4`) cannot steal its
        # lines; longest first only saves that backtracking.
        names = sorted(clusters, key=len, reverse=True)
        host_line = (
            rf"(?P<c>{'|'.join(re.escape(n) for n in names)})::(?P<a>{_ADDRESS})"
            r"::(?P<s>cx_total|cx_active)::(?P<v>[0-9]+)\r?$"
        )
        # Searched as "\n<line>": re finds the literal "\n" fast, where `^`
        # would be tried at every character; the first line is matched alone.
        first = re.compile(host_line, re.MULTILINE).match(text)
        lines = re.compile("\n" + host_line, re.MULTILINE).finditer(text)
        acc: dict[tuple[Family, str, str], list[int]] = {}
        for m in itertools.chain((first,) if first else (), lines):
            cluster = m.group("c")
            fam = family_of(clusters[cluster])
            key = (fam, m.group("a"), cluster if fam == "matched" else "")
            row = acc.get(key)
            if row is None:
                row = acc[key] = [0, 0]
            row[0 if m.group("s") == "cx_total" else 1] += counter(m.group("v"), "a host counter")
        return _destinations((fam, addr, row[0], row[1], route)
                             for (fam, addr, route), row in acc.items())

    # -- JSON ---------------------------------------------------------------

    def parse_json(self, text: str) -> list[Destination]:
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise ScrapeError(f"/clusters?format=json is not JSON: {exc}", text[:1024]) from None
        statuses = _field(doc, "cluster_statuses", list, "the answer")
        acc: dict[tuple[Family, str, str], list[int]] = {}
        for i, cluster in enumerate(statuses):
            where = f"cluster_statuses[{i}]"
            name = _field(cluster, "name", str, where)
            stat_name = cluster.get("observability_name") or name.replace(":", "_")
            if not isinstance(stat_name, str):
                raise ScrapeError(f"{where}.observability_name must be a string")
            if self._pattern.fullmatch(stat_name) is None:
                continue
            fam = family_of(stat_name)
            hosts = cluster.get("host_statuses") or []
            if not isinstance(hosts, list):
                raise ScrapeError(f"{where}.host_statuses must be a list")
            for j, host in enumerate(hosts):
                hwhere = f"{where}.host_statuses[{j}]"
                addr = _json_address(host, hwhere)
                total, active = _json_stats(host, hwhere)
                row = acc.setdefault((fam, addr, name if fam == "matched" else ""), [0, 0])
                row[0] += total
                row[1] += active
        return _destinations((fam, addr, row[0], row[1], route)
                             for (fam, addr, route), row in acc.items())


#: Routes kept per destination: a hostile /clusters must not grow a row.
MAX_ROUTES = 8


def _destinations(rows: Iterable[tuple[Family, str, int, int, str]]) -> list[Destination]:
    """One Destination per address.  Normalised once per destination (not per
    line), so the text and the JSON form, and two spellings of one IPv6
    address, give one key.  An address on clusters of two families (only
    while a MeshPassthrough replaces the catch-all cluster) is summed and
    takes the family that carried most of its connections."""
    merged: dict[str, list[int]] = {}
    by_family: dict[str, dict[Family, int]] = {}
    routes: dict[str, list[str]] = {}
    for fam, addr, total, active, route in rows:
        key = _normalise(addr)
        row = merged.setdefault(key, [0, 0])
        row[0] += total
        row[1] += active
        fams = by_family.setdefault(key, {})
        fams[fam] = fams.get(fam, 0) + total
        if route:
            kept = routes.setdefault(key, [])
            if route not in kept and len(kept) < MAX_ROUTES:
                kept.append(route)
    out = []
    for addr, (total, active) in merged.items():
        fams = by_family[addr]
        family = max(fams, key=lambda f: (fams[f], -FAMILIES.index(f)))
        out.append(Destination(addr, family, total, active, tuple(sorted(routes.get(addr, ())))))
    return sorted(out, key=lambda d: (d.family, d.address))


def _normalise(address: str) -> str:
    host, _, port = address.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return address  # not an IP literal (never for ORIGINAL_DST): keep as printed
    return f"[{ip.compressed}]:{port}" if ip.version == 6 else f"{ip.compressed}:{port}"


def _field(obj: Any, key: str, kind: type, where: str) -> Any:
    if not isinstance(obj, dict):
        raise ScrapeError(f"{where} must be an object, got {type(obj).__name__}")
    value = obj.get(key)
    if not isinstance(value, kind):
        raise ScrapeError(f"{where}.{key} must be a {kind.__name__}, got "
                          f"{type(value).__name__ if value is not None else 'nothing'}")
    return value


def _json_address(host: Any, where: str) -> str:
    address = _field(host, "address", dict, where)
    sock = _field(address, "socket_address", dict, f"{where}.address")
    ip = _field(sock, "address", str, f"{where}.address.socket_address")
    port = sock.get("port_value", 0)
    if not isinstance(port, int) or isinstance(port, bool):
        raise ScrapeError(f"{where}.address.socket_address.port_value must be a number")
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _json_stats(host: Any, where: str) -> tuple[int, int]:
    stats = host.get("stats") or []
    if not isinstance(stats, list):
        raise ScrapeError(f"{where}.stats must be a list")
    total = active = 0
    for k, stat in enumerate(stats):
        if not isinstance(stat, dict):
            raise ScrapeError(f"{where}.stats[{k}] must be an object")
        name = stat.get("name")
        if name not in ("cx_total", "cx_active"):
            continue
        # Envoy's JSON is proto3: a zero value is left out, integers are strings.
        raw = stat.get("value", "0")
        try:
            value = int(raw) if not isinstance(raw, str) or len(raw) <= 20 else -1
        except (TypeError, ValueError, OverflowError):
            value = -1  # 1e400 parses as inf: int() overflows
        if isinstance(raw, bool) or not 0 <= value < 2**64:
            raise ScrapeError(f"{where}.stats[{k}].value ({name}) must be an integer "
                              f"(a 64-bit count), got {_json_kind(raw)}", str(raw)[:40]) from None
        if name == "cx_total":
            total += value
        else:
            active += value
    return total, active


def _json_kind(raw: Any) -> str:
    """What a bad value is, without its text (the answer's bytes are for the log)."""
    if isinstance(raw, str):
        return f"a {len(raw)}-character string"
    if isinstance(raw, bool):
        return "a boolean"
    if isinstance(raw, int | float):
        return "a number out of range"
    return "null" if raw is None else f"a JSON {type(raw).__name__}"


def _not_clusters(text: str) -> str:
    # What failed, never what was said: the answer goes to the log only.
    return (f"not an Envoy admin /clusters answer (no cluster::stat lines in {len(text)} "
            "characters; the start of the answer is in the log)")
