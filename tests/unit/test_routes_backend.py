"""The HTTP routes against a fake backend, through aiohttp's test client.

``build_app`` takes anything that satisfies ``passguard.web.backend.Backend``;
here that is a few real parts (a Snapshot built by hand, a real audit log in
tmp_path, real counters) and no daemon: nothing scrapes, no Envoy runs. The
client is pytest-aiohttp's ``aiohttp_client`` fixture, as in
https://docs.aiohttp.org/en/stable/testing.html.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from passguard import config as config_mod
from passguard.audit import AuditEntry, AuditLog
from passguard.config import Config
from passguard.envoy.names import Family
from passguard.envoy.stats import Counters
from passguard.foreground import Foreground
from passguard.gate.shadow import Shadow
from passguard.metrics import Metrics
from passguard.policy.model import MeshState
from passguard.store.snapshot import DataplaneEvidence, Snapshot
from passguard.store.window import History
from passguard.targets import Target
from passguard.web.auth import TokenStore
from passguard.web.backend import Backend, Tokens
from passguard.web.routes import build_app

BUSY, QUIET = "shop", "catalog"
TOKEN = "s3cr3t-ci-token"


def evidence(mesh: str, name: str, conns: int, now: float) -> DataplaneEvidence:
    """A fresh dataplane whose evidence covers the window: ``conns``
    passthrough connections opened in it."""
    window: dict[Family, Counters] = {"ipv4": Counters(cx_total=conns)} if conns else {}
    return DataplaneEvidence(
        target=Target(f"http://{name}:9901", mesh, name, name.split("-")[0]),
        state="fresh", covered=True, gap_reason=None,
        window=window, active_connections=0,
        latest={"ipv4": Counters(cx_total=conns)},
        uptime=3600.0, last_success=now, last_attempt=now, error=None, scrape_duration=0.01)


def snapshot(ready: bool = True) -> Snapshot:
    """``shop``: web-1 opened 7 passthrough connections in the window;
    ``catalog``: two dataplanes, none."""
    now = time.time()
    return Snapshot(now, 900.0, 3600.0, (
        evidence(BUSY, "web-1", 7, now), evidence(BUSY, "api-1", 0, now),
        evidence(QUIET, "books-1", 0, now), evidence(QUIET, "books-2", 0, now)), ready=ready)


@dataclass
class FakeStore:
    snapshot: Snapshot
    targets: Mapping[str, Target] = field(default_factory=dict)
    histories: Mapping[str, History] = field(default_factory=dict)
    window: float = 900.0
    stale_after: float = 3600.0


class FailingAudit:
    """An audit log whose disk is gone."""

    def __init__(self) -> None:
        self.attempts = 0

    async def record(self, entries: list[AuditEntry]) -> None:
        self.attempts += 1
        raise OSError("disk full")

    def query(self, since: float | None, mesh: str | None, verdict: str | None,
              limit: int, before_id: int | None) -> tuple[list[AuditEntry], int | None]:
        return [], None


class NoShadows:
    items: Mapping[str, Shadow] = {}

    async def add(self, name: str, docs: list[Any], requester: str, now: float,
                  max_matches: int) -> tuple[Shadow, list[str]]:
        raise AssertionError("not used here")

    async def remove(self, name: str) -> bool:
        return False

    def summary(self, s: Shadow, window: float, now: float,
                blocks_unproven: Callable[[str], bool]) -> dict[str, Any]:
        raise AssertionError("no shadow to summarize")

    def report(self, name: str, since: float, window: float, now: float,
               blocks_unproven: Callable[[str], bool]) -> dict[str, Any] | None:
        return None


@dataclass
class FakeBackend:
    """Everything ``Backend`` names, and nothing that scrapes."""

    config: Config
    store: FakeStore
    audit: AuditLog | FailingAudit
    metrics: Metrics
    shadows: NoShadows = field(default_factory=NoShadows)
    tokens: Tokens | None = None
    foreground: Foreground = field(default_factory=Foreground)
    reload_error: str | None = None
    reloads: int = 0

    def mesh_states(self) -> Mapping[str, MeshState]:
        return {}  # no control plane: the gate judges conservatively, and says so

    async def reload(self) -> str | None:
        self.reloads += 1
        return self.reload_error


def as_backend(fake: FakeBackend) -> Backend:
    return fake  # and mypy, were tests checked, would prove FakeBackend is one


@pytest.fixture
def audit(tmp_path: Path) -> Iterator[AuditLog]:
    log = AuditLog(tmp_path / "audit.db")
    yield log
    log.close()


@pytest.fixture
def make_backend(tmp_path: Path, audit: AuditLog) -> Callable[..., FakeBackend]:
    def make(gate: dict[str, Any] | None = None, ready: bool = True,
             tokens: bool = False, failing_audit: bool = False) -> FakeBackend:
        raw: dict[str, Any] = {"listen": "127.0.0.1:9110", "window": "15m"}
        if gate:
            raw["gate"] = gate
        store = FakeStore(snapshot(ready))
        token_store = None
        if tokens:
            f = tmp_path / "tokens.yaml"
            f.write_text(f"tokens:\n  - {{name: ci, sha256: "
                         f"{hashlib.sha256(TOKEN.encode()).hexdigest()}}}\n")
            token_store = TokenStore(f)
        return FakeBackend(config=config_mod.build(raw, tmp_path), store=store,
                           audit=FailingAudit() if failing_audit else audit,
                           metrics=Metrics(lambda: store.snapshot), tokens=token_store)
    return make


Client = Callable[[FakeBackend], Awaitable[TestClient[Any, Any]]]


@pytest.fixture
async def client(aiohttp_client: Any) -> AsyncIterator[Client]:
    async def make(backend: FakeBackend) -> TestClient[Any, Any]:
        return await aiohttp_client(build_app(as_backend(backend)))  # type: ignore[no-any-return]
    yield make


def mesh_off(mesh: str) -> dict[str, Any]:
    return {"type": "Mesh", "name": mesh, "networking": {"outbound": {"passthrough": False}}}


def review(mesh: str) -> dict[str, Any]:
    """An AdmissionReview v1 as the API server sends it, for a Kubernetes Mesh
    turning passthrough off."""
    def k8s_mesh(passthrough: bool) -> dict[str, Any]:
        return {"apiVersion": "kuma.io/v1alpha1", "kind": "Mesh", "metadata": {"name": mesh},
                "spec": {"networking": {"outbound": {"passthrough": passthrough}}}}
    gvk = {"group": "kuma.io", "version": "v1alpha1", "kind": "Mesh"}
    gvr = {"group": "kuma.io", "version": "v1alpha1", "resource": "meshes"}
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": str(uuid.uuid4()), "kind": gvk, "resource": gvr,
                        "requestKind": gvk, "requestResource": gvr, "name": mesh,
                        "namespace": "", "operation": "UPDATE",
                        "userInfo": {"username": "alice@example.com", "groups": []},
                        "object": k8s_mesh(False), "oldObject": k8s_mesh(True), "dryRun": False,
                        "options": {"apiVersion": "meta.k8s.io/v1", "kind": "UpdateOptions"}}}


async def test_check_denies_a_mesh_with_passthrough_traffic(
        client: Client, make_backend: Callable[..., FakeBackend], audit: AuditLog) -> None:
    backend = make_backend()
    c = await client(backend)
    r = await c.post("/v1/check", json=mesh_off(BUSY))
    assert r.status == 200
    body = await r.json()
    assert (body["allowed"], body["verdict"], body["mode"]) == (False, "deny", "enforce")
    [d] = body["decisions"]
    assert (d["mesh"], d["verdict"], d["change"]["kind"]) == (BUSY, "deny", "Mesh")
    assert d["evidence"]["connections"] == 7
    assert "web-1 (7)" in " ".join(d["reasons"])
    # Enforce mode never decides unrecorded: the entry is on disk before the answer.
    [entry], _ = audit.query(None, BUSY, None, 10, None)
    assert (entry.source, entry.verdict, entry.mode, entry.requester) == \
        ("check", "deny", "enforce", "anonymous")
    assert entry.documents[0]["name"] == BUSY


async def test_check_allows_a_mesh_without_passthrough_traffic(
        client: Client, make_backend: Callable[..., FakeBackend], audit: AuditLog) -> None:
    c = await client(make_backend())
    r = await c.post("/v1/check", data=json.dumps(mesh_off(QUIET)),
                     headers={"Content-Type": "application/json"})
    assert r.status == 200
    body = await r.json()
    assert (body["allowed"], body["verdict"]) == (True, "allow")
    assert body["decisions"][0]["evidence"]["connections"] == 0
    [entry], _ = audit.query(None, QUIET, None, 10, None)
    assert (entry.verdict, entry.mode) == ("allow", "enforce")


async def test_check_reads_yaml_too(client: Client,
                                    make_backend: Callable[..., FakeBackend]) -> None:
    c = await client(make_backend())
    yaml_doc = (f"type: Mesh\nname: {BUSY}\nnetworking:\n  outbound:\n"
                "    passthrough: false\n")
    r = await c.post("/v1/check", data=yaml_doc, headers={"Content-Type": "application/yaml"})
    assert r.status == 200 and (await r.json())["verdict"] == "deny"


async def test_enforce_mode_refuses_what_it_cannot_record(
        client: Client, make_backend: Callable[..., FakeBackend]) -> None:
    """A quiet mesh would be allowed; with the audit log unwritable, enforce
    mode refuses instead, and says why."""
    backend = make_backend(failing_audit=True)
    c = await client(backend)
    r = await c.post("/v1/check", json=mesh_off(QUIET))
    assert r.status == 200
    body = await r.json()
    assert (body["allowed"], body["verdict"]) == (False, "deny")
    assert any("enforce mode must not decide unrecorded" in w for w in body["warnings"])
    assert isinstance(backend.audit, FailingAudit) and backend.audit.attempts == 1
    assert backend.metrics.audit_failures._value.get() == 1


async def test_warn_mode_answers_unrecorded_and_says_so(
        client: Client, make_backend: Callable[..., FakeBackend]) -> None:
    c = await client(make_backend(gate={"mode": "warn"}, failing_audit=True))
    body = await (await c.post("/v1/check", json=mesh_off(QUIET))).json()
    assert (body["allowed"], body["verdict"], body["mode"]) == (True, "allow", "warn")
    assert any("this decision is not recorded" in w for w in body["warnings"])


@pytest.mark.parametrize(("data", "ctype", "error"), [
    (b'{"type": "Mesh", "name":', "application/json", "JSON"),
    (b"\xff\xfe not text", "application/json", "UTF-8"),
    (b"{}", "text/plain; charset=latin-1", "charset"),
])
async def test_check_answers_400_for_a_body_it_cannot_use(
        client: Client, make_backend: Callable[..., FakeBackend], audit: AuditLog,
        data: bytes, ctype: str, error: str) -> None:
    c = await client(make_backend())
    r = await c.post("/v1/check", data=data, headers={"Content-Type": ctype})
    assert r.status == 400
    assert r.content_type == "application/json"
    body = await r.json()
    assert set(body) == {"error"} and error in body["error"], body
    assert audit.query(None, None, None, 10, None) == ([], None)  # nothing decided


async def test_admission_denies_and_allows(client: Client,
                                           make_backend: Callable[..., FakeBackend],
                                           audit: AuditLog) -> None:
    c = await client(make_backend())
    busy = review(BUSY)
    r = await c.post("/v1/admission", json=busy)
    assert r.status == 200
    out = await r.json()
    assert (out["apiVersion"], out["kind"]) == ("admission.k8s.io/v1", "AdmissionReview")
    resp = out["response"]
    assert resp["uid"] == busy["request"]["uid"]
    assert resp["allowed"] is False and resp["status"]["code"] == 403
    assert resp["status"]["message"].startswith(f"passguard: Mesh {BUSY}")
    quiet = review(QUIET)
    resp = (await (await c.post("/v1/admission", json=quiet)).json())["response"]
    assert (resp["uid"], resp["allowed"]) == (quiet["request"]["uid"], True)
    entries, _ = audit.query(None, None, None, 10, None)
    assert [(e.source, e.mesh, e.verdict, e.requester) for e in entries] == [
        ("admission", QUIET, "allow", "alice@example.com (unverified)"),
        ("admission", BUSY, "deny", "alice@example.com (unverified)")]


async def test_admission_refuses_a_review_it_cannot_read(
        client: Client, make_backend: Callable[..., FakeBackend]) -> None:
    c = await client(make_backend())
    bad = review(BUSY) | {"apiVersion": "admission.k8s.io/v1beta1"}
    r = await c.post("/v1/admission", json=bad)
    assert r.status == 400
    assert "admissionReviewVersions: [v1]" in (await r.json())["error"]


async def test_meshes(client: Client, make_backend: Callable[..., FakeBackend]) -> None:
    c = await client(make_backend())
    r = await c.get("/v1/meshes")
    assert r.status == 200
    body = await r.json()
    assert body["window_seconds"] == 900.0
    meshes = {m["mesh"]: m for m in body["meshes"]}
    assert list(meshes) == [QUIET, BUSY]  # sorted
    assert meshes[BUSY]["verdict_if_disabled"] == "deny"
    assert meshes[QUIET]["verdict_if_disabled"] == "allow"
    assert meshes[BUSY]["connections"] == 7 and meshes[QUIET]["connections"] == 0
    assert meshes[BUSY]["dataplanes"] == {"total": 2, "fresh": 2, "stale": 0, "failed": 0,
                                          "offline": 0, "with_traffic": 1, "unknown": 0}
    one = await (await c.get(f"/v1/meshes/{BUSY}")).json()
    assert [(d["dataplane"], d["connections"]) for d in one["dataplanes"]] == [
        ("api-1", 0), ("web-1", 7)]
    r = await c.get("/v1/meshes/nowhere")
    assert r.status == 404 and "nowhere" in (await r.json())["error"]


@pytest.mark.parametrize(("ready", "status", "text"), [
    (True, 200, "passguard is ready\n"),
    (False, 503, "passguard is not ready: no scrape cycle finished yet\n"),
])
async def test_probes(client: Client, make_backend: Callable[..., FakeBackend],
                      ready: bool, status: int, text: str) -> None:
    c = await client(make_backend(ready=ready))
    r = await c.get("/-/healthy")
    assert (r.status, await r.text()) == (200, "passguard is healthy\n")
    r = await c.get("/-/ready")
    assert (r.status, await r.text()) == (status, text)


async def test_tokens_guard_the_gate_not_the_probes(
        client: Client, make_backend: Callable[..., FakeBackend], audit: AuditLog) -> None:
    c = await client(make_backend(tokens=True))
    r = await c.post("/v1/check", json=mesh_off(QUIET))
    assert r.status == 401
    assert r.headers["WWW-Authenticate"] == 'Bearer realm="passguard", error="invalid_request"'
    assert (await r.json())["error"] == "a bearer token is required"
    r = await c.post("/v1/check", json=mesh_off(QUIET), headers={"Authorization": "Bearer no"})
    assert r.status == 401 and 'error="invalid_token"' in r.headers["WWW-Authenticate"]
    assert (await c.get("/v1/audit")).status == 401
    assert audit.query(None, None, None, 10, None) == ([], None)  # refused before deciding
    assert (await c.get("/-/healthy")).status == 200
    assert (await c.get("/-/ready")).status == 200
    r = await c.post("/v1/check", json=mesh_off(QUIET),
                     headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status == 200 and (await r.json())["verdict"] == "allow"
    [entry], _ = audit.query(None, None, None, 10, None)
    assert entry.requester == "token:ci"


async def test_audit_route_lists_the_decisions(
        client: Client, make_backend: Callable[..., FakeBackend]) -> None:
    c = await client(make_backend())
    await c.post("/v1/check", json=mesh_off(BUSY))
    body = await (await c.get("/v1/audit", params={"verdict": "deny"})).json()
    assert [(e["mesh"], e["verdict"]) for e in body["entries"]] == [(BUSY, "deny")]
    r = await c.get("/v1/audit", params={"limit": "0"})
    assert r.status == 400 and "limit" in (await r.json())["error"]


async def test_reload_route_reports_a_refused_config(
        client: Client, make_backend: Callable[..., FakeBackend]) -> None:
    backend = make_backend()
    c = await client(backend)
    assert await (await c.post("/-/reload")).json() == {"status": "reloaded"}
    backend.reload_error = "window: must be a duration"
    r = await c.post("/-/reload")
    assert r.status == 400
    assert (await r.json())["error"] == ("configuration refused, the old one keeps running: "
                                         "window: must be a duration")
    assert backend.reloads == 2


async def test_status_page_renders_from_the_backend(
        client: Client, make_backend: Callable[..., FakeBackend]) -> None:
    c = await client(make_backend())
    r = await c.get("/")
    assert r.status == 200 and r.content_type == "text/html"
    text = await r.text()
    assert BUSY in text and QUIET in text and "Shadow policies (0)" in text


async def test_requests_are_counted_for_bulk_work_to_give_way(
        client: Client, make_backend: Callable[..., FakeBackend]) -> None:
    """Every request but /metrics is in flight in the backend's Foreground
    while it is served (the daemon's bulk work rests meanwhile)."""
    backend = make_backend()
    c = await client(backend)
    assert not backend.foreground.busy()
    await c.get("/metrics")
    assert backend.foreground.last == -math.inf
    r = await c.post("/v1/check", json=mesh_off(QUIET))
    assert r.status == 200
    assert backend.foreground.active == 0 and backend.foreground.busy()
