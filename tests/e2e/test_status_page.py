"""The status page (``GET /``) of a real daemon, rendered by a real headless Chromium.

Three meshes, each a real situation: ``payments`` has a real Envoy with real
passthrough traffic (NOT safe), ``catalog`` a real idle Envoy (safe), and
``orders`` a proxy whose admin port refuses connections (failed: NOT safe,
with the error shown). The catalog service's name carries HTML, which must
come out as text. Chromium loads the page with JavaScript unavailable to it
(the page has none), dumps the DOM, and takes a phone-sized screenshot.
"""

from __future__ import annotations

import asyncio
import struct
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest

from passguard.demo.traffic import EchoUpstream, send_traffic
from passguard.store.snapshot import Snapshot
from passguard.web import status_page

from .conftest import EnvoyFactory
from .procs import (
    Passguard,
    chromium_args,
    envoy_target,
    free_port,
    passguard_config,
    require_binary,
    run_chromium,
    wait_until,
)

pytestmark = pytest.mark.e2e

NASTY_SERVICE = "<script>alert('x')</script>&amp;"
PHONE = (412, 915)  # CSS pixels of a typical Android phone


# --------------------------------------------------------------------------- DOM reading


@dataclass
class MeshView:
    answer: str = ""
    text: list[str] = field(default_factory=list)

    @property
    def all_text(self) -> str:
        return " ".join(" ".join(self.text).split())


class PageParser(HTMLParser):
    """What a reader of the page sees: per mesh section, the answer and the text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.meshes: dict[str, MeshView] = {}
        self.tags: list[str] = []
        self.metas: list[dict[str, str]] = []
        self.links: list[str] = []
        self.text: list[str] = []
        self._section: str | None = None
        self._depth = 0
        self._in_answer = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.append(tag)
        if tag == "meta":
            self.metas.append(a)
        if tag == "a":
            self.links.append(a.get("href", ""))
        if tag == "section":
            if self._section is None and "data-mesh" in a:
                self._section, self._depth = a["data-mesh"], 0
                self.meshes[self._section] = MeshView()
            elif self._section is not None:
                self._depth += 1
        if tag == "span" and "answer" in a.get("class", "").split():
            self._in_answer = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "section" and self._section is not None:
            if self._depth == 0:
                self._section = None
            else:
                self._depth -= 1
        if tag == "span":
            self._in_answer = False

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._section is not None:
            view = self.meshes[self._section]
            view.text.append(data)
            if self._in_answer:
                view.answer += data


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def png_distinct_bytes(data: bytes) -> int:
    """How varied the decoded image data is (a blank page is a few values)."""
    pos, idat = 8, b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + length]
        pos += 12 + length
    return len(set(zlib.decompress(idat)))


# --------------------------------------------------------------------------- setup


@pytest.fixture
async def daemon(envoy_factory: EnvoyFactory, echo_upstream: EchoUpstream,
                 tmp_path: Path) -> AsyncIterator[Passguard]:
    busy = await envoy_factory("legacy")
    idle = await envoy_factory("unified")
    cfg = passguard_config(tmp_path, [
        envoy_target(busy.admin_url, "payments", "payments-api-1", service="payments-api"),
        envoy_target(idle.admin_url, "catalog", "catalog-web-1", service=NASTY_SERVICE),
        # Nothing listens there: a failed proxy, with its error on the page.
        envoy_target(f"http://127.0.0.1:{free_port()}", "orders", "orders-db-1",
                     service="orders-db"),
    ], interval="500ms", timeout="400ms", window="1m")
    pg = Passguard(cfg, tmp_path)
    try:
        await asyncio.to_thread(pg.start)
        await send_traffic(busy, echo_upstream, 4)

        def seen() -> bool:
            meshes = {m["mesh"]: m for m in pg.get("/v1/meshes")["meshes"]}
            return meshes["payments"]["connections"] == 4 and \
                meshes["catalog"]["verdict_if_disabled"] == "allow"

        await asyncio.to_thread(wait_until, seen, 20, "passguard to see the traffic",
                                details=pg.log_tail)
        yield pg
    finally:
        await asyncio.to_thread(pg.close)


# --------------------------------------------------------------------------- test


async def test_status_page_in_chromium(daemon: Passguard, tmp_path: Path) -> None:
    chromium = require_binary("chromium")  # the test fails, never skips, without it
    base = chromium_args(chromium, tmp_path / "chromium-profile")

    dumped = await asyncio.to_thread(run_chromium, [*base, "--dump-dom", daemon.url + "/"])
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    page = PageParser()
    page.feed(dumped.stdout)
    page.close()

    # No JavaScript, refreshes itself, made for small screens.
    assert "script" not in page.tags, "the status page must not contain <script>"
    metas = {m.get("name") or m.get("http-equiv"): m.get("content", "") for m in page.metas}
    assert int(metas["refresh"]) >= 5, metas
    assert "width=device-width" in metas["viewport"], metas
    assert {"/metrics", "/v1/meshes"} <= set(page.links), page.links
    assert {"/v1/meshes/payments", "/v1/meshes/catalog", "/v1/meshes/orders"} <= set(page.links)

    assert set(page.meshes) == {"payments", "catalog", "orders"}, page.meshes.keys()
    payments, catalog, orders = (page.meshes[m] for m in ("payments", "catalog", "orders"))

    # The busy mesh: NOT safe, with the gate's reason naming the proxy.
    assert payments.answer == "NOT safe to disable passthrough now", payments.all_text
    assert "payments-api-1 (4)" in payments.all_text, payments.all_text
    assert "Dataplanes with passthrough traffic (1)" in payments.all_text
    assert "refuse" in payments.all_text  # the gate would refuse it (enforce mode)

    # The idle mesh: safe, and the proxy is listed.
    assert catalog.answer == "safe to disable passthrough now", catalog.all_text
    assert "catalog-web-1" in catalog.all_text
    assert "Dataplanes with passthrough traffic (0)" in catalog.all_text
    # HTML in a label is text on the page, never markup.
    assert NASTY_SERVICE in catalog.all_text, catalog.all_text

    # The failed proxy: NOT safe (insufficient data), its error shown.
    assert orders.answer == "NOT safe to disable passthrough now", orders.all_text
    assert "orders-db-1" in orders.all_text
    assert "failed" in orders.all_text
    assert "Proxies passguard cannot vouch for (1)" in orders.all_text
    view = await asyncio.to_thread(daemon.get, "/v1/meshes/orders")
    [dp] = view["dataplanes"]
    assert dp["state"] == "failed" and dp["error"], dp
    assert dp["error"] in orders.all_text, (dp["error"], orders.all_text)

    # A phone-sized screenshot that shows something.
    shot = tmp_path / "page.png"
    taken = await asyncio.to_thread(run_chromium, [
        *base, f"--screenshot={shot}", f"--window-size={PHONE[0]},{PHONE[1]}",
        "--hide-scrollbars", daemon.url + "/"])
    assert taken.returncode == 0, taken.stderr[-2000:]
    data = shot.read_bytes()
    width, height = png_size(data)
    assert (width, height) == PHONE or (width / height) == pytest.approx(PHONE[0] / PHONE[1]), \
        (width, height)
    assert len(data) > 10_000, f"screenshot is only {len(data)} bytes"
    assert png_distinct_bytes(data) > 50, "the screenshot looks blank"


def test_destinations_section_is_optional_and_escaped() -> None:
    """The place for the destination inventory: absent unless given, escaped when given."""
    snap = Snapshot(time=1_700_000_000.0, window_seconds=60.0, stale_after=1.5,
                    dataplanes=(), ready=True)
    body = {"window_seconds": 60.0, "meshes": []}
    assert "id=destinations" not in status_page.render(snap, body, 1.0)
    html = status_page.render(snap, body, 1.0, now=snap.time + 90, destinations=[
        {"mesh": "m<1>", "dataplane": "web-1", "address": "93.184.216.34:443",
         "connections": 7, "last_seen": "2023-11-14T22:13:20Z"},
        {"mesh": "m", "dataplane": "<b>x</b>", "address": "[2001:db8::1]:443",
         "connections": 1, "last_seen": snap.time + 30},
    ])
    page = PageParser()
    page.feed(html)
    text = " ".join("".join(page.text).split())
    assert "External destinations (2)" in text
    assert "m<1>" in text and "<b>x</b>" in text and "b" not in page.tags
    assert "93.184.216.34:443" in text and "2023-11-14T22:13:20Z" in text
    assert "1m ago" in text  # a numeric last_seen is shown as an age
    empty = status_page.render(snap, body, 1.0, destinations=[])
    assert "No external destination seen" in empty
