"""ClustersParser: Envoy admin ``/clusters`` (text and JSON) → passthrough destinations.

Synthetic bodies pin the format details (names with ``::``, hosts repeated
per address, old Envoys without ``observability_name``, big bodies); real
Envoys configured like every Kuma generation check that the parser reads what
Envoy really prints, in both formats.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any
from urllib.parse import quote

import pytest

from passguard.demo.kuma_names import Generation, passthrough_cluster_name, passthrough_stat_name
from passguard.demo.sidecar import EnvoyProcess
from passguard.demo.traffic import EchoUpstream, passthrough_connect, send_traffic
from passguard.envoy.clusters import ClustersParser, Destination
from passguard.envoy.names import DEFAULT_CLUSTERS_PATTERN, Family, stats_filter
from passguard.envoy.stats import StatsParser
from passguard.errors import ScrapeError

HOST_STATS = ["cx_active", "cx_connect_fail", "cx_total", "rq_active", "rq_error",
              "rq_pending_active", "rq_success", "rq_timeout", "rq_total"]


def cluster_block(name: str, stat_name: str | None,
                  hosts: list[tuple[str, int, int]]) -> list[str]:
    """Lines Envoy prints for one cluster; hosts are (address, cx_total, cx_active)."""
    out = []
    if stat_name is not None:
        out.append(f"{name}::observability_name::{stat_name}")
    out += [f"{name}::default_priority::max_connections::1024",
            f"{name}::high_priority::max_retries::3",
            f"{name}::added_via_api::false"]
    for address, total, active in hosts:
        for stat in HOST_STATS:
            value = {"cx_total": total, "cx_active": active}.get(stat, 0)
            out.append(f"{name}::{address}::{stat}::{value}")
        # The hostname line holds "::" and the address again: must not be read.
        out.append(f"{name}::{address}::hostname::{name}{address}::cx_total::999")
        out += [f"{name}::{address}::health_flags::healthy", f"{name}::{address}::weight::1",
                f"{name}::{address}::region::", f"{name}::{address}::success_rate::-1"]
    return out


def parse(text: str, pattern: str = DEFAULT_CLUSTERS_PATTERN) -> list[Destination]:
    return ClustersParser(pattern).parse(text)


def test_hosts_of_one_address_are_summed() -> None:
    text = "\n".join(cluster_block("outbound:passthrough:ipv4", "outbound_passthrough_ipv4", [
        ("93.184.216.34:443", 2, 1), ("93.184.216.34:443", 1, 0), ("93.184.216.34:443", 4, 0),
        ("10.0.0.1:80", 1, 0),
    ]))
    assert parse(text) == [
        Destination("10.0.0.1:80", "ipv4", 1, 0),
        Destination("93.184.216.34:443", "ipv4", 7, 1),
    ]


def test_every_generation_and_family() -> None:
    text = "\n".join([
        *cluster_block("pass_through", "pass_through", [("1.1.1.1:53", 1, 0)]),
        *cluster_block("outbound:passthrough", "outbound_passthrough", [("1.1.1.2:53", 2, 0)]),
        *cluster_block("outbound:passthrough:ipv6", "outbound_passthrough_ipv6",
                       [("[2001:db8::1]:443", 3, 1)]),
        *cluster_block("self_transparentproxy_passthrough_outbound_ipv4",
                       "self_transparentproxy_passthrough_outbound_ipv4", [("1.1.1.3:80", 4, 0)]),
        *cluster_block("meshpassthrough_tcp_10.0.0.1_443", "meshpassthrough_tcp_10_0_0_1_443",
                       [("10.0.0.1:443", 5, 2)]),
        # A MeshPassthrough match on an IPv6 literal: "::" inside the cluster name.
        *cluster_block("meshpassthrough_tcp_::1_8443", "meshpassthrough_tcp___1_8443",
                       [("[::1]:8443", 6, 0)]),
        # Not outbound passthrough: ignored.
        *cluster_block("inbound:passthrough:ipv4", "inbound_passthrough_ipv4",
                       [("9.9.9.9:1", 9, 9)]),
        *cluster_block("web_svc_80", "web_svc_80", [("10.1.1.1:80", 9, 9)]),
    ])
    # Sorted by family, then address.
    assert parse(text) == [
        Destination("1.1.1.3:80", "ipv4", 4, 0),
        Destination("[2001:db8::1]:443", "ipv6", 3, 1),
        Destination("1.1.1.1:53", "legacy", 1, 0),
        Destination("1.1.1.2:53", "legacy", 2, 0),
        # A meshpassthrough_* cluster names the entry (and transport) it went by.
        Destination("10.0.0.1:443", "matched", 5, 2, ("meshpassthrough_tcp_10.0.0.1_443",)),
        Destination("[::1]:8443", "matched", 6, 0, ("meshpassthrough_tcp_::1_8443",)),
    ]


def test_one_entry_per_address_across_families() -> None:
    """While a MeshPassthrough replaces the catch-all cluster, one address can sit
    in both: summed, with the family that carried most connections."""
    text = "\n".join([
        *cluster_block("outbound:passthrough:ipv4", "outbound_passthrough_ipv4",
                       [("10.0.0.1:443", 1, 0), ("10.0.0.2:443", 5, 0)]),
        *cluster_block("meshpassthrough_tcp_10.0.0.1_443", "meshpassthrough_tcp_10_0_0_1_443",
                       [("10.0.0.1:443", 3, 1)]),
        *cluster_block("meshpassthrough_tcp_10.0.0.2_443", "meshpassthrough_tcp_10_0_0_2_443",
                       [("10.0.0.2:443", 2, 1)]),
    ])
    assert parse(text) == [
        Destination("10.0.0.2:443", "ipv4", 7, 1, ("meshpassthrough_tcp_10.0.0.2_443",)),
        Destination("10.0.0.1:443", "matched", 4, 1, ("meshpassthrough_tcp_10.0.0.1_443",))]
    assert parse(to_json(text)) == parse(text)


def test_ipv6_spellings_are_one_destination() -> None:
    text = "\n".join([
        *cluster_block("outbound:passthrough:ipv6", "outbound_passthrough_ipv6",
                       [("[2001:db8:0::1]:443", 1, 0), ("[2001:DB8::1]:443", 2, 0)]),
    ])
    assert parse(text) == [Destination("[2001:db8::1]:443", "ipv6", 3, 0)]


def test_stat_names_are_matched_not_cluster_names() -> None:
    """The pattern is on stat names: the cluster name alone would not match it."""
    text = "\n".join(cluster_block("outbound:passthrough:ipv4", "outbound_passthrough_ipv4",
                                   [("1.2.3.4:80", 1, 0)]))
    assert parse(text, r"outbound_passthrough_ipv4") != []
    assert parse(text, r"outbound:passthrough:ipv4") == []


def test_old_envoy_without_observability_name() -> None:
    """Envoy's default stat name is the cluster name with ':' → '_'."""
    text = "\n".join(cluster_block("outbound:passthrough:ipv4", None, [("1.2.3.4:80", 3, 1)]))
    assert parse(text) == [Destination("1.2.3.4:80", "ipv4", 3, 1)]


def test_alt_stat_name_differs_from_sanitised_name() -> None:
    """observability_name wins over the sanitised cluster name."""
    text = "\n".join(cluster_block("my:custom:cluster", "outbound_passthrough_ipv4",
                                   [("1.2.3.4:80", 3, 0)]))
    assert parse(text) == [Destination("1.2.3.4:80", "ipv4", 3, 0)]


def test_first_line_and_crlf() -> None:
    text = "outbound:passthrough:ipv4::1.2.3.4:80::cx_total::2\r\n" \
        "outbound:passthrough:ipv4::observability_name::outbound_passthrough_ipv4\r\n" \
        "outbound:passthrough:ipv4::1.2.3.4:80::cx_active::1\r\n"
    assert parse(text) == [Destination("1.2.3.4:80", "ipv4", 2, 1)]


def test_cluster_name_that_prefixes_another() -> None:
    text = "\n".join([
        *cluster_block("outbound:passthrough", "outbound_passthrough", [("1.1.1.1:1", 1, 0)]),
        *cluster_block("outbound:passthrough:ipv4", "outbound_passthrough_ipv4",
                       [("2.2.2.2:2", 2, 0)]),
    ])
    assert parse(text) == [Destination("2.2.2.2:2", "ipv4", 2, 0),
                           Destination("1.1.1.1:1", "legacy", 1, 0)]


def test_no_passthrough_cluster() -> None:
    text = "\n".join(cluster_block("web", "web", [("10.0.0.1:80", 1, 0)]))
    assert parse(text) == []
    assert parse("") == []


@pytest.mark.parametrize("body, message", [
    ("<html><body>Forbidden</body></html>", "not an Envoy admin /clusters answer"),
    ('{"foo": 1}', "cluster_statuses must be a list"),
    ('{"cluster_statuses": [{"name": 3}]}', r"cluster_statuses\[0\].name must be a str"),
    ('{"cluster_statuses": [{"name": "outbound:passthrough:ipv4", "host_statuses": '
     '[{"address": {}}]}]}', r"host_statuses\[0\].address.socket_address must be a dict"),
    ('{"cluster_statuses": [{"name": "outbound:passthrough:ipv4", "host_statuses": '
     '[{"address": {"socket_address": {"address": "1.2.3.4", "port_value": 1}}, '
     '"stats": [{"name": "cx_total", "value": "x"}]}]}]}',
     r"stats\[0\].value \(cx_total\) must be an integer"),
    ("{not json", "is not JSON"),
])
def test_bad_bodies_name_the_problem(body: str, message: str) -> None:
    with pytest.raises(ScrapeError, match=message):
        parse(body)


def to_json(text: str) -> str:
    """The ``?format=json`` body Envoy prints for the same clusters (proto3 JSON:
    zero values left out, integers as strings).  Envoy prints each host's
    stats starting with ``cx_active``, so that line opens a new host."""
    names = [line.split("::added_via_api::")[0] for line in text.splitlines()
             if "::added_via_api::" in line]
    clusters: dict[str, dict[str, Any]] = {n: {"name": n, "host_statuses": []} for n in names}
    for line in text.splitlines():
        name = max((n for n in names if line.startswith(n + "::")), key=len, default=None)
        if name is None or "::hostname::" in line:
            continue
        rest = line[len(name) + 2:]
        if rest.startswith("observability_name::"):
            clusters[name]["observability_name"] = rest.split("::", 1)[1]
            continue
        address, stat, value = [*rest.rsplit("::", 2), "", ""][:3]
        if stat not in ("cx_active", "cx_total"):
            continue
        hosts = clusters[name]["host_statuses"]
        if stat == "cx_active":
            ip, port = address.rsplit(":", 1)
            hosts.append({"address": {"socket_address": {"address": ip.strip("[]"),
                                                         "port_value": int(port)}},
                          "stats": []})
        entry: dict[str, Any] = {"name": stat}
        if value != "0":
            entry["value"] = value
        if stat == "cx_active":
            entry["type"] = "GAUGE"
        hosts[-1]["stats"].append(entry)
    return json.dumps({"cluster_statuses": list(clusters.values())})


def test_json_equals_text_synthetic() -> None:
    text = "\n".join([
        *cluster_block("outbound:passthrough:ipv4", "outbound_passthrough_ipv4",
                       [("1.2.3.4:80", 2, 0), ("1.2.3.4:80", 3, 1), ("5.6.7.8:443", 1, 0)]),
        *cluster_block("outbound:passthrough:ipv6", "outbound_passthrough_ipv6",
                       [("[2001:db8::1]:443", 3, 0)]),
        *cluster_block("web", "web", [("10.0.0.1:80", 1, 0)]),
    ])
    assert parse(to_json(text)) == parse(text) == [
        Destination("1.2.3.4:80", "ipv4", 5, 1),
        Destination("5.6.7.8:443", "ipv4", 1, 0),
        Destination("[2001:db8::1]:443", "ipv6", 3, 0),
    ]


def test_big_body_is_parsed_right() -> None:
    """3,000 mesh clusters × 10 hosts plus 2,000 passthrough destinations: ~28 MB.
    Correctness only: speed is measured by bench/run.py, not asserted here."""
    lines: list[str] = []
    for i in range(3000):
        lines += cluster_block(f"outbound:10.0.{i // 250}.{i % 250}:8080", f"svc_{i}_8080",
                               [(f"10.1.{j}.{i % 250}:8080", 3, 0) for j in range(10)])
    lines += cluster_block("outbound:passthrough:ipv4", "outbound_passthrough_ipv4",
                           [(f"93.184.{j // 250}.{j % 250}:443", 3, 1) for j in range(2000)])
    text = "\n".join(lines) + "\n"
    assert len(text) > 25_000_000
    got = ClustersParser(DEFAULT_CLUSTERS_PATTERN).parse(text)
    assert len(got) == 2000
    assert {d.cx_total for d in got} == {3} and {d.cx_active for d in got} == {1}


# --------------------------------------------------------------------------- real Envoy


async def settle(envoy: EnvoyProcess, active: int, within: float = 5.0) -> None:
    """Wait (bounded) until the proxy's passthrough connections are down to
    ``active``: Envoy closes its upstream side a moment after the client."""
    parser = StatsParser(DEFAULT_CLUSTERS_PATTERN)
    path = "/stats?filter=" + quote(stats_filter(DEFAULT_CLUSTERS_PATTERN), safe="")
    deadline = time.monotonic() + within
    now = -1
    while time.monotonic() < deadline:
        reading = parser.parse(await envoy.admin_get(path))
        now = sum(c.cx_active for c in reading.families.values())
        if now == active:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{now} passthrough connections still active, expected {active}")


async def _read_both(envoy: EnvoyProcess) -> tuple[list[Destination], list[Destination], str]:
    text = await envoy.admin_get("/clusters")
    as_json = await envoy.admin_get("/clusters?format=json")
    return parse(text), parse(as_json), text


@pytest.mark.e2e
@pytest.mark.timeout(60)
@pytest.mark.parametrize("generation", ["0.6", "1.1", "legacy", "unified"])
async def test_real_envoy_two_upstreams(generation: Generation) -> None:
    async with EchoUpstream("127.0.0.1") as a, EchoUpstream("127.0.0.1") as b, \
            EchoUpstream("::1") as c, EnvoyProcess(generation) as envoy:
        # Parallel first connections: Envoy makes several hosts for one address.
        await send_traffic(envoy, a, 6, parallel=6)
        await send_traffic(envoy, b, 2)
        has_v6 = "ipv6" in envoy.families
        if has_v6:
            await send_traffic(envoy, c, 3)
        held = await passthrough_connect(envoy.listener_host(), envoy.listener_port(), a.host,
                                         a.port, hold=True)
        try:
            await settle(envoy, 1)
            from_text, from_json, text = await _read_both(envoy)
        finally:
            await held.close()
    fam4: Family = "legacy" if generation in ("0.6", "1.1") else "ipv4"
    expected = [Destination(f"127.0.0.1:{a.port}", fam4, 7, 1),
                Destination(f"127.0.0.1:{b.port}", fam4, 2, 0)]
    if has_v6:
        expected.append(Destination(f"[::1]:{c.port}", "ipv6", 3, 0))
    expected.sort(key=lambda d: (d.family, d.address))
    assert from_text == expected, text
    assert from_json == expected
    # The cluster really is named as Kuma names it (not its stat name).
    cluster = passthrough_cluster_name(generation)
    assert f"\n{cluster}::observability_name::{passthrough_stat_name(generation)}" in "\n" + text


@pytest.mark.e2e
@pytest.mark.timeout(60)
async def test_real_envoy_meshpassthrough_destinations() -> None:
    async with EchoUpstream("127.0.0.1") as a, EchoUpstream("::1") as c, \
            EchoUpstream("127.0.0.1") as blocked, \
            EnvoyProcess("meshpassthrough", matches=[(a.host, a.port), (c.host, c.port)]) as envoy:
        await send_traffic(envoy, a, 4, parallel=4)
        await send_traffic(envoy, c, 2)
        # Not matched: Envoy closes it, no destination appears.
        with pytest.raises((ConnectionError, TimeoutError)):
            await passthrough_connect(envoy.listener_host(), envoy.listener_port(),
                                      blocked.host, blocked.port, io_timeout=2.0)
        await settle(envoy, 0)
        from_text, from_json, text = await _read_both(envoy)
    expected = sorted([Destination(f"127.0.0.1:{a.port}", "matched", 4, 0,
                                   (f"meshpassthrough_tcp_127.0.0.1_{a.port}",)),
                       Destination(f"[::1]:{c.port}", "matched", 2, 0,
                                   (f"meshpassthrough_tcp_::1_{c.port}",))],
                      key=lambda d: (d.family, d.address))
    assert from_text == expected, text
    assert from_json == expected
    # The IPv6 match's cluster name carries "::" (meshpassthrough_tcp_::1_<port>).
    assert f"meshpassthrough_tcp_::1_{c.port}::[::1]:{c.port}::cx_total::" in text


@pytest.mark.e2e
@pytest.mark.timeout(60)
async def test_real_envoy_json_matches_synthetic_converter() -> None:
    """The to_json() helper above writes what Envoy writes (checked once, for trust)."""
    async with EchoUpstream("127.0.0.1") as a, EnvoyProcess("legacy") as envoy:
        await send_traffic(envoy, a, 2)
        await settle(envoy, 0)
        text = await envoy.admin_get("/clusters")
        real = json.loads(await envoy.admin_get("/clusters?format=json"))
    ours = json.loads(to_json(text))
    real_hosts = {c["name"]: len(c.get("host_statuses", [])) for c in real["cluster_statuses"]}
    our_hosts = {c["name"]: len(c["host_statuses"]) for c in ours["cluster_statuses"]}
    assert real_hosts == our_hosts
    assert parse(json.dumps(real)) == parse(to_json(text)) == parse(text)
