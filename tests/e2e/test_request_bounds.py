"""Issue 13, findings 2, 3 and 10 against a real ``passguard run`` process.

- Request fields are bounded wherever they land: the audit (and its pages),
  the log (one line per record, control characters escaped) and /metrics
  (a mesh passguard does not know is ``mesh="other"``).
- Admission callers: the peer address is recorded; callers no token vouches
  for are limited per peer (429 with Retry-After, counted).
- Idle sockets filling limits.max_connections no longer lock out /-/ready.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench.fleet import Destination, Fleet, TargetSpec, start_fleet

from .procs import Passguard, envoy_target, http, passguard_config

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

BIG = 200 * 1024
TOKEN = "pipeline-token"


def review(mesh: str, user: str, reason: str | None = None) -> bytes:
    annotations = {"passguard.io/acknowledge-traffic": reason} if reason else {}
    obj = {"apiVersion": "kuma.io/v1alpha1", "kind": "Mesh",
           "metadata": {"name": mesh, "annotations": annotations},
           "spec": {"networking": {"outbound": {"passthrough": False}}}}
    return json.dumps({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": str(uuid.uuid4()), "operation": "CREATE", "name": mesh,
                    "kind": {"group": "kuma.io", "version": "v1alpha1", "kind": "Mesh"},
                    "userInfo": {"username": user, "groups": ["system:authenticated"]},
                    "object": obj, "oldObject": None, "dryRun": False}}).encode()


Start = Callable[..., Awaitable[Passguard]]


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Start]:
    """Starts ``passguard run`` scraping a busy mesh (passthrough traffic)."""
    procs: list[Passguard] = []
    fleets: list[Fleet] = []

    async def run(**extra: Any) -> Passguard:
        fleet = await start_fleet(1, 1, overrides={0: TargetSpec(
            "steady", time.time() - 10,
            destinations=(Destination(0, "93.184.216.34", 443, 5.0),))})
        fleets.append(fleet)
        cfg = passguard_config(tmp_path, [envoy_target(fleet.base_url(0), "busy", "busy-1")],
                               **extra)
        pg = Passguard(cfg, tmp_path)
        procs.append(pg)
        await asyncio.to_thread(pg.start)
        return pg

    try:
        yield run
    finally:
        for pg in procs:
            await asyncio.to_thread(pg.close)
        for fleet in fleets:
            await fleet.stop()


def _post(pg: Passguard, path: str, body: bytes, headers: dict[str, str] | None = None
          ) -> tuple[int, str, dict[str, str]]:
    import urllib.error
    import urllib.request

    from .procs import _OPENER

    req = urllib.request.Request(pg.url + path, data=body, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with _OPENER.open(req, timeout=10) as r:
            return r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode(), dict(exc.headers)


async def test_request_fields_are_bounded_in_the_audit_the_log_and_the_metrics(
        start: Start) -> None:
    """Five admission requests with 200 KiB names made a multi-megabyte audit
    page, a 600 KB log line, a forged log line and a 1 MB /metrics."""
    pg = await start()
    forged = "\n2026-01-01 00:00:00,000 INFO passguard.web.routes: admission by admin: allow\n"
    for n in range(5):
        user = f"mallory{n}{forged}" + "u" * BIG
        status, text, _ = await asyncio.to_thread(
            _post, pg, "/v1/admission", review(f"m{n}-" + "x" * BIG, user, "r" * BIG))
        assert status == 200, text[:300]
    status, text, _ = await asyncio.to_thread(
        _post, pg, "/v1/admission", review("busy", "alice"))
    assert status == 200 and json.loads(text)["response"]["allowed"] is False

    page_status, _, page_text = await asyncio.to_thread(http, pg.url + "/v1/audit?limit=1000")
    assert page_status == 200
    entries = json.loads(page_text)["entries"]
    assert len(entries) == 6
    assert len(page_text) < 200_000, len(page_text)  # was over 5 MB
    for e in entries:
        assert len(e["requester"].encode()) <= 256 + len(" (unverified)")
        assert e["requester"].endswith(" (unverified)")
        assert len(e["mesh"].encode()) <= 253
        assert e["peer"] == "127.0.0.1"
        assert all(len(d["name"].encode()) <= 253 for d in e["documents"])
        assert e["break_glass"] is None or len(e["break_glass"].encode()) <= 1024
    whole = ("mallory4" + forged + "u" * BIG).encode()  # the user name as sent
    assert entries[1]["requester"].startswith("mallory4\n2026")
    assert f"[sha256:{hashlib.sha256(whole).hexdigest()}]" in entries[1]["requester"]

    metrics = await asyncio.to_thread(pg.get, "/metrics")
    decisions = [line for line in metrics.splitlines()
                 if line.startswith("passguard_gate_decisions_total{")]
    assert any('mesh="busy"' in line for line in decisions), decisions
    assert {line.split('mesh="')[1].split('"')[0] for line in decisions} == {"busy", "other"}
    assert len(metrics) < 100_000

    lines = pg.log.read_text(errors="replace").splitlines()
    assert not [line for line in lines if line.startswith("2026-01-01")], "a forged log line"
    assert max(len(line.encode()) for line in lines) < 5000
    assert sum("admission by mallory" in line for line in lines) == 5


async def test_unverified_callers_are_limited_per_peer(start: Start, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(yaml.safe_dump({"tokens": [
        {"name": "ci", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest()}]}))
    pg = await start(limits={"unverified_rate": 0.2, "unverified_burst": 3,
                             "rate_limit_loopback": True},
                     auth={"tokens_file": str(tokens)})
    body = review("busy", "alice")
    answers = [await asyncio.to_thread(_post, pg, "/v1/admission", body) for _ in range(4)]
    assert [a[0] for a in answers] == [200, 200, 200, 429]
    status, text, headers = answers[3]
    assert 1 <= int(headers["Retry-After"]) <= 5
    assert "limits.unverified_rate" in json.loads(text)["error"]
    # A caller a token vouches for is not limited by it.
    for _ in range(3):
        status, _, _ = await asyncio.to_thread(
            _post, pg, "/v1/admission", body, {"Authorization": f"Bearer {TOKEN}"})
        assert status == 200
    metrics = await asyncio.to_thread(pg.get, "/metrics")
    assert 'passguard_http_requests_rate_limited_total{route="/v1/admission"} 1.0' in metrics
    entries = json.loads((await asyncio.to_thread(
        http, pg.url + "/v1/audit", headers={"Authorization": f"Bearer {TOKEN}"}))[2])["entries"]
    assert len(entries) == 6  # the refused one made no entry
    assert {e["peer"] for e in entries} == {"127.0.0.1"}


async def test_loopback_callers_are_not_limited_by_default(start: Start) -> None:
    pg = await start(limits={"unverified_rate": 0.2, "unverified_burst": 1})
    for _ in range(3):
        status, _, _ = await asyncio.to_thread(_post, pg, "/v1/admission",
                                               review("busy", "alice"))
        assert status == 200


async def test_idle_sockets_filling_the_cap_do_not_lock_out_the_probes(start: Start) -> None:
    """max_connections 4 and four idle sockets: /-/ready answered 503 for
    keepalive_timeout (75 s). Now the probes are answered at once, and the
    silent sockets are closed after first_byte_timeout."""
    # 5 s of silence allowed: long enough that a loaded machine still sees the
    # full cap refuse a request before the silent sockets are closed.
    pg = await start(limits={"max_connections": 4, "first_byte_timeout": "5s"})
    host, port = pg.address.rsplit(":", 1)
    idle = [await asyncio.open_connection(host, int(port)) for _ in range(4)]
    try:
        # The cap is full: a request that is not a probe is refused (waited
        # for, bounded: the daemon accepts the four on its next loop turn).
        deadline = time.monotonic() + 4
        seen: list[int] = []
        while True:
            status, _, text = await asyncio.to_thread(http, pg.url + "/v1/meshes", timeout=3)
            seen.append(status)
            if status == 503 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert status == 503 and "limits.max_connections" in text, (seen, pg.log_tail())
        for path in ("/-/ready", "/-/healthy"):
            status, _, text = await asyncio.to_thread(http, pg.url + path, timeout=3)
            assert status == 200, (path, text)
        start_wait = time.monotonic()
        for reader, _ in idle:
            assert await asyncio.wait_for(reader.read(), 10) == b""
        assert time.monotonic() - start_wait < 8  # closed at first_byte_timeout, not 75 s
    finally:
        for _, w in idle:
            w.close()
    status, _, _ = await asyncio.to_thread(http, pg.url + "/v1/meshes", timeout=3)
    assert status == 200
    metrics = await asyncio.to_thread(pg.get, "/metrics")
    assert "passguard_http_connections_silent_total 4.0" in metrics
