"""Issue 13, findings 6 and 7: what a Dataplane object can make passguard read,
and what of it passguard repeats.

In ``stats: kuma-dp`` mode a dataplane's metrics address, port and path come
from the control plane, i.e. from whoever may write a Dataplane object. Here
they point at "internal services" (tests/faults/hostile.py ``internal_*``:
a secret, control characters, a non-HTTP banner) and at addresses that are
not IP literals. A real daemon and the fake Kuma CP (tests/kuma_cp.py); every
socket is on 127.0.0.1.

* What the target answered never appears in ``/v1/meshes``, the status page,
  ``/metrics`` or a decision; those say what failed. The log has the start of
  the answer, cut, with control characters escaped.
* An address that is not an allowed IP literal, a bad port or path: that one
  dataplane is ``failed`` with the reason, nothing is sent to it, the others
  are scraped, and the daemon becomes ready.
* Any exception while reading one target fails that target only.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from passguard import config as config_mod
from passguard.envoy.stats import StatsParser
from passguard.scraper import Request, Scraper
from passguard.targets import Target
from tests.kuma_cp import FakeKumaCP

from .conftest import DaemonFactory
from .harness import api, check, dataplanes, healthy, metrics, up
from .hostile import SECRET, HostileProxies

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

TOKEN = "cp-token-egress"


@pytest.fixture
async def cp() -> AsyncIterator[FakeKumaCP]:
    async with FakeKumaCP(token=TOKEN) as server:
        yield server


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "kuma-token"
    path.write_text(TOKEN + "\n")
    return path


def kuma_dp(cp: FakeKumaCP, token_file: Path, **extra: Any) -> list[dict[str, Any]]:
    return [{"kind": "kuma", "url": cp.url, "token_file": str(token_file),
             "discovery_interval": "1s", "timeout": "2s", "stats": "kuma-dp", **extra}]


def metrics_at(hostile: HostileProxies, mode: str) -> dict[str, Any]:
    """A Dataplane ``metrics`` conf pointing at the hostile server's ``mode``."""
    return {"type": "prometheus", "conf": {"port": hostile.port, "path": f"/{mode}/metrics"}}


async def everything_shown(d: Any, mesh: str) -> str:
    """Every place a failed target's text is shown, as one string."""
    parts = []
    for path in ("/v1/meshes", f"/v1/meshes/{mesh}", "/", "/metrics"):
        status, body = await api(d, "GET", path)
        assert status == 200, (path, body)
        parts.append(str(body))
    parts.append(str(await check(d, mesh)))
    return "\n".join(parts)


async def test_an_internal_services_answer_is_not_reflected(
    cp: FakeKumaCP, token_file: Path, hostile: HostileProxies, make_daemon: DaemonFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Finding 6: three dataplanes whose metrics endpoint is an internal service
    (200 with a secret, 503 with it, a non-HTTP banner): failed, with what
    failed, and no byte of the answer anywhere but the log."""
    reasons = {"internal_200": "not Envoy stats in Prometheus format",
               "internal_503": "HTTP 503 from /internal_503/metrics",
               "internal_banner": "bad HTTP answer from /internal_banner/metrics"}
    for mode in reasons:
        cp.add_dataplane("m", mode.replace("_", "-"), address="127.0.0.1",
                         metrics=metrics_at(hostile, mode))
    cp.add_dataplane("m", "good", address="127.0.0.1", metrics=metrics_at(hostile, "prometheus"))
    caplog.set_level(logging.DEBUG, logger="passguard")
    d = await make_daemon(kuma_dp(cp, token_file), gate={"on_insufficient_data": "deny"})
    await d.cycle()
    await d.cycle()  # a repeated failure: logged again at DEBUG, still escaped

    views = await dataplanes(d, "m")
    assert views["good"]["state"] == "fresh", views["good"]
    for mode, reason in reasons.items():
        view = views[mode.replace("_", "-")]
        assert view["state"] == "failed" and reason in (view["error"] or ""), view
    shown = await everything_shown(d, "m")
    assert SECRET.decode() not in shown
    assert "forged line" not in shown and "ESMTP" not in shown

    # The log has the start of each answer: cut, and escaped (no raw ESC, no
    # newline that would start a forged line).
    logged = [r.getMessage() for r in caplog.records if SECRET.decode() in r.getMessage()]
    assert {m for m in reasons if any(m.replace("_", "-") in line for line in logged)} \
        == set(reasons), logged
    for line in logged:
        assert "\x1b" not in line and "\n" not in line, line
        assert len(line) < 1000, len(line)
    assert any("\\x1b[2J\\nFAKE" in line for line in logged), logged


@pytest.mark.parametrize("address, why", [
    ("127.0.0.1:19998/injected#", "is not an IP address"),
    ("localhost", "is not an IP address"),
    ("internal.example", "is not an IP address"),
    ("169.254.169.254", "link-local"),
    ("0.0.0.0", "unspecified"),
    ("fe80::1%eth0", "has a zone"),
])
async def test_a_bad_dataplane_address_fails_that_target_alone(
    cp: FakeKumaCP, token_file: Path, hostile: HostileProxies, make_daemon: DaemonFactory,
    address: str, why: str,
) -> None:
    """Findings 6 and 7: the exact address from the issue (which raised
    ValueError and stopped every scrape), names and non-unicast addresses.
    The dataplane is failed with the reason and never contacted; the other
    one is scraped, the daemon is ready and healthy."""
    cp.add_dataplane("m", "good", address="127.0.0.1", metrics=metrics_at(hostile, "prometheus"))
    cp.add_dataplane("m", "bad", address=address, metrics=metrics_at(hostile, "internal_200"))
    d = await make_daemon(kuma_dp(cp, token_file))
    await d.cycle()
    views = await dataplanes(d, "m")
    assert views["good"]["state"] == "fresh", views["good"]
    assert views["bad"]["state"] == "failed", views["bad"]
    assert why in views["bad"]["error"] and "not scraped" in views["bad"]["error"]
    assert hostile.hits["internal_200"] == 0
    status, _ = await api(d, "GET", "/-/ready")
    assert status == 200 and await healthy(d)
    assert up(await metrics(d), "m", "bad") == 0.0
    decision = (await check(d, "m"))["decisions"][0]
    assert any("bad" in r and why in r for r in decision["reasons"]), decision["reasons"]


async def test_allowed_cidrs_and_metrics_conf_are_checked(
    cp: FakeKumaCP, token_file: Path, hostile: HostileProxies, make_daemon: DaemonFactory,
) -> None:
    """``allowed_cidrs`` confines the addresses (a link-local one may be
    allowed on purpose); a port or path that cannot be used fails the one
    dataplane, not the listing."""
    cp.add_dataplane("m", "good", address="127.0.0.1", metrics=metrics_at(hostile, "prometheus"))
    cp.add_dataplane("m", "outside", address="10.1.2.3", metrics=metrics_at(hostile, "ok"))
    cp.add_dataplane("m", "query", address="127.0.0.1", metrics={
        "type": "prometheus", "conf": {"port": hostile.port, "path": "/ok/x?redirect=1"}})
    cp.add_dataplane("m", "port", address="127.0.0.1", metrics={
        "type": "prometheus", "conf": {"port": 70000, "path": "/ok/metrics"}})
    d = await make_daemon(kuma_dp(cp, token_file, allowed_cidrs=["127.0.0.0/8", "fd00::/8"]))
    await d.cycle()
    assert d.sources.kuma[0].last_error is None
    views = await dataplanes(d, "m")
    assert views["good"]["state"] == "fresh", views["good"]
    assert "10.1.2.3 is not inside allowed_cidrs" in views["outside"]["error"]
    assert "is not a plain URL path" in views["query"]["error"]
    assert "conf.port must be a port number, got 70000" in views["port"]["error"]
    assert {views[k]["state"] for k in ("outside", "query", "port")} == {"failed"}
    assert hostile.hits["ok"] == 0


async def test_any_exception_fails_one_target_not_the_cycle(
    hostile: HostileProxies, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """Finding 7, below any validation: a URL yarl refuses (the issue's
    ValueError), a request_for that raises, a parser that raises an
    unexpected error quoting the answer. Each fails its own target with a
    reason; the good target is read in the same cycle."""
    cfg = config_mod.build({"sources": [{"kind": "envoy", "targets": []}],
                            "scrape": {"timeout": "1s"}}, tmp_path)
    scraper = Scraper(cfg)
    good = Target(hostile.url("ok"), "m", "good")
    bad_url = Target("http://[127.0.0.1:19998/injected#]:5670", "m", "bad-url")
    raising = Target(hostile.url("ok"), "m", "raising")
    parser_bug = Target(hostile.url("internal_200"), "m", "parser-bug")

    def request_for(t: Target) -> Request | None:
        if t is raising:
            raise RuntimeError("a source bug")
        return None

    original = StatsParser.parse

    def parse(self: StatsParser, text: str) -> Any:
        if SECRET.decode() in text:
            raise ValueError(f"could not read {text[:60]!r}")
        return original(self, text)

    caplog.set_level(logging.ERROR, logger="passguard")
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(StatsParser, "parse", parse)
            results = {r.target.dataplane: r
                       for r in await scraper.cycle([good, bad_url, raising, parser_bug],
                                                    request_for)}
    finally:
        await scraper.close()
    assert results["good"].error is None and results["good"].reading is not None
    assert results["bad-url"].error == "the target URL is not valid: Invalid IPv6 URL"
    assert "internal error while reading this target (RuntimeError" in (
        results["raising"].error or "")
    assert "(ValueError; details in the log)" in (results["parser-bug"].error or "")
    assert all(SECRET.decode() not in (r.error or "") for r in results.values())
    # The log line of the unexpected error is escaped like an answer.
    assert any("parser-bug" in r.getMessage() and SECRET.decode() in r.getMessage()
               and "\x1b" not in r.getMessage() for r in caplog.records)
