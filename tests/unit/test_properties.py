"""Hostile input, by property: every parser raises only its documented error.

Each parser passguard points at the outside world is fed arbitrary and
mutated input (Hypothesis), and the only exception allowed out is the one its
caller handles:

=============================================  ===============================
parser                                         may raise
=============================================  ===============================
``envoy.stats.StatsParser.parse``              ``ScrapeError``
``envoy.promtext.PromStatsParser.parse``       ``ScrapeError``
``envoy.clusters.ClustersParser.parse``        ``ScrapeError``
``sources.kumawire.parse_list_page``,          ``KumaApiError``
``parse_mesh_item``, ``parse_dataplane_item``
``loader.load_documents``                 ``InputError``
``documents.parse_documents``             ``InputError``
``gate.admission.parse_review``                ``InputError``
``config.build``                               ``ConfigError``
``web.auth.parse_tokens``                      ``ConfigError``
=============================================  ===============================

Well-formed input must also round-trip: the fleet simulator's Envoy bodies
(``bench/fleet.py``, compared with a real Envoy by ``tests/bench``) parse to
exactly the counters it computed, in text and Prometheus form, and
``/clusters`` text and JSON give the same destinations.

Every bug these properties found is pinned by a test at the end of the file,
with its counterexample as an ``@example`` or parameter. While a bug was open
its input was kept out of the property (the exclusion named the bug) and its
test was ``xfail(strict=True)``; all are fixed now, and the strategies cover
those inputs again: non-finite list totals, non-string YAML keys, digit runs
of hundreds of characters, named groups, inline flags, lookarounds and huge
repeat counts in patterns, ``gate.meshes`` that is not a mapping.

The runs are derandomized (the same examples every time) and bounded
(``max_examples``), so this file takes seconds and never flakes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bench.fleet import FLEET_GENERATIONS, PATTERNS, Template, make_spec
from passguard.config import build
from passguard.demo.kuma_names import families_of
from passguard.documents import parse_documents
from passguard.envoy.clusters import ClustersParser
from passguard.envoy.names import DEFAULT_CLUSTERS_PATTERN, FAMILIES, stats_filter
from passguard.envoy.promtext import PromStatsParser
from passguard.envoy.stats import StatsParser
from passguard.errors import ConfigError, InputError, ScrapeError
from passguard.gate.admission import parse_review
from passguard.loader import load_documents
from passguard.sources.kumawire import (
    KumaApiError,
    is_online,
    parse_dataplane_item,
    parse_list_page,
    parse_mesh_item,
)
from passguard.web.auth import digest, parse_tokens
from tests.kuma_fixtures import own

P = DEFAULT_CLUSTERS_PATTERN
STATS = StatsParser(P)
PROM = PromStatsParser(P)
CLUSTERS = ClustersParser(P)

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])
FEW = settings(SETTINGS, max_examples=60)

# --------------------------------------------------------------------------- strategies

# Words the parsers look for, so random data often gets past the first check.
WORDS = st.sampled_from([
    "Mesh", "MeshPassthrough", "kuma.io/v1alpha1", "kuma.io/mesh", "default", "None",
    "Matched", "All", "IP", "CIDR", "Domain", "false", "true", "name", "type", "kind", "spec",
    "networking", "outbound", "passthrough", "items", "total", "next", "object", "oldObject",
    "AdmissionReview", "admission.k8s.io/v1", "CREATE", "UPDATE", "DELETE", "10.0.0.0/8",
    "::1", "1.2.3.4", "outbound_passthrough_ipv4", "passguard.io/acknowledge-traffic", "",
])
TEXT = st.text(max_size=20) | WORDS
FINITE = st.floats(allow_nan=False, allow_infinity=False)
SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | FINITE | TEXT)
# JSON gives string keys; YAML may give any scalar key (a key `1:` is an int).
JSON = st.recursive(SCALARS, lambda c: st.lists(c, max_size=5)
                    | st.dictionaries(TEXT, c, max_size=6), max_leaves=30)
YAML_KEYS = TEXT | st.integers(-5, 5) | st.booleans() | st.none()
YAML = st.recursive(SCALARS, lambda c: st.lists(c, max_size=5)
                    | st.dictionaries(YAML_KEYS, c, max_size=6), max_leaves=30)
# What json.loads gives for `Infinity`, `NaN`, `1e400`.
NONFINITE = st.sampled_from([math.inf, -math.inf, math.nan])


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


def _copy(doc: Any) -> Any:
    return json.loads(json.dumps(doc))


@st.composite
def mutated(draw: st.DrawFn, base: Any, values: st.SearchStrategy[Any] = JSON) -> Any:
    """``base`` (plain data) with 1-4 random edits: replace a value, delete a key,
    add a key, wrap a value in a list, turn a value into its string form."""
    doc = _copy(base)
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(_paths(doc)))
        op = draw(st.sampled_from(["replace", "delete", "add", "wrap", "stringify"]))
        if not path:
            if op == "replace":
                doc = draw(values)
            continue
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        if op == "replace":
            parent[key] = draw(values)
        elif op == "delete":
            del parent[key]
        elif op == "add" and isinstance(parent, dict):
            parent[draw(TEXT)] = draw(values)
        elif op == "wrap":
            parent[key] = [parent[key]]
        elif op == "stringify":
            parent[key] = str(parent[key])
    return doc


@st.composite
def with_odd_key(draw: st.DrawFn, base: Any) -> Any:
    """``base`` with a key YAML would give as a number, boolean or null (``1: x``),
    next to string keys in one of its mappings."""
    doc = _copy(base)
    maps = [p for p in _paths(doc) if isinstance(_at(doc, p), dict)]
    target = _at(doc, draw(st.sampled_from(maps)))
    target[draw(st.integers(-5, 5) | st.booleans() | st.none())] = draw(SCALARS)
    return doc


def _at(doc: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        doc = doc[key]
    return doc


@st.composite
def edited_text(draw: st.DrawFn, base: str, alphabet: str | None = None) -> str:
    """``base`` with 1-6 edits: insert, delete or replace a random slice."""
    text = base
    piece = st.text(alphabet=alphabet, max_size=30) if alphabet else st.text(max_size=30)
    for _ in range(draw(st.integers(1, 6))):
        i = draw(st.integers(0, len(text)))
        j = draw(st.integers(i, min(len(text), i + 40)))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        if op == "insert":
            text = text[:i] + draw(piece) + text[i:]
        elif op == "delete":
            text = text[:i] + text[j:]
        else:
            text = text[:i] + draw(piece) + text[j:]
    return text


@functools.cache
def _template(generation: str) -> Template:
    return Template(3, generation)  # type: ignore[arg-type]


def _fleet_bodies(generation: str, pattern: str, seed: int, t: float) -> dict[str, Any]:
    tmpl = _template(generation)
    fams = families_of(generation)  # type: ignore[arg-type]
    spec = make_spec(0, pattern, fams, seed, 1_800_000_000.0)  # type: ignore[arg-type]
    snap = spec.snapshot(1_800_000_000.0 + t, tmpl.names)
    return {
        "reading": snap.reading(),
        "destinations": snap.destinations,
        "text": tmpl.render_stats(snap, "text").decode(),
        "filtered": tmpl.render_stats(snap, "text", stats_filter(P)).decode(),
        "usedonly": tmpl.render_stats(snap, "text", None, True).decode(),
        "prometheus": tmpl.render_stats(snap, "prometheus").decode(),
        "clusters": tmpl.render_clusters(snap, "text").decode(),
        "clusters_json": tmpl.render_clusters(snap, "json").decode(),
    }


FLEET = st.builds(_fleet_bodies, st.sampled_from(FLEET_GENERATIONS),
                  st.sampled_from([p for p in PATTERNS if p != "idle"]),
                  st.integers(0, 10_000), st.floats(0, 7 * 86400))
SAMPLE = _fleet_bodies("legacy", "steady", 1, 3600.0)

# Digit runs: passguard reads counters with int(); Python refuses int() of a
# string over 4,300 digits, and a float (Prometheus) cannot hold 310+ digits.
SHORT_DIGITS = st.integers(0, 2**64 - 1).map(str)
LONG_DIGITS = st.integers(310, 6000).map(lambda n: "9" * n)


# --------------------------------------------------------------------------- Envoy text


@SETTINGS
@given(FLEET)
def test_fleet_bodies_round_trip(bodies: dict[str, Any]) -> None:
    """Text, filtered text, usedonly text and Prometheus text of the same proxy
    read the same; /clusters text and JSON give the same destinations."""
    want = bodies["reading"]
    for form in ("text", "filtered", "usedonly"):
        got = STATS.parse(bodies[form])
        assert got.uptime == want.uptime
        assert {f: c for f, c in got.families.items() if any(c)} == \
            {f: c for f, c in want.families.items() if any(c)}, form
    prom = PROM.parse(bodies["prometheus"])
    assert prom == STATS.parse(bodies["text"])
    text = CLUSTERS.parse(bodies["clusters"])
    assert text == CLUSTERS.parse(bodies["clusters_json"])
    assert {d.address: d.cx_total for d in text} == bodies["destinations"]


def _stats_line(name: str, value: str) -> str:
    return f"{name}: {value}"


STAT_NAMES = st.sampled_from([
    "server.uptime", "cluster.outbound_passthrough_ipv4.upstream_cx_total",
    "cluster.outbound_passthrough_ipv6.upstream_cx_active",
    "cluster.pass_through.upstream_cx_tx_bytes_total",
    "cluster.meshpassthrough_tcp_10_0_0_1_443.upstream_cx_overflow",
    "tcp.outbound_passthrough_ipv4.downstream_cx_no_route",
    "cluster.self_transparentproxy_passthrough_outbound_ipv4.upstream_cx_connect_fail",
    "cluster.web.upstream_cx_total", "http.admin.downstream_rq_2xx",
]) | st.text(max_size=40)
VALUES = SHORT_DIGITS | st.text(max_size=12) | st.sampled_from(
    ["-1", "1.5", "1e9", "NaN", "inf", "\u0663", "\uff11", "", " 7", "0x10", "No recorded values"])
STATS_TEXT = (st.lists(st.builds(_stats_line, STAT_NAMES, VALUES), max_size=30)
              .map("\n".join) | st.text() | edited_text(SAMPLE["text"])
              | edited_text(SAMPLE["filtered"], "0123456789:._\n ab"))


@SETTINGS
@given(STATS_TEXT)
def test_stats_parser_raises_only_scrape_error(text: str) -> None:
    try:
        reading = STATS.parse(text)
    except ScrapeError:
        return
    assert reading.uptime is not None
    for fam, c in reading.families.items():
        assert fam in FAMILIES and all(isinstance(v, int) and v >= 0 for v in c)


PROM_NAMES = st.sampled_from([
    "envoy_server_uptime", "envoy_cluster_upstream_cx_total", "envoy_cluster_upstream_cx_active",
    "envoy_tcp_downstream_cx_no_route", "envoy_cluster_upstream_cx_tx_bytes_total",
]) | st.text(max_size=20)
PROM_LABELS = st.sampled_from([
    "", "{}", '{envoy_cluster_name="outbound_passthrough_ipv4"}',
    '{envoy_tcp_prefix="outbound_passthrough_ipv6"}',
    '{kuma_io_mesh_traffic="true",envoy_cluster_name="pass_through"}',
    '{envoy_cluster_name="outbound_passthrough_ipv4\\"}', '{envoy_cluster_name=}', "{",
]) | st.text(max_size=30).map(lambda s: "{" + s + "}")
PROM_VALUES = st.integers(0, 2**64).map(str) | FINITE.map(repr) | st.sampled_from(
    ["+Inf", "-Inf", "NaN", "1e308", "-0", "9.217064e+06", "1.", ".5", "1e-400", ""])
PROM_TEXT = (st.lists(st.tuples(PROM_NAMES, PROM_LABELS, PROM_VALUES)
                      .map(lambda t: f"{t[0]}{t[1]} {t[2]}"), max_size=30).map("\n".join)
             | st.text() | edited_text(SAMPLE["prometheus"][:4000]))


@SETTINGS
@given(PROM_TEXT)
def test_prometheus_parser_raises_only_scrape_error(text: str) -> None:
    try:
        reading = PROM.parse(text)
    except ScrapeError:
        return
    assert reading.uptime is not None and math.isfinite(reading.uptime)
    for c in reading.families.values():
        assert all(isinstance(v, int) and v >= 0 for v in c)


def _host(cluster: str, address: str, stat: str, value: str) -> str:
    return f"{cluster}::{address}::{stat}::{value}"


CLUSTER_NAMES = st.sampled_from(["outbound:passthrough:ipv4", "outbound:passthrough:ipv6",
                                 "pass_through", "meshpassthrough_tcp_::1_443", "web"]) \
    | st.text(max_size=20)
ADDRESSES = st.sampled_from(["93.184.216.34:443", "[2001:db8::1]:443", "[::ffff:1.2.3.4]:80",
                             "observability_name", "added_via_api", "x:y", "[::1]:"]) \
    | st.text(max_size=20)
CLUSTERS_TEXT = (st.lists(st.builds(_host, CLUSTER_NAMES, ADDRESSES,
                                    st.sampled_from(["cx_total", "cx_active", "weight"])
                                    | st.text(max_size=8), SHORT_DIGITS | st.text(max_size=8)),
                          max_size=25).map("\n".join)
                 | st.text() | edited_text(SAMPLE["clusters"][:6000]))
CLUSTERS_JSON = (mutated(json.loads(SAMPLE["clusters_json"]))
                 .map(lambda d: json.dumps(d, allow_nan=False))
                 | st.builds(lambda statuses: json.dumps({"cluster_statuses": statuses}),
                             st.lists(JSON, max_size=4)))


@SETTINGS
@given(CLUSTERS_TEXT | CLUSTERS_JSON)
def test_clusters_parser_raises_only_scrape_error(text: str) -> None:
    try:
        dests = CLUSTERS.parse(text)
    except ScrapeError:
        return
    assert all(d.family in FAMILIES and d.cx_total >= 0 and d.cx_active >= 0 for d in dests)
    assert len({d.address for d in dests}) == len(dests)


# --------------------------------------------------------------------------- Kuma API items


def _items(name: str) -> list[Any]:
    items: list[Any] = json.loads(own(f"api/{name}").read_text())["items"]
    return items


DP_ITEMS = _items("dataplanes-overview.json") + _items("dataplanes.json")
MESH_ITEMS = _items("meshes-page.json")
CP_VALUES = JSON | NONFINITE  # json.loads accepts NaN, Infinity and 1e400


@SETTINGS
@given(st.sampled_from(DP_ITEMS).flatmap(lambda it: mutated(it, CP_VALUES)) | CP_VALUES,
       st.none() | st.just("payments") | TEXT)
def test_dataplane_items_raise_only_kuma_api_error(item: Any, mesh: str | None) -> None:
    try:
        dp = parse_dataplane_item(item, "items[0]", mesh)
    except KumaApiError as exc:
        assert str(exc).startswith("items[0]"), exc
        return
    assert dp.name and dp.mesh
    assert dp.metrics_port is None or 0 < dp.metrics_port < 65536


@SETTINGS
@given(st.sampled_from(MESH_ITEMS).flatmap(lambda it: mutated(it, CP_VALUES)) | CP_VALUES)
def test_mesh_items_raise_only_kuma_api_error(item: Any) -> None:
    try:
        parse_mesh_item(item, "items[0]")
        is_online(item, "insight")
    except KumaApiError:
        pass


LIST_PAGES = st.fixed_dictionaries(
    {"items": st.lists(JSON, max_size=3) | JSON},
    optional={"total": st.integers(-3, 2**70) | st.floats() | JSON, "next": TEXT | JSON,
              "extra": JSON}) | JSON


@SETTINGS
@given(LIST_PAGES)
def test_list_pages_raise_only_kuma_api_error(body: Any) -> None:
    try:
        page = parse_list_page(body, "GET /meshes")
    except KumaApiError:
        return
    assert isinstance(page.items, list)
    assert page.total is None or (isinstance(page.total, int) and page.total >= 0)


# --------------------------------------------------------------------------- documents


def _fixture_docs() -> list[Any]:
    docs: list[Any] = []
    for name in ("mesh/mesh-passthrough-false.k8s.yaml",
                 "mesh/mesh-passthrough-false.universal.yaml",
                 "meshpassthrough/allow-some.universal.yaml",
                 "meshpassthrough/disable.universal.yaml"):
        docs += load_documents(own(name).read_bytes())
    [spec] = load_documents(own("meshpassthrough/spec.yaml").read_bytes())
    docs.append({"apiVersion": "kuma.io/v1alpha1", "kind": "MeshPassthrough",
                 "metadata": {"name": "mp", "namespace": "kuma-system",
                              "labels": {"kuma.io/mesh": "default"},
                              "annotations": {"passguard.io/acknowledge-traffic": "ticket-1"}},
                 "spec": {**spec, "default": {**spec["default"], "passthroughMode": "Matched"}}})
    docs.append({"object": docs[0], "oldObject": docs[0]})
    docs.append({"apiVersion": "v1", "kind": "List", "items": docs[:2]})
    return docs


DOCS = _fixture_docs()


@SETTINGS
@given(st.lists(st.sampled_from(DOCS).flatmap(mutated) | st.sampled_from(DOCS).flatmap(
    with_odd_key) | JSON | YAML, min_size=1, max_size=3),
       st.none() | st.lists(st.sampled_from(DOCS).flatmap(mutated) | YAML, max_size=2))
def test_documents_raise_only_input_error(docs: list[Any], old: list[Any] | None) -> None:
    """Mutated Kuma-format files, the same with a key YAML would give as a number,
    boolean or null, and arbitrary JSON- and YAML-shaped data."""
    try:
        parsed = parse_documents(docs, old)
    except InputError:
        return
    for change in parsed.changes:
        assert change.resource.kind in ("Mesh", "MeshPassthrough")
        assert change.resource.digest.startswith("sha256:")


def _review(obj: Any, old: Any, op: str = "UPDATE") -> dict[str, Any]:
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                        "kind": {"group": "kuma.io", "version": "v1alpha1", "kind": "Mesh"},
                        "operation": op, "userInfo": {"username": "ci", "groups": ["a"]},
                        "object": obj, "oldObject": old, "dryRun": False, "name": "default"}}


REVIEWS = [_review(DOCS[0], DOCS[0]), _review(DOCS[0], None, "CREATE"),
           _review(None, DOCS[0], "DELETE")]


@SETTINGS
@given(st.sampled_from(REVIEWS).flatmap(mutated) | JSON)
def test_admission_reviews_raise_only_input_error(body: Any) -> None:
    try:
        req = parse_review(body)
    except InputError:
        return
    assert req.uid and req.operation in ("CREATE", "UPDATE", "DELETE", "CONNECT")
    with contextlib.suppress(InputError):
        parse_documents([{"object": None if req.operation == "DELETE" else req.object,
                          "oldObject": req.old_object}])


BODIES = (st.binary(max_size=200)
          | YAML.map(lambda d: yaml.safe_dump(d).encode())
          | JSON.map(lambda d: json.dumps(d).encode())
          | st.sampled_from(DOCS).flatmap(mutated).map(lambda d: yaml.safe_dump(d).encode())
          | st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")))
CONTENT_TYPES = st.none() | st.sampled_from([
    "application/json", "application/yaml", "text/plain", "application/json; charset=latin-1",
    "application/merge-patch+json", "text/yaml; charset=utf-8", ";;;", "application/x-yaml"])


@SETTINGS
@given(BODIES, CONTENT_TYPES)
def test_loader_raises_only_input_error(body: bytes, ctype: str | None) -> None:
    try:
        docs = load_documents(body, ctype)
    except InputError:
        return
    assert docs and all(d is not None for d in docs)


# --------------------------------------------------------------------------- config

# Durations and sizes shaped like the real thing, and some that are not.
# Digit runs up to 400 long: a duration of 10^400 s is infinite as a float.
DURATIONS = st.from_regex(r"\A ?[0-9]{1,400}(\.[0-9]{1,3})? ?(ms|s|m|h|d) ?\Z") | st.sampled_from(
    ["15s", "1s", "500ms", "15m", "0s", "1h", "90d", "1e5s", "15", "-1s", ""]) | SCALARS
SIZES = st.integers(-5, 2**40) | st.from_regex(r"\A[0-9]{1,5000} ?(B|KiB|MiB|GiB)?\Z") | SCALARS
URLS = st.sampled_from(["http://127.0.0.1:9901", "unix:///run/kuma/admin.sock", "https://cp:5682",
                        "ftp://x", "http://", "http://h:99999", "http://h/?q=1", "unix://rel"]) \
    | TEXT
# Named groups, inline flags, huge repeat counts and deep nesting included:
# each once passed config and broke a parser (the tests at the end of the file).
REGEXES = st.sampled_from([P, "pass_through", "(a|b)", "[", "a{2,3}", "(?:x)+", "\\",
                           "(?P<gen>x)", "(?i)x", "a{99999999999}", "(" * 300 + ")" * 300,
                           "(?=x)", "(a)\\1"]) \
    | st.text(alphabet="ab|()[]{},0123456789*+?.^$\\:_<>=!PiI", max_size=15)


def _opt(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A mapping with any subset of ``fields``, sometimes with an unknown key, or junk."""
    return st.fixed_dictionaries({}, optional={**fields, "bogus": SCALARS}) | SCALARS


TARGET = _opt(url=URLS, labels=st.dictionaries(TEXT, SCALARS, max_size=3) | SCALARS)
SOURCE = (st.fixed_dictionaries({"kind": st.just("envoy")},
                                optional={"targets": st.lists(TARGET, max_size=3) | SCALARS,
                                          "target_files": st.lists(TEXT, max_size=2) | SCALARS})
          | st.fixed_dictionaries({"kind": st.just("kuma")}, optional={
              "url": URLS, "token_file": TEXT, "ca_file": TEXT, "insecure_skip_verify": SCALARS,
              "meshes": st.lists(TEXT, max_size=2) | SCALARS, "discovery_interval": DURATIONS,
              "stats": st.sampled_from(["inspect", "kuma-dp", "x"]), "timeout": DURATIONS,
              "page_size": st.integers(-1, 2000) | SCALARS, "max_response_bytes": SIZES,
              "bogus": SCALARS})
          | st.fixed_dictionaries({"kind": SCALARS}) | SCALARS)
POLICY = _opt(mode=st.sampled_from(["enforce", "warn", "audit", "x"]) | SCALARS,
              on_insufficient_data=st.sampled_from(["deny", "warn", "allow", "x"]) | SCALARS)
CONFIG = st.fixed_dictionaries({}, optional={
    "listen": st.sampled_from(["127.0.0.1:9110", "[::1]:0", ":9110", "0.0.0.0:80", "x",
                               "[::1]:70000", "localhost:1"]) | SCALARS,
    "scrape": _opt(interval=DURATIONS, timeout=DURATIONS,
                   concurrency=st.integers(-1, 200_000) | SCALARS, max_response_bytes=SIZES,
                   max_buffered_bytes=SIZES, spread=DURATIONS | st.just("auto")),
    "window": DURATIONS,
    "state": _opt(path=TEXT | SCALARS),
    "passthrough": _opt(clusters=REGEXES | SCALARS),
    "sources": st.lists(SOURCE, max_size=3) | SCALARS,
    "gate": st.fixed_dictionaries({}, optional={
        "mode": st.sampled_from(["enforce", "warn", "audit", "x"]) | SCALARS,
        "on_insufficient_data": st.sampled_from(["deny", "warn", "allow", "x"]) | SCALARS,
        "meshes": st.none() | st.dictionaries(TEXT, POLICY, max_size=3) | SCALARS
        | st.lists(POLICY, max_size=2)}),
    "limits": _opt(max_body_bytes=SIZES, max_documents=st.integers(-1, 2_000_000) | SCALARS,
                   max_depth=st.integers(0, 20_000) | SCALARS,
                   max_nodes=st.integers(-1, 200_000_000) | SCALARS, max_scalar_bytes=SIZES,
                   keepalive_timeout=DURATIONS, body_timeout=DURATIONS,
                   max_connections=st.integers(-1, 2_000_000) | SCALARS),
    "auth": _opt(tokens_file=TEXT, protect_metrics=SCALARS, insecure=SCALARS,
                 tls=_opt(cert_file=TEXT, key_file=TEXT, client_ca_file=TEXT,
                          reload_interval=DURATIONS)),
    "audit": _opt(retention=DURATIONS),
    "destinations": _opt(interval=DURATIONS, spread=DURATIONS | st.just("auto")),
    "unknown_key": SCALARS,
}) | JSON


@SETTINGS
@given(CONFIG)
def test_config_raises_only_config_error(raw: Any) -> None:
    try:
        cfg = build(raw, Path("/etc/passguard"))
    except ConfigError as exc:
        assert exc.errors and all(isinstance(e, str) and e for e in exc.errors)
        return
    assert cfg.scrape.timeout <= cfg.scrape.interval
    assert cfg.window >= 2 * cfg.scrape.interval
    assert math.isfinite(cfg.window) and math.isfinite(cfg.scrape.interval)
    # Whatever build() accepts, the parsers and Envoy's filter can be built from.
    StatsParser(cfg.passthrough_clusters)
    PromStatsParser(cfg.passthrough_clusters)
    ClustersParser(cfg.passthrough_clusters)
    re.compile(stats_filter(cfg.passthrough_clusters))


TOKEN_FILES = (st.binary(max_size=100)
               | st.fixed_dictionaries({"tokens": st.lists(_opt(
                   name=TEXT | st.from_regex(r"\A[a-z][a-z0-9-]{0,10}\Z"),
                   sha256=st.just(digest("t")) | st.from_regex(r"\A[0-9A-Fa-f]{60,66}\Z")
                   | SCALARS), max_size=4) | SCALARS}).map(lambda d: yaml.safe_dump(d).encode())
               | YAML.map(lambda d: yaml.safe_dump(d).encode()))


@SETTINGS
@given(TOKEN_FILES)
def test_tokens_file_raises_only_config_error(data: bytes) -> None:
    try:
        tokens = parse_tokens(data, "tokens.yaml")
    except ConfigError:
        return
    assert all(re.fullmatch(r"[0-9a-f]{64}", d) for d in tokens)


# --------------------------------------------------------------------------- known bugs


@FEW
@given(LONG_DIGITS, st.sampled_from(["text", "prometheus"]))
@example("9" * 5000, "text")
@example("9" * 400, "prometheus")
def test_long_counters(digits: str, form: str) -> None:
    if form == "text":
        text = f"server.uptime: 5\ncluster.outbound_passthrough_ipv4.upstream_cx_total: {digits}\n"
        parser: StatsParser | PromStatsParser = STATS
    else:
        text = f"envoy_server_uptime {digits}\n"
        parser = PROM
    try:
        reading = parser.parse(text)
    except ScrapeError:
        return
    # Accepted: then it must be a value Envoy can have (uint64) and /metrics can show.
    for c in reading.families.values():
        assert all(v < 2**64 for v in c)


@pytest.mark.parametrize("body", [
    "outbound:passthrough:ipv4::added_via_api::true\n"
    "outbound:passthrough:ipv4::1.2.3.4:443::cx_total::" + "9" * 5000,
    '{"cluster_statuses": [{"name": "outbound:passthrough:ipv4", "host_statuses": [{"address":'
    ' {"socket_address": {"address": "1.2.3.4", "port_value": 443}}, "stats": [{"name": '
    '"cx_total", "value": 1e400}]}]}]}',
], ids=["text-5000-digits", "json-1e400"])
def test_clusters_bad_numbers(body: str) -> None:
    with pytest.raises(ScrapeError):
        CLUSTERS.parse(body)


@FEW
@given(NONFINITE)
@example(math.inf)
def test_list_page_total_infinity_or_nan(total: float) -> None:
    with pytest.raises(KumaApiError):
        parse_list_page({"items": [], "total": total}, "GET /meshes")


@FEW
@given(YAML_KEYS.filter(lambda k: not isinstance(k, str)), SCALARS)
@example(1, "y")
def test_documents_with_mixed_key_types(key: Any, value: Any) -> None:
    doc = {"type": "Mesh", "name": "m", key: value,
           "networking": {"outbound": {"passthrough": False}}}
    with contextlib.suppress(InputError):
        parse_documents([doc])


@FEW
@given(st.text(max_size=5).filter(lambda k: k not in ("object", "oldObject")),
       YAML_KEYS.filter(lambda k: not isinstance(k, str)))
@example("extra", 0)
def test_envelope_with_mixed_key_types(text_key: str, other_key: Any) -> None:
    with contextlib.suppress(InputError):
        parse_documents([{"object": None, text_key: 1, other_key: 2}])


@pytest.mark.parametrize("meshes", [5, [{"mode": "warn"}], True], ids=["int", "list", "bool"])
def test_config_gate_meshes_not_a_mapping(meshes: Any) -> None:
    with pytest.raises(ConfigError):
        build({"gate": {"meshes": meshes}})


@pytest.mark.parametrize("raw", [
    {"limits": {"max_body_bytes": "9" * 5000}},
    {"scrape": {"interval": "9" * 400 + "s"}, "window": "1m"},
    {"scrape": {"timeout": "9" * 400 + "s"}},
    {"audit": {"retention": "9" * 400 + "s"}},
], ids=["size-5000-digits", "interval-inf", "timeout-inf", "retention-inf"])
def test_config_huge_numbers(raw: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        build(raw)


@pytest.mark.parametrize("pattern", ["a{99999999999}", "(" * 1000 + ")" * 1000],
                         ids=["repeat", "nesting"])
def test_config_bad_regular_expressions(pattern: str) -> None:
    with pytest.raises(ConfigError):
        build({"passthrough": {"clusters": pattern}})


@pytest.mark.parametrize("pattern", ["(?P<gen>outbound_passthrough_ipv4)", "(?P<v>pass_through)",
                                     "(?i)outbound_passthrough_ipv4"],
                         ids=["own-name", "clashing-name", "inline-flag"])
def test_clusters_pattern_valid_alone_but_not_inside_the_parsers(pattern: str) -> None:
    try:
        cfg = build({"passthrough": {"clusters": pattern}})
    except ConfigError:
        return
    StatsParser(cfg.passthrough_clusters)
    PromStatsParser(cfg.passthrough_clusters)


@pytest.mark.parametrize("source", [
    {"kind": "envoy", "targets": [{"url": "http://[::1:9901"}]},
    {"kind": "kuma", "url": "https://[kuma-cp:5682"},
], ids=["envoy-target", "kuma-url"])
def test_config_malformed_ipv6_url(source: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        build({"sources": [source]})


# --------------------------------------------------------------------------- JSON fast paths

# Text as a strict UTF-8 body can carry it: no lone surrogates (those only come
# from \u escapes, which json.dumps writes for them with ensure_ascii).
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6)
    | st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=0x10FFFF,
                                     exclude_categories=("Cs",)), max_size=12),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=30)


@settings(max_examples=500, deadline=None)
@given(_json_values, st.booleans(), st.integers(1, 40), st.integers(1, 60),
       st.integers(1, 12))
# At the edges of each shortcut: 4-byte characters just past the scalar
# limit, brackets just past the depth, keys just past the node count.
@example(["\U0001F600\U0001F600"], False, 40, 9, 12)
@example([[[[]]]], True, 40, 60, 3)
@example({"a": 1, "b": 2, "c": 3}, True, 6, 60, 12)
def test_json_fast_paths_never_change_the_outcome(value: object, ascii_only: bool,
                                                  max_nodes: int, max_scalar: int,
                                                  max_depth: int) -> None:
    """The loader skips its depth scan and its node/string walk when a body is
    too small for them to find anything; with small limits, the skipping and
    the full checks must agree on every body (errors included)."""
    from passguard import loader

    text = json.dumps(value, ensure_ascii=ascii_only)
    limits = loader.Limits(max_documents=5, max_depth=max_depth, max_nodes=max_nodes,
                           max_scalar_bytes=max_scalar)

    def outcome(fast: bool) -> str:
        try:
            if fast:
                loader._json_depth_check(text, limits)
                loader._json_walk(value, limits, text)
            else:
                depth, deepest = 0, 0
                for m in loader._JSON_TOKEN.finditer(text):
                    tok = m.group()
                    depth += tok in ("[", "{")
                    deepest = max(deepest, depth)
                    depth -= tok in ("]", "}")
                if deepest > limits.max_depth:
                    return "depth"
                loader._json_walk(value, limits)
        except loader.InputError as exc:
            return "depth" if "nests deeper" in str(exc) else str(exc)
        return "ok"

    assert outcome(True) == outcome(False)
