"""The Kuma source's wire format: API answers in Kuma's shapes (the project's own in
tests/data/kuma/api; Kuma's own golden answers as cross-checks), the errors a
malformed answer gives, TLS settings, and the test CP's shapes."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from passguard.envoy.names import DEFAULT_CLUSTERS_PATTERN
from passguard.envoy.stats import StatsParser
from passguard.errors import ScrapeError
from passguard.sources.kuma import KumaSource, KumaSourceConfig
from passguard.sources.kumawire import (
    DataplaneInfo,
    KumaApiError,
    is_online,
    parse_dataplane_item,
    parse_list_page,
    parse_mesh_item,
)
from passguard.targets import Target
from tests.kuma_cp import FakeDataplane, FakeKumaCP
from tests.kuma_fixtures import cross_check, kuma, kuma_root, own

DATAPLANE_TYPES = {"Dataplane", "DataplaneOverview"}
#: Kuma's golden API answers whose items are dataplanes.
KUMA_DATAPLANE_FILES = ["kumactl-inspect-dataplanes.golden.json",
                        "list_dp_with_filters.golden.json",
                        "meshes_mesh1_dataplanes_insights.json"]


def load(path: Path) -> Any:
    return json.loads(path.read_text())


def parse_fixture(path: Path) -> dict[str, DataplaneInfo]:
    page = parse_list_page(load(path), path.name)
    return {dp.name: dp for dp in (parse_dataplane_item(item, f"{path.name}: items[{i}]")
                                   for i, item in enumerate(page.items))}


@pytest.mark.parametrize("path", [
    pytest.param(lambda: own("api/dataplanes-overview.json"), id="own-overview"),
    pytest.param(lambda: own("api/dataplanes.json"), id="own-dataplanes"),
    *[pytest.param(lambda name=name: kuma(f"api/{name}"), id=f"kuma-{name}", marks=cross_check)
      for name in KUMA_DATAPLANE_FILES],
])
def test_every_dataplane_answer_parses(path: Callable[[], Path]) -> None:
    doc = load(path())
    page = parse_list_page(doc, "answer")
    assert page.total == len(page.items) and page.next is None
    dps = parse_fixture(path())
    assert len(dps) == len(page.items)
    for dp, item in zip(dps.values(), page.items, strict=True):
        assert (dp.mesh, dp.name) == (item["mesh"], item["name"])
        assert dp.service, f"{dp.name} has no service"
        assert dp.address is not None


def test_overview_service_tags_gateway_and_online_rules() -> None:
    """dataplanes-overview.json: the old `service` tag, a DP without insight, a
    reconnected DP with two inbounds, one never connected, a builtin gateway."""
    dps = parse_fixture(own("api/dataplanes-overview.json"))
    api1 = dps["api-1"]
    assert api1 == DataplaneInfo(
        mesh="payments", name="api-1", address="10.20.0.11", services=("api",),
        tags={"service": "api", "team": "core"}, online=True, inbounds=api1.inbounds,
        inbound_names=api1.inbound_names, inbound_ports=api1.inbound_ports)
    assert api1.inbounds == ({"service": "api", "team": "core"},)
    # Each inbound keeps its own tags: MeshSubset selects on any one of them.
    assert dps["worker-1"].inbounds == ({"kuma.io/service": "worker", "version": "v2"},
                                        {"kuma.io/service": "worker-metrics", "version": "v2"})
    assert dps["worker-1"].inbound_ports == (9000, 9100)
    assert dps["edge-gw"].gateway_type == "builtin"
    # No transparentProxying in these items: unknown, the policy taken to apply.
    assert api1.transparent is None
    assert dps["api-2"].online is False
    # Disconnected from cp-a, then connected to cp-b: online.
    assert dps["worker-1"].online is True
    assert dps["worker-1"].services == ("worker", "worker-metrics")
    assert dps["worker-1"].service == "worker"
    assert dps["worker-1"].tags == {"kuma.io/service": "worker", "version": "v2"}
    # A subscription without a connectTime: never connected.
    assert dps["batch-1"].online is False
    assert dps["edge-gw"].gateway and dps["edge-gw"].service == "edge"
    assert dps["edge-gw"].online is True


def test_plain_dataplanes_have_unknown_online_state() -> None:
    dps = parse_fixture(own("api/dataplanes.json"))
    assert dps["ledger-1"].online is None and dps["ledger-1"].address == "10.30.0.1"
    assert dps["ledger-2"].services == ("audit", "ledger")
    assert dps["ledger-2"].tags == {"kuma.io/service": "audit"}


def test_mesh_list_paginated() -> None:
    page = parse_list_page(load(own("api/meshes-page.json")), "GET /meshes")
    assert page.total == 3 and len(page.items) == 2
    assert page.next == "http://kuma-cp.example:5681/meshes?offset=2&size=2"
    assert [parse_mesh_item(m, "m").name for m in page.items] == ["payments", "search"]


def test_inspect_stats_is_envoy_text_without_uptime() -> None:
    """An inspect answer is an Envoy `/stats` body: plain Envoy text, which
    StatsParser refuses here only for lack of server.uptime."""
    with pytest.raises(ScrapeError, match=r"no server\.uptime"):
        StatsParser(DEFAULT_CLUSTERS_PATTERN).parse(own("api/inspect-stats.txt").read_text())


# --------------------------------------------------------------------------- Kuma's own answers


@cross_check
def test_kuma_dataplane_fixtures_found() -> None:
    """Every Kuma API golden whose items are dataplanes (found, not listed by hand)."""
    found = []
    for path in sorted((kuma_root() / "api").glob("*.json")):
        doc = json.loads(path.read_text())
        if isinstance(doc, dict) and any(isinstance(i, dict) and i.get("type") in DATAPLANE_TYPES
                                         for i in doc.get("items") or []):
            found.append(path.name)
    assert found == KUMA_DATAPLANE_FILES


@cross_check
def test_kuma_insights_fixture_old_service_tag_gateways_and_offline() -> None:
    """meshes_mesh1_dataplanes_insights.json: `service` tag (pre-0.4 name), a DP
    without insight, a builtin and a delegated gateway."""
    dps = parse_fixture(kuma("api/meshes_mesh1_dataplanes_insights.json"))
    dp1 = dps["dp-1"]
    assert dp1 == DataplaneInfo(
        mesh="mesh1", name="dp-1", address="127.0.0.1", services=("backend",),
        tags={"service": "backend", "tagcolumn": "tag:v", "version": "v1"}, online=True,
        inbounds=({"service": "backend", "tagcolumn": "tag:v", "version": "v1"},),
        inbound_names=(None,), inbound_ports=dp1.inbound_ports)
    assert dps["gateway-builtin"].gateway_type == "builtin"
    assert dps["gateway-delegated"].gateway_type == "delegated"
    assert dps["dp-no-insights"].online is False
    for gw in ("gateway-builtin", "gateway-delegated"):
        assert dps[gw].gateway and dps[gw].service == "gateway" and dps[gw].online is True


@cross_check
def test_kuma_kumactl_fixture_online_rules() -> None:
    """kumactl-inspect-dataplanes.golden.json: several subscriptions, inbound health."""
    dps = parse_fixture(kuma("api/kumactl-inspect-dataplanes.golden.json"))
    # Two subscriptions, both connected, none disconnected.
    assert dps["experiment"].online is True
    assert dps["experiment"].services == ("mobile", "metrics")
    assert dps["experiment"].service == "mobile"
    assert dps["experiment"].tags == {"kuma.io/service": "mobile", "version": "v1"}
    # kumactl shows these two as degraded / offline because of inbound health;
    # their proxies are connected and forward passthrough traffic: online here.
    assert dps["degraded-dp"].online is True
    assert dps["offline-dp"].online is True
    # Subscriptions without a connectTime: never connected.
    assert dps["example"].online is False


@cross_check
def test_kuma_plain_dataplane_fixture_has_unknown_online_state() -> None:
    dps = parse_fixture(kuma("api/list_dp_with_filters.golden.json"))
    assert dps["dp-1"].online is None and dps["dp-1"].address == "10.1.2.1"
    assert dps["dp-2"].services == ("other-svc", "my-svc")
    assert dps["dp-2"].tags == {"kuma.io/service": "other-svc"}


@cross_check
def test_kuma_mesh_list_fixture_paginated() -> None:
    page = parse_list_page(load(kuma("api/list_mesh_04.paginated.golden.json")), "GET /meshes")
    assert page.total == 3 and len(page.items) == 2
    assert page.next == "http://{{address}}/meshes?offset=2&size=2"
    assert [parse_mesh_item(m, "m").name for m in page.items] == ["m1", "m2"]


@cross_check
def test_kuma_inspect_stats_fixture_is_envoy_text_without_uptime() -> None:
    """The golden inspect answer is a mocked Envoy `/stats` body (`server.live: 1`):
    plain Envoy text, which StatsParser refuses only for lack of server.uptime."""
    with pytest.raises(ScrapeError, match=r"no server\.uptime"):
        StatsParser(DEFAULT_CLUSTERS_PATTERN).parse(
            kuma("api/inspect_stats_dataplane.out").read_text())


@pytest.mark.parametrize("subscriptions, online", [
    ([], False),
    ([{"connectTime": "2019-07-01T00:00:00Z"}], True),
    ([{"connectTime": "2019-07-01T00:00:00Z", "disconnectTime": "2019-07-01T01:00:00Z"}], False),
    ([{"connectTime": "t1", "disconnectTime": "t2"}, {"connectTime": "t3"}], True),
    # A stale open subscription from a dead CP instance counts, as in Kuma.
    ([{"connectTime": "t1"}, {"connectTime": "t2", "disconnectTime": "t3"}], True),
    ([{"id": "1"}], False),
    # The OpenAPI schema's object form of a timestamp.
    ([{"connectTime": {"seconds": 1}}], True),
])
def test_is_online(subscriptions: list[dict[str, Any]], online: bool) -> None:
    assert is_online({"subscriptions": subscriptions}, "insight") is online


def _overview() -> dict[str, Any]:
    item = load(own("api/dataplanes-overview.json"))["items"][0]
    assert isinstance(item, dict)
    return copy.deepcopy(item)


def _set(item: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    node: Any = item
    keys = path.split(".")
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is _DELETE:
        del node[keys[-1]]
    elif isinstance(node, list):
        node[int(keys[-1])] = value
    else:
        node[keys[-1]] = value
    return item


_DELETE = object()


@pytest.mark.parametrize("path, value, message", [
    ("name", _DELETE, "items[0].name is missing or empty"),
    ("name", 7, "items[0].name must be a string, got a number"),
    ("mesh", "other", "items[0].mesh is 'other' in a listing of mesh 'payments'"),
    ("dataplane", [], "items[0].dataplane must be an object, got a list"),
    ("dataplane.networking.inbound", {}, "items[0].dataplane.networking.inbound must be a list"),
    ("dataplane.networking.inbound.0.tags", ["a"],
     "items[0].dataplane.networking.inbound[0].tags must be a mapping of strings, got a list"),
    ("dataplane.networking.inbound.0.tags", {"service": 1},
     "items[0].dataplane.networking.inbound[0].tags must map strings to strings"),
    ("dataplane.networking.address", 10, "items[0].dataplane.networking.address must be a str"),
    ("dataplaneInsight.subscriptions", "x", "items[0].dataplaneInsight.subscriptions must be a"),
    ("dataplaneInsight.subscriptions.0", 3,
     "items[0].dataplaneInsight.subscriptions[0] must be an object, got a number"),
    ("labels", {"a": None}, "items[0].labels must map strings to strings"),
])
def test_malformed_items_name_the_field(path: str, value: Any, message: str) -> None:
    item = _set(_overview(), path, value)
    with pytest.raises(KumaApiError) as info:
        parse_dataplane_item(item, "GET /meshes/payments/dataplanes/_overview: items[0]",
                             "payments")
    assert message in str(info.value)
    assert str(info.value).startswith("GET /meshes/payments/dataplanes/_overview: ")


@pytest.mark.parametrize("body, message", [
    ([], "must be an object, got a list"),
    ({"total": 1}, "has no items"),
    ({"items": {}, "total": 0}, "items must be a list"),
    ({"items": [], "total": -1}, "total must be a whole number"),
    ({"items": [], "total": "3"}, "total must be a whole number"),
    ({"items": [], "next": 5}, "next must be a string"),
])
def test_malformed_pages(body: Any, message: str) -> None:
    with pytest.raises(KumaApiError, match=message):
        parse_list_page(body, "GET /meshes")


def test_mesh_metrics_backend() -> None:
    mesh = parse_mesh_item({"name": "m", "metrics": {
        "enabledBackend": "prom-1",
        "backends": [{"name": "other", "type": "prometheus", "conf": {"port": 1}},
                     {"name": "prom-1", "type": "prometheus",
                      "conf": {"port": 5671, "path": "/m"}}]}}, "m")
    assert (mesh.metrics_port, mesh.metrics_path) == (5671, "/m")
    # A bad backend is not a listing error (inspect mode never reads it): the
    # problem is kept for the mesh's dataplanes in kuma-dp mode.
    bad = parse_mesh_item({"name": "m", "metrics": {"enabledBackend": "p", "backends": [
        {"name": "p", "conf": {"port": "x"}}]}}, "m")
    assert bad.metrics_port is None
    assert bad.metrics_problem is not None
    assert "backends[0].conf.port must be a port number" in bad.metrics_problem


def test_dataplane_metrics_and_labels() -> None:
    item = _overview()
    item["dataplane"]["metrics"] = {"type": "prometheus", "conf": {"port": 1234, "path": "/x"}}
    item["labels"] = {"kuma.io/zone": "z1", "team": "ignored: the tag wins"}
    dp = parse_dataplane_item(item, "i")
    assert (dp.metrics_port, dp.metrics_path) == (1234, "/x")
    assert dp.tags["kuma.io/zone"] == "z1" and dp.tags["team"] == "core"


# --------------------------------------------------------------------------- config, TLS


@pytest.mark.parametrize("patterns, mesh, wanted", [
    (("*",), "anything", True),
    (("default",), "default", True),
    (("default",), "default2", False),
    (("prod-*", "staging"), "prod-eu", True),
    (("prod-*", "staging"), "dev", False),
])
def test_meshes_patterns(patterns: tuple[str, ...], mesh: str, wanted: bool) -> None:
    assert KumaSourceConfig(url="http://cp", meshes=patterns).wants(mesh) is wanted


def test_targets_before_any_discovery_are_empty() -> None:
    source = KumaSource(KumaSourceConfig(url="http://cp:5681/"))
    assert source.targets() == [] and source.last_success is None
    assert source.headers == {}


def test_inspect_and_kuma_dp_requests() -> None:
    """Which URL, path and headers each mode gives a target (no CP needed)."""
    inspect = KumaSource(KumaSourceConfig(url="https://cp:5682/api/"))
    dp = parse_dataplane_item(_overview(), "i")
    web = DataplaneInfo("my mesh", "web-1.ns", "10.0.0.1", ("web",), {}, True)
    v6 = DataplaneInfo("m", "v6", "fd00::1", ("db",), {}, False, metrics_port=9000)
    inspect._state.dataplanes = {"payments": [dp], "my mesh": [web], "m": [v6]}
    inspect._rebuild()
    inspect._token = "t0k"
    urls = {t.key: t.url for t in inspect.targets()}
    assert urls == {"payments/api-1": "https://cp:5682/api/meshes/payments/dataplanes/api-1",
                    "my mesh/web-1.ns": "https://cp:5682/api/meshes/my%20mesh/dataplanes/web-1.ns",
                    "m/v6": "https://cp:5682/api/meshes/m/dataplanes/v6"}
    target = next(t for t in inspect.targets() if t.dataplane == "v6")
    assert target.offline and target.service == "db"
    req = inspect.request_for(target)
    assert (req.path, req.format, req.clusters_path) == ("/stats", "envoy", "/clusters")
    assert req.headers == {"Authorization": "Bearer t0k"} == inspect.headers_for(target)

    kdp = KumaSource(KumaSourceConfig(url="https://cp:5682", stats="kuma-dp"))
    kdp._token = "t0k"
    kdp._state.dataplanes = {"payments": [dp], "m": [v6]}
    kdp._rebuild()
    by_key = {t.key: t for t in kdp.targets()}
    assert by_key["payments/api-1"].url == "http://10.20.0.11:5670"
    assert by_key["m/v6"].url == "http://[fd00::1]:9000"
    req = kdp.request_for(by_key["m/v6"])
    # The CP token never goes to a dataplane's address.
    assert (req.path, req.format, req.headers, req.clusters_path) == (
        "/metrics", "prometheus", {}, None)
    assert kdp.headers_for(by_key["m/v6"]) == {}


def test_inherit_keeps_targets_across_a_reload() -> None:
    old = KumaSource(KumaSourceConfig(url="http://cp:5681", meshes=("*",)))
    a = DataplaneInfo("a", "a-1", "10.0.0.1", ("x",), {}, True)
    b = DataplaneInfo("b", "b-1", "10.0.0.2", ("y",), {}, True)
    old._state.dataplanes = {"a": [a], "b": [b]}
    old._rebuild()
    new = KumaSource(KumaSourceConfig(url="http://cp:5681/", meshes=("a",), stats="kuma-dp"))
    new.inherit(old)
    assert [(t.key, t.url) for t in new.targets()] == [("a/a-1", "http://10.0.0.1:5670")]
    other = KumaSource(KumaSourceConfig(url="http://other-cp:5681"))
    other.inherit(old)
    assert other.targets() == []


# --------------------------------------------------------------------------- the test CP


def _shape(value: Any) -> Any:
    """Keys and value kinds, recursively: what "the same shape" means here."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(value[0])] if value else []
    return type(value).__name__


@cross_check
def test_fake_cp_overview_items_have_the_fixture_shape() -> None:
    fixture = load(kuma("api/meshes_mesh1_dataplanes_insights.json"))["items"]
    online = FakeDataplane("mesh1", "dp-1", service="backend", service_tag="service",
                           tags={"tagcolumn": "tag:v", "version": "v1"}, inbound_port=1234)
    assert online.overview_item() == fixture[0]
    no_insight = FakeDataplane("mesh1", "dp-no-insights", service="backend",
                               service_tag="service", tags={"tagcolumn": "tag:v",
                                                            "version": "v1"}, inbound_port=1234,
                               insight="no-insight")
    assert no_insight.overview_item() == fixture[1]
    gateway = FakeDataplane("mesh1", "gateway-builtin", service="gateway",
                            service_tag="service", gateway=True)
    assert gateway.overview_item() == fixture[2]


@cross_check
def test_fake_cp_dataplane_items_have_the_fixture_shape() -> None:
    fixture = load(kuma("api/list_dp_with_filters.golden.json"))["items"][0]
    fake = FakeDataplane("default", "dp-1", service="my-svc", address="10.1.2.1",
                         inbound_port=1234).dataplane_item()
    assert _shape(fake) == _shape(fixture)
    assert {k: v for k, v in fake.items() if k not in ("creationTime", "modificationTime")} == \
        {k: v for k, v in fixture.items() if k not in ("creationTime", "modificationTime")}


@cross_check
async def test_fake_cp_mesh_page_has_the_fixture_shape() -> None:
    """``GET /meshes?size=2`` from the test CP, against list_mesh_04 (3 meshes)."""
    async with FakeKumaCP() as cp:
        for name in ("m1", "m2", "m3"):
            cp.add_mesh(name)
        async with aiohttp.ClientSession() as session, \
                session.get(cp.url + "/meshes?size=2") as resp:
            body = await resp.json()
    fixture = load(kuma("api/list_mesh_04.paginated.golden.json"))
    assert _shape(body) == _shape(fixture)
    fixture["next"] = fixture["next"].replace("{{address}}", cp.url.removeprefix("http://"))
    for item in (*body["items"], *fixture["items"]):
        item.pop("creationTime"), item.pop("modificationTime")
    assert body == fixture


def test_target_is_what_the_store_expects() -> None:
    source = KumaSource(KumaSourceConfig(url="http://cp"))
    source._state.dataplanes = {"m": [DataplaneInfo("m", "d", None, (), {"k": "v"}, None)]}
    source._rebuild()
    assert source.targets() == [Target(url="http://cp/meshes/m/dataplanes/d", mesh="m",
                                       dataplane="d", service="", tags={"k": "v"},
                                       offline=False)]
