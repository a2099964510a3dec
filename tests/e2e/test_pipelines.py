"""The Argo Rollouts AnalysisTemplate of docs/pipelines.md, run for real: its
PromQL, taken from the document, against a real Prometheus scraping a real
``passguard run`` that watches two real Envoys — one with its passthrough
cluster removed while the application keeps connecting (refusals), one
carrying traffic normally (none)."""

from __future__ import annotations

import asyncio
import contextlib
import re
from pathlib import Path

import pytest
import yaml

from passguard.demo.traffic import EchoUpstream, passthrough_connect, send_traffic

from .conftest import EnvoyFactory
from .procs import (
    REPO,
    Passguard,
    Prometheus,
    envoy_target,
    passguard_config,
    require_binary,
    wait_until,
)

pytestmark = pytest.mark.e2e
WAIT = 45.0


def analysis_template() -> dict[str, object]:
    """The AnalysisTemplate block under "## Verify after a deploy"."""
    text = (REPO / "docs" / "pipelines.md").read_text()
    section = text.split("## Verify after a deploy", 1)[1]
    for block in re.findall(r"```yaml\n(.*?)```", section, re.S):
        doc = yaml.safe_load(block)
        if isinstance(doc, dict) and doc.get("kind") == "AnalysisTemplate":
            return doc
    raise AssertionError("docs/pipelines.md has no AnalysisTemplate under the verify section")


def query_for(mesh: str) -> tuple[str, str]:
    [metric] = analysis_template()["spec"]["metrics"]  # type: ignore[index]
    query = metric["provider"]["prometheus"]["query"]
    assert "{{args.mesh}}" in query and metric["successCondition"] == "result[0] == 0"
    return query.replace("{{args.mesh}}", mesh), metric["successCondition"]


async def test_the_analysis_template_query_sees_refusals(
        envoy_factory: EnvoyFactory, echo_upstream: EchoUpstream, tmp_path: Path) -> None:
    binary = require_binary("prometheus")
    off = await envoy_factory("legacy", passthrough=False)
    on = await envoy_factory("legacy")
    cfg = passguard_config(tmp_path, [envoy_target(off.admin_url, "locked", "web-1"),
                                      envoy_target(on.admin_url, "open", "api-1")],
                           interval="1s", window="1m")
    pg = Passguard(cfg, tmp_path)
    prom_dir = tmp_path / "prometheus"
    prom_dir.mkdir()
    prom = Prometheus(prom_dir, interval="1s", scrape_configs=[{
        "job_name": "passguard", "scrape_interval": "1s", "scrape_timeout": "1s",
        "static_configs": [{"targets": [pg.address]}]}])
    try:
        await asyncio.to_thread(pg.start)
        await asyncio.to_thread(prom.start, binary)
        await asyncio.to_thread(wait_until, lambda: prom.values(
            'count_over_time(up{job="passguard"}[1m])', "job").get("passguard", 0) >= 3,
            WAIT, "3 scrapes of passguard", details=prom.log_tail)
        for _ in range(4):  # the application keeps trying; the proxy refuses
            with contextlib.suppress(ConnectionError, TimeoutError, OSError):
                await passthrough_connect(off.listener_host("ipv4"), off.listener_port("ipv4"),
                                          echo_upstream.host, echo_upstream.port,
                                          io_timeout=1.0)
        await send_traffic(on, echo_upstream, 3)
        locked, _ = query_for("locked")
        open_, _ = query_for("open")

        def value(expr: str) -> float | None:
            result = prom.query(expr)
            return float(result[0]["value"][1]) if result else None

        await asyncio.to_thread(wait_until, lambda: (value(locked) or 0) > 0, WAIT,
                                "the template's query to see the refusals",
                                details=lambda: prom.log_tail() + pg.log_tail())
        # The mesh without refusals answers a number, 0: the successCondition holds.
        assert value(open_) == 0.0
        # A mesh with no series at all still answers 0 (the `or vector(0)`).
        assert value(query_for("nothing-here")[0]) == 0.0
    finally:
        await asyncio.to_thread(prom.close)
        await asyncio.to_thread(pg.close)
