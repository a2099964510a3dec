"""The ``kuma`` source against a test Kuma CP (tests/kuma_cp.py) with real Envoys behind it.

Discovery is checked through HTTP, as passguard does it in production: pages
followed to the end, insights turned into offline dataplanes, the bearer token
(re-read at every pass), a CP that is down, slow, refusing, paginating wrongly
or answering nonsense (the last known list is kept and the problem shown),
dataplanes and meshes that go away (dropped), the ``meshes`` filter, TLS.
The inspect endpoints proxy real Envoys, whose full unfiltered ``/stats`` and
``/clusters`` bodies are parsed by passguard's own parsers.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import trustme

from passguard.demo.sidecar import EnvoyProcess
from passguard.demo.traffic import EchoUpstream, passthrough_connect, send_traffic
from passguard.envoy.admin import AdminClient
from passguard.envoy.clusters import ClustersParser, Destination
from passguard.envoy.names import DEFAULT_CLUSTERS_PATTERN, stats_filter
from passguard.envoy.promtext import PromStatsParser
from passguard.envoy.stats import Counters, StatsParser
from passguard.errors import ScrapeError
from passguard.sources.kuma import KumaSource, KumaSourceConfig
from passguard.targets import Target
from tests.kuma_cp import FakeKumaCP

from .conftest import EnvoyFactory

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

TOKEN = "s3cret-token"


@pytest.fixture
async def cp() -> AsyncIterator[FakeKumaCP]:
    async with FakeKumaCP(token=TOKEN) as server:
        yield server


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "kuma-token"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture
async def admin() -> AsyncIterator[AdminClient]:
    client = AdminClient(concurrency=8, max_bytes=64 * 1024 * 1024)
    try:
        yield client
    finally:
        await client.close()


class Sources:
    """Makes KumaSources and closes them all at teardown."""

    def __init__(self) -> None:
        self.made: list[KumaSource] = []

    def __call__(self, cp: FakeKumaCP, token_file: Path | None, **kwargs: Any) -> KumaSource:
        cfg = KumaSourceConfig(url=cp.url, token_file=str(token_file) if token_file else None,
                               **{"timeout": 5.0, "discovery_interval": 10.0, **kwargs})
        source = KumaSource(cfg)
        self.made.append(source)
        return source


@pytest.fixture
async def sources() -> AsyncIterator[Sources]:
    made = Sources()
    try:
        yield made
    finally:
        for source in made.made:
            await source.close()


def keys(source: KumaSource) -> list[str]:
    return [t.key for t in source.targets()]


async def _until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll (bounded): the source has no event to wait on, by design."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


def pages(cp: FakeKumaCP, path: str) -> list[str]:
    return [r.path_qs for r in cp.requests if r.path_qs.split("?")[0] == path]


# --------------------------------------------------------------------------- discovery


async def test_discovery_follows_every_page(cp: FakeKumaCP, token_file: Path,
                                            sources: Sources) -> None:
    for mesh in ("default", "prod", "staging"):
        cp.add_mesh(mesh)
    for i in range(5):
        cp.add_dataplane("default", f"web-{i}", service="web", tags={"version": f"v{i}"},
                         labels={"kuma.io/zone": "zone-1"})
    cp.add_dataplane("prod", "api-1", service="api")
    cp.add_dataplane("prod", "gw", service="edge", gateway=True)
    source = sources(cp, token_file, page_size=2)
    await source.discover()

    assert source.last_error is None and source.last_success is not None
    assert keys(source) == [*(f"default/web-{i}" for i in range(5)), "prod/api-1", "prod/gw"]
    assert pages(cp, "/meshes") == ["/meshes?offset=0&size=2", "/meshes?offset=2&size=2"]
    assert pages(cp, "/meshes/default/dataplanes/_overview") == [
        f"/meshes/default/dataplanes/_overview?offset={o}&size=2" for o in (0, 2, 4)]
    assert pages(cp, "/meshes/staging/dataplanes/_overview") == [
        "/meshes/staging/dataplanes/_overview?offset=0&size=2"]
    web = source.targets()[3]
    assert web == Target(url=f"{cp.url}/meshes/default/dataplanes/web-3", mesh="default",
                         dataplane="web-3", service="web",
                         tags={"version": "v3", "kuma.io/service": "web",
                               "kuma.io/zone": "zone-1"})
    gw = source.targets()[-1]
    assert gw.service == "edge" and not gw.offline
    assert source.overview_path == "/dataplanes/_overview"
    # Every request carried the token from the file.
    assert {r.authorization for r in cp.requests} == {f"Bearer {TOKEN}"}


async def test_offline_from_insights(cp: FakeKumaCP, token_file: Path, sources: Sources) -> None:
    cp.add_dataplane("default", "online", insight="online")
    cp.add_dataplane("default", "disconnected", insight="disconnected")
    cp.add_dataplane("default", "no-insight", insight="no-insight")
    cp.add_dataplane("default", "never-connected", insight="never-connected")
    source = sources(cp, token_file)
    await source.discover()
    assert {t.dataplane: t.offline for t in source.targets()} == {
        "online": False, "disconnected": True, "no-insight": True, "never-connected": True}
    # A proxy reconnects: online again at the next pass.
    cp.dataplanes[("default", "disconnected")].insight = "online"
    await source.discover()
    assert {t.dataplane: t.offline for t in source.targets()}["disconnected"] is False


async def test_removed_dataplanes_and_meshes_are_dropped(cp: FakeKumaCP, token_file: Path,
                                                         sources: Sources) -> None:
    cp.add_dataplane("a", "a-1")
    cp.add_dataplane("a", "a-2")
    cp.add_dataplane("b", "b-1")
    source = sources(cp, token_file)
    await source.discover()
    assert keys(source) == ["a/a-1", "a/a-2", "b/b-1"]
    cp.remove_dataplane("a", "a-2")
    await source.discover()
    assert keys(source) == ["a/a-1", "b/b-1"]
    cp.remove_mesh("b")
    await source.discover()
    assert keys(source) == ["a/a-1"] and source.meshes() == ["a"]
    assert source.last_error is None


async def test_meshes_filter(cp: FakeKumaCP, token_file: Path, sources: Sources) -> None:
    for mesh in ("prod-eu", "prod-us", "staging", "dev"):
        cp.add_dataplane(mesh, f"{mesh}-1")
    source = sources(cp, token_file, meshes=("prod-*", "staging"))
    await source.discover()
    assert keys(source) == ["prod-eu/prod-eu-1", "prod-us/prod-us-1", "staging/staging-1"]
    # Meshes that are not wanted are not even listed.
    assert not pages(cp, "/meshes/dev/dataplanes/_overview")


async def test_old_kuma_without_overview(cp: FakeKumaCP, token_file: Path,
                                         sources: Sources) -> None:
    cp.overview = False
    cp.add_dataplane("default", "web-1")
    cp.add_dataplane("other", "web-2", insight="disconnected")
    source = sources(cp, token_file)
    await source.discover()
    assert source.last_error is None
    assert source.overview_path == "/dataplanes+insights"
    assert {t.key: t.offline for t in source.targets()} == {"default/web-1": False,
                                                            "other/web-2": True}
    # Remembered: the next pass asks the older path directly.
    cp.requests.clear()
    await source.discover()
    assert source.last_error is None
    assert not any("/_overview" in r.path_qs for r in cp.requests)


# --------------------------------------------------------------------------- failures


async def _known(cp: FakeKumaCP, source: KumaSource) -> tuple[list[Target], float]:
    """A first good pass; returns its targets and last_success."""
    cp.add_dataplane("default", "web-1")
    cp.add_dataplane("default", "web-2")
    await source.discover()
    assert source.last_error is None and source.last_success is not None
    return source.targets(), source.last_success


async def test_token_auth(cp: FakeKumaCP, token_file: Path, sources: Sources) -> None:
    source = sources(cp, token_file)
    known, success = await _known(cp, source)
    # The token rotates on the CP; the file still holds the old one.
    cp.token = "rotated"
    await source.discover()
    assert source.last_error is not None
    assert "HTTP 401 Unauthorized" in source.last_error
    assert f"the CP refused the token from {token_file}" in source.last_error
    assert source.targets() == known and source.last_success == success
    assert source.consecutive_failures == 1
    # The file is re-read at the next pass: the new token works, and is the one
    # handed out for the inspect requests.
    await asyncio.to_thread(token_file.write_text, "rotated")
    cp.add_dataplane("default", "web-3")
    await source.discover()
    assert source.last_error is None and len(source.targets()) == 3
    assert source.headers_for(source.targets()[0]) == {"Authorization": "Bearer rotated"}
    assert source.consecutive_failures == 0


async def test_token_problems_are_named(cp: FakeKumaCP, tmp_path: Path,
                                        sources: Sources) -> None:
    cp.add_dataplane("default", "web-1")
    no_token = sources(cp, None)
    await no_token.discover()
    assert no_token.last_error is not None
    assert "HTTP 401 Unauthorized (the CP wants a token: set token_file)" in no_token.last_error
    missing = sources(cp, tmp_path / "absent")
    await missing.discover()
    assert missing.last_error == f"cannot read token_file {tmp_path / 'absent'}: " \
                                 "No such file or directory"
    empty = tmp_path / "empty"
    empty.write_text("\n")
    blank = sources(cp, empty)
    await blank.discover()
    assert blank.last_error == f"token_file {empty} is empty"
    # Nothing was sent with a missing or empty token.
    assert all(r.authorization is None for r in cp.requests)


async def test_cp_down_keeps_the_last_list(cp: FakeKumaCP, token_file: Path,
                                           sources: Sources) -> None:
    source = sources(cp, token_file)
    known, success = await _known(cp, source)
    await cp.stop()
    start = time.monotonic()
    await source.discover()
    assert time.monotonic() - start < 5
    assert source.last_error is not None
    assert f"cannot connect to the Kuma CP at {cp.url}" in source.last_error
    assert source.targets() == known and source.last_success == success
    await cp.start()
    cp.remove_dataplane("default", "web-2")
    await source.discover()
    assert source.last_error is None and keys(source) == ["default/web-1"]
    assert source.last_success is not None and source.last_success > success


async def test_slow_cp_is_bounded(cp: FakeKumaCP, token_file: Path, sources: Sources) -> None:
    source = sources(cp, token_file, timeout=0.3)
    known, _ = await _known(cp, source)
    cp.slow(r"^/meshes/default/dataplanes", 10.0)
    start = time.monotonic()
    await source.discover()
    # Not waiting for the 10 s answer (a hang bound, not a speed claim).
    assert time.monotonic() - start < 5.0
    assert source.last_error is not None
    assert "no complete answer from the Kuma CP within 0.3s" in source.last_error
    assert source.targets() == known


async def test_a_failing_mesh_keeps_its_list_others_update(cp: FakeKumaCP, token_file: Path,
                                                           sources: Sources) -> None:
    cp.add_dataplane("a", "a-1")
    cp.add_dataplane("b", "b-1")
    source = sources(cp, token_file)
    await source.discover()
    cp.add_dataplane("a", "a-2")
    cp.remove_dataplane("b", "b-1")
    cp.fail(r"^/meshes/b/", 500)
    await source.discover()
    assert keys(source) == ["a/a-1", "a/a-2", "b/b-1"]
    assert list(source.mesh_errors) == ["b"]
    assert source.last_error is not None
    assert "GET /meshes/b/dataplanes/_overview: HTTP 500 from the Kuma CP: Injected failure" \
        in source.last_error
    cp.clear_faults()
    await source.discover()
    assert keys(source) == ["a/a-1", "a/a-2"] and source.mesh_errors == {}


@pytest.mark.parametrize("mode, message", [
    ("next-self", "GET /meshes/default/dataplanes/_overview?offset=0&size=1: pagination does "
                  "not advance (next 'http://127.0.0.1:"),
    ("total-lies", "GET /meshes: the CP reported total 6 but its pages held 1 items "
                   "(1 distinct)"),
    ("empty-next", "GET /meshes?offset=1&size=1: an empty page whose next"),
])
async def test_wrong_pagination_is_an_error_not_a_shorter_list(
        cp: FakeKumaCP, token_file: Path, sources: Sources, mode: Any, message: str) -> None:
    source = sources(cp, token_file, page_size=1)
    cp.add_dataplane("default", "web-0")
    known, _ = await _known(cp, source)
    cp.pagination = mode
    cp.remove_dataplane("default", "web-2")  # would be dropped by a trusted listing
    cp.requests.clear()
    start = time.monotonic()
    await source.discover()
    assert time.monotonic() - start < 5
    assert source.last_error is not None and message in source.last_error, source.last_error
    assert source.targets() == known
    assert len(cp.requests) < 50  # gave up, did not loop


async def test_next_on_another_host_is_followed_here(cp: FakeKumaCP, token_file: Path,
                                                     sources: Sources) -> None:
    """A CP behind a proxy writes `next` with a host passguard must not call (it
    would get the token): only the offset is taken from it."""
    cp.pagination = "foreign-next"
    for i in range(3):
        cp.add_dataplane("default", f"web-{i}")
    source = sources(cp, token_file, page_size=1)
    await source.discover()
    assert source.last_error is None and len(source.targets()) == 3
    assert len(pages(cp, "/meshes/default/dataplanes/_overview")) == 3


@pytest.mark.parametrize("hook, message", [
    (lambda item: {**item, "dataplane": {"networking": {"inbound": [{"tags": "web"}]}}},
     "items[0].dataplane.networking.inbound[0].tags must be a mapping of strings, got a string"),
    (lambda item: {k: v for k, v in item.items() if k != "name"}, "items[0].name is missing"),
    (lambda item: "dp", "items[0] must be an object, got a string"),
])
async def test_malformed_items_keep_the_list(cp: FakeKumaCP, token_file: Path, sources: Sources,
                                             hook: Any, message: str) -> None:
    source = sources(cp, token_file)
    known, _ = await _known(cp, source)
    cp.item_hook = hook
    await source.discover()
    assert source.last_error is not None
    assert f"GET /meshes/default/dataplanes/_overview: {message}" in source.last_error
    assert source.targets() == known


async def test_not_json_and_not_a_list(cp: FakeKumaCP, token_file: Path,
                                       sources: Sources) -> None:
    source = sources(cp, token_file)
    known, _ = await _known(cp, source)
    cp.fail(r"^/meshes\?", 200, body="<html><body>Sign in</body></html>")
    await source.discover()
    assert source.last_error == ("GET /meshes: the answer is not JSON "
                                 "(starts '<html><body>Sign in</body></html>')")
    cp.clear_faults()
    cp.fail(r"^/meshes\?", 403)
    await source.discover()
    assert source.last_error is not None
    assert source.last_error.startswith("GET /meshes: HTTP 403 Forbidden")
    assert source.targets() == known


async def test_kuma_dp_mode_needs_an_address(cp: FakeKumaCP, token_file: Path,
                                             sources: Sources) -> None:
    """A dataplane without an address is listed and fails alone (it is unknown
    to the gate); the listing, and the mesh's other dataplanes, stand."""
    cp.add_dataplane("default", "web-1")
    cp.add_dataplane("default", "web-2")
    cp.item_hook = lambda item: item if item["name"] == "web-2" else \
        {**item, "dataplane": {"networking": {"inbound": []}}}
    source = sources(cp, token_file, stats="kuma-dp")
    await source.discover()
    assert source.last_error is None and keys(source) == ["default/web-1", "default/web-2"]
    by_name = {t.dataplane: t for t in source.targets()}
    invalid = source.request_for(by_name["web-1"]).invalid
    assert invalid is not None and "networking.address is missing" in invalid
    assert source.request_for(by_name["web-2"]).invalid is None


async def test_tls_ca_file(tmp_path: Path, token_file: Path, sources: Sources) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    async with FakeKumaCP(token=TOKEN, ssl_context=server_ctx) as tls_cp:
        tls_cp.add_dataplane("default", "web-1")
        assert tls_cp.url.startswith("https://")
        trusted = sources(tls_cp, token_file, ca_file=str(ca_file))
        await trusted.discover()
        assert trusted.last_error is None and keys(trusted) == ["default/web-1"]
        assert trusted.targets()[0].url.startswith("https://127.0.0.1:")

        untrusted = sources(tls_cp, token_file)
        await untrusted.discover()
        assert untrusted.last_error is not None
        assert (f"the TLS certificate of the Kuma CP at {tls_cp.url.rstrip('/')} "
                "is not trusted") in untrusted.last_error
        assert "set ca_file" in untrusted.last_error

        skip = sources(tls_cp, token_file, insecure_skip_verify=True)
        await skip.discover()
        assert skip.last_error is None


# --------------------------------------------------------------------------- inspect stats


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


async def test_inspect_stats_of_real_envoys(cp: FakeKumaCP, token_file: Path, sources: Sources,
                                            admin: AdminClient, envoy_factory: EnvoyFactory,
                                            echo_upstream: EchoUpstream,
                                            echo_upstream_v6: EchoUpstream) -> None:
    legacy = await envoy_factory("legacy")
    unified = await envoy_factory("unified", admin="unix")
    idle = await envoy_factory("legacy")
    await send_traffic(legacy, echo_upstream, 7)
    await send_traffic(legacy, echo_upstream_v6, 2)
    await send_traffic(unified, echo_upstream, 3)
    held = await passthrough_connect(unified.listener_host(), unified.listener_port(),
                                     echo_upstream.host, echo_upstream.port, hold=True)
    try:
        await settle(legacy, 0)
        await settle(unified, 1)
        cp.add_dataplane("default", "legacy-1", admin_url=legacy.admin_url, service="web")
        cp.add_dataplane("default", "unified-1", admin_url=unified.admin_url, service="api")
        cp.add_dataplane("default", "idle-1", admin_url=idle.admin_url, service="batch")
        cp.add_dataplane("default", "gone-1", insight="disconnected")
        source = sources(cp, token_file, page_size=2)
        await source.discover()
        assert source.last_error is None
        targets = {t.dataplane: t for t in source.targets()}
        assert targets["gone-1"].offline

        stats = StatsParser(DEFAULT_CLUSTERS_PATTERN)
        clusters = ClustersParser(DEFAULT_CLUSTERS_PATTERN)
        readings = {}
        for name in ("legacy-1", "unified-1", "idle-1"):
            req = source.request_for(targets[name])
            # The full body (no filter: the inspect API has none), as passguard reads it.
            body = await admin.get(req.base, req.path, timeout=5.0, headers=req.headers)
            # Full bodies: every stat of the proxy, not only passthrough ones.
            assert "cluster_manager.active_clusters" in body
            readings[name] = stats.parse(body)
        assert readings["legacy-1"].families == {
            "ipv4": Counters(cx_total=7, cx_active=0, tx_bytes=35, rx_bytes=35),
            "ipv6": Counters(cx_total=2, cx_active=0, tx_bytes=10, rx_bytes=10),
        }
        assert readings["unified-1"].families["ipv4"].cx_total == 4
        assert readings["unified-1"].families["ipv4"].cx_active == 1
        # usedonly (Kuma 2.14's default): an idle proxy's counters are absent = zero.
        assert readings["idle-1"].families == {}
        assert readings["idle-1"].uptime is not None

        # Destinations through the inspect `/clusters`.
        req = source.request_for(targets["legacy-1"])
        assert req.clusters_path == "/clusters"
        body = await admin.get(req.base, req.clusters_path, timeout=5.0, headers=req.headers)
        assert clusters.parse(body) == [
            Destination(f"127.0.0.1:{echo_upstream.port}", "ipv4", 7, 0),
            Destination(f"[::1]:{echo_upstream_v6.port}", "ipv6", 2, 0),
        ]

        # Without the token the CP refuses, and the scrape error says so.
        with pytest.raises(ScrapeError, match="HTTP 401"):
            await admin.get(targets["legacy-1"].url, "/stats", timeout=5.0)
        # An offline dataplane cannot be inspected (the scraper skips it anyway).
        with pytest.raises(ScrapeError, match="HTTP 500"):
            await admin.get(targets["gone-1"].url, "/stats", timeout=5.0,
                            headers=source.headers_for(targets["gone-1"]))
    finally:
        await held.close()


async def test_kuma_dp_mode_reads_prometheus_text(cp: FakeKumaCP, token_file: Path,
                                                  sources: Sources, admin: AdminClient,
                                                  envoy_factory: EnvoyFactory,
                                                  echo_upstream: EchoUpstream) -> None:
    """``stats: kuma-dp``: the target is the dataplane's metrics endpoint (here a
    real Envoy's /stats/prometheus stands in for kuma-dp on :5670)."""
    envoy = await envoy_factory("legacy")
    await send_traffic(envoy, echo_upstream, 5)
    await settle(envoy, 0)
    port = int(envoy.admin_url.rsplit(":", 1)[1])
    cp.add_dataplane("default", "web-1", address="127.0.0.1",
                     metrics={"type": "prometheus",
                              "conf": {"port": port, "path": "/stats/prometheus"}})
    source = sources(cp, token_file, stats="kuma-dp")
    await source.discover()
    assert source.last_error is None
    (target,) = source.targets()
    assert target.url == f"http://127.0.0.1:{port}"
    req = source.request_for(target)
    assert (req.path, req.format, dict(req.headers)) == ("/stats/prometheus", "prometheus", {})
    prom = PromStatsParser(DEFAULT_CLUSTERS_PATTERN).parse(
        await admin.get(req.base, req.path, timeout=5.0, headers=req.headers))
    direct = StatsParser(DEFAULT_CLUSTERS_PATTERN).parse(await envoy.admin_get("/stats"))
    assert prom.families == direct.families
    assert prom.families["ipv4"].cx_total == 5
