"""docs/openapi.yaml against the code: the document is valid OpenAPI 3.1, it
names exactly the /v1 routes the app registers, and every answer a real
``passguard run`` gives (two real Envoys, one carrying passthrough traffic;
every route, its success and its error answers) validates against it.

The answers are validated with openapi-core against a *strict* copy of the
document: every object that lists its ``properties`` gets
``additionalProperties: false`` unless it says otherwise. The published
document stays open to added fields (DESIGN §3: "fields may be added, never
renamed"), but a field the code sends and the document does not describe
fails here, so neither can drift from the other. Each documented status of
each operation must also be seen at least once: a documented answer the code
never gives fails too.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import socket
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from openapi_core import OpenAPI
from openapi_core.testing import MockRequest, MockResponse
from openapi_spec_validator import validate as validate_spec

from passguard.demo.traffic import EchoUpstream, passthrough_connect, send_traffic
from passguard.web.routes import build_app
from tests.kuma_cp import FakeKumaCP

from .conftest import EnvoyFactory
from .procs import REPO, Passguard, envoy_target, http, passguard_config, wait_until

pytestmark = pytest.mark.e2e
SPEC_PATH = REPO / "docs" / "openapi.yaml"
TOKEN = "contract-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WAIT = 45.0
MAX_CONNECTIONS = 8
# Answers every route can give, whatever its own: checked on one route each.
SHARED = {"401", "408", "413", "429", "503"}
DISPLAY = "kuma.io/display-name"


def load_spec() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load(SPEC_PATH.read_text())
    return spec


def strict(node: Any) -> Any:
    """A copy with ``additionalProperties: false`` on every object that lists
    its properties and says nothing about others. A schema another extends
    (``allOf`` it, then ``unevaluatedProperties: false``) is left open: the
    extension closes it, and its own ``additionalProperties`` would refuse
    the extension's fields."""
    node = copy.deepcopy(node)
    bases = set()

    def find_bases(n: Any) -> None:
        if isinstance(n, dict):
            if n.get("unevaluatedProperties") is False:
                bases.update(x["$ref"] for x in n.get("allOf", ()) if "$ref" in x)
            for v in n.values():
                find_bases(v)
        elif isinstance(n, list):
            for v in n:
                find_bases(v)

    find_bases(node)
    for ref in bases:
        name = ref.rsplit("/", 1)[1]
        node["components"]["schemas"][name]["x-extended"] = True

    def walk(n: Any) -> None:
        if isinstance(n, dict):
            if "properties" in n and "additionalProperties" not in n \
                    and "unevaluatedProperties" not in n and not n.pop("x-extended", False):
                n["additionalProperties"] = False
            for v in n.values():
                walk(v)
        elif isinstance(n, list):
            for v in n:
                walk(v)

    walk(node)
    return node


def operations(spec: Mapping[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if method in ("get", "post", "put", "delete", "patch"):
                yield path, method, op


def test_the_document_is_valid_openapi_3_1() -> None:
    spec = load_spec()
    assert spec["openapi"].startswith("3.1.")
    validate_spec(spec)  # raises with the path of the first error
    validate_spec(strict(spec))
    # Every operation says what its errors look like.
    for path, method, op in operations(spec):
        assert op.get("operationId"), f"{method.upper()} {path}: no operationId"
        assert any(code[0] in "45" for code in op["responses"]), \
            f"{method.upper()} {path}: no error answer described"


def test_the_document_names_exactly_the_v1_routes_of_the_app() -> None:
    app = build_app(None)  # type: ignore[arg-type]  # routes only: nothing is served
    registered = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        if path and path.startswith("/v1/") and route.method != "HEAD":
            registered.add((path, route.method.lower()))
    documented = {(path, method) for path, method, _ in operations(load_spec())}
    assert documented == registered, (
        f"in the app, not the document: {sorted(registered - documented)}; "
        f"in the document, not the app: {sorted(documented - registered)}")


# --------------------------------------------------------------------------- real answers


class Contract:
    """Sends real requests and validates each answer against the strict document."""

    def __init__(self, url: str) -> None:
        self.url = url
        spec = strict(load_spec())
        spec["servers"] = [{"url": url}]  # the daemon's free port, not the default
        self.openapi = OpenAPI.from_dict(spec)
        self.seen: set[tuple[str, str, str]] = set()
        # Every mismatch, reported together at the end.
        self.errors: list[str] = []

    def call(self, method: str, path: str, pattern: str, *, query: Mapping[str, str] | None = None,
             body: bytes | None = None, content_type: str = "application/json",
             headers: Mapping[str, str] | None = None, auth: bool = True,
             expect: int = 200) -> Any:
        hdrs = {**(AUTH if auth else {}), **(headers or {})}
        if body is not None:
            hdrs["Content-Type"] = content_type
        qs = "?" + urllib.parse.urlencode(query) if query else ""
        status, ctype, text = http(self.url + path + qs, method=method, body=body, headers=hdrs)
        assert status == expect, f"{method} {path}{qs}: {status}, expected {expect}: {text[:800]}"
        if status < 400:  # a request the daemon took is one the document describes
            view_args = {p[1:-1]: v for p, v in zip(pattern.split("/"), path.split("/"),
                                                     strict=True) if p.startswith("{")}
            request = MockRequest(self.url, method, path, path_pattern=pattern,
                                  args=dict(query or {}), view_args=view_args,
                                  headers=hdrs, data=body,
                                  content_type=content_type if body is not None else "")
            try:
                self.openapi.validate_request(request)
            except Exception as exc:
                self.errors.append(f"request {method} {path}{qs}: {explain(exc)}")
        self.validate(method, path, pattern, query, status, ctype, text)
        return json.loads(text) if ctype == "application/json" else text

    def validate(self, method: str, path: str, pattern: str, query: Mapping[str, str] | None,
                 status: int, ctype: str, text: str) -> None:
        request = MockRequest(self.url, method, path, path_pattern=pattern,
                              args=dict(query or {}))
        response = MockResponse(text.encode(), status_code=status, content_type=ctype)
        try:
            self.openapi.validate_response(request, response)
        except Exception as exc:
            self.errors.append(f"{method} {path} {status}: {explain(exc)}\n{text[:1500]}")
            return
        self.seen.add((pattern, method.lower(), str(status)))


def explain(exc: BaseException) -> str:
    """openapi-core's error with the schema errors under it."""
    parts = [repr(exc)]
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            break
        parts += [f"{e.json_path}: {e.message}" for e in getattr(seen, "schema_errors", ())]
        seen = seen.__cause__
        if seen is not None:
            parts.append(repr(seen)[:300])
    return "; ".join(parts)


def mesh_off(mesh: str) -> bytes:
    return f"type: Mesh\nname: {mesh}\nnetworking:\n  outbound:\n    passthrough: false\n".encode()


def review(uid: str, mesh: str, passthrough: bool) -> bytes:
    obj = {"apiVersion": "kuma.io/v1alpha1", "kind": "Mesh", "metadata": {"name": mesh},
           "spec": {"networking": {"outbound": {"passthrough": passthrough}}}}
    return json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                       "request": {"uid": uid, "operation": "CREATE",
                                   "kind": {"group": "kuma.io", "version": "v1alpha1",
                                            "kind": "Mesh"},
                                   "userInfo": {"username": "ci@example.com"},
                                   "object": obj, "oldObject": None,
                                   "dryRun": False}}).encode()


def slow_body(url: str, path: str) -> tuple[int, str, str]:
    """A body announced and never sent: the daemon's ``limits.body_timeout`` answers."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: passguard\r\nAuthorization: Bearer {TOKEN}\r\n"
                  "Content-Type: application/yaml\r\nContent-Length: 100\r\n\r\ntype: ".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    ctype = "application/json" if b"application/json" in head.lower() else "text/plain"
    return status, ctype, body.decode()


def capped(url: str) -> tuple[int, str, str]:
    """A request past ``limits.max_connections``, the cap held by idle sockets."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    held = [socket.create_connection((host, int(port)), timeout=10)
            for _ in range(MAX_CONNECTIONS)]
    try:
        deadline = time.monotonic() + 4  # well inside limits.first_byte_timeout
        while True:
            status, ctype, text = http(url + "/v1/meshes")
            if status == 503 or time.monotonic() > deadline:
                return status, ctype, text
            time.sleep(0.1)
    finally:
        for s in held:
            s.close()


async def test_real_answers_of_every_route_match_the_document(
        envoy_factory: EnvoyFactory, echo_upstream: EchoUpstream, tmp_path: Path) -> None:
    busy = await envoy_factory("legacy")
    idle = await envoy_factory("unified")
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(yaml.safe_dump({"tokens": [
        {"name": "ci", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest()}]}))
    cfg = passguard_config(
        tmp_path, [envoy_target(busy.admin_url, "busy", "busy-1"),
                   envoy_target(idle.admin_url, "idle", "idle-1", service="api")],
        interval="1s", window="1m",
        destinations={"interval": "1s"},
        auth={"tokens_file": str(tokens)},
        limits={"max_body_bytes": "16KiB", "body_timeout": "1s",
                "max_connections": MAX_CONNECTIONS, "first_byte_timeout": "10s",
                "unverified_rate": 0.01, "unverified_burst": 2, "rate_limit_loopback": True})
    pg = Passguard(cfg, tmp_path)
    c = Contract(pg.url)
    try:
        await asyncio.to_thread(pg.start)
        await send_traffic(busy, echo_upstream, 3)
        held = await passthrough_connect(busy.listener_host("ipv4"),
                                         busy.listener_port("ipv4"),
                                         echo_upstream.host, echo_upstream.port, hold=True)
        try:
            await asyncio.to_thread(wait_until, lambda: pg.get(
                "/v1/destinations?mesh=busy")["destinations"], WAIT,
                "a destination of busy-1 in the inventory", details=pg.log_tail)
        finally:
            await held.close()
        await asyncio.to_thread(wait_until, lambda: pg.get("/v1/meshes/busy")[
            "connections"] >= 3, WAIT, "busy-1's connections", details=pg.log_tail)
        await asyncio.to_thread(exercise, c, pg)
    finally:
        await asyncio.to_thread(pg.close)
    assert not c.errors, "answers that do not match docs/openapi.yaml:\n" + "\n\n".join(
        c.errors)
    spec = load_spec()
    missing = set()
    for path, method, op in operations(spec):
        for code in op["responses"]:
            if code in SHARED:
                if not any(s == code for _, _, s in c.seen):
                    missing.add(("*", "*", code))
            elif (path, method, code) not in c.seen:
                missing.add((path, method, code))
    assert not missing, f"documented answers the test never saw: {sorted(missing)}"


def exercise(c: Contract, pg: Passguard) -> None:
    """Every /v1 route: its successes, then its errors."""
    # -- the read routes
    meshes = c.call("GET", "/v1/meshes", "/v1/meshes")
    assert {m["mesh"] for m in meshes["meshes"]} == {"busy", "idle"}
    busy = c.call("GET", "/v1/meshes/busy", "/v1/meshes/{mesh}")
    assert busy["dataplanes"][0]["dataplane"] == "busy-1"
    c.call("GET", "/v1/meshes/nowhere", "/v1/meshes/{mesh}", expect=404)
    dests = c.call("GET", "/v1/destinations", "/v1/destinations")
    assert dests["destinations"]
    c.call("GET", "/v1/destinations", "/v1/destinations", query={"mesh": "idle"})

    # -- the gate: a refusal with its per-dataplane list, an allow, the
    # {object, oldObject} form, break glass, an ignored kind, then errors
    denied = c.call("POST", "/v1/check", "/v1/check", body=mesh_off("busy"),
                    content_type="application/yaml")
    assert denied["verdict"] == "deny" and denied["decisions"][0]["dataplanes"][0]["lost"]
    allowed = c.call("POST", "/v1/check", "/v1/check", body=mesh_off("idle"),
                     content_type="application/yaml")
    assert allowed["allowed"] is True
    pair = {"object": {"type": "Mesh", "name": "busy",
                       "networking": {"outbound": {"passthrough": True}}},
            "oldObject": {"type": "Mesh", "name": "busy",
                          "networking": {"outbound": {"passthrough": False}}}}
    c.call("POST", "/v1/check", "/v1/check", body=json.dumps(pair).encode())
    glass = (b"apiVersion: kuma.io/v1alpha1\nkind: Mesh\nmetadata:\n  name: busy\n"
             b"  annotations:\n    passguard.io/acknowledge-traffic: \"INC-42 cut-over\"\n"
             b"spec:\n  networking:\n    outbound:\n      passthrough: false\n---\n"
             b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: other\n")
    broken = c.call("POST", "/v1/check", "/v1/check", body=glass,
                    content_type="application/yaml")
    assert broken["decisions"][0]["break_glass"] and broken["warnings"]
    matched = {"type": "MeshPassthrough", "name": "keep", "mesh": "busy", "spec": {
        "targetRef": {"kind": "Mesh"},
        "default": {"passthroughMode": "Matched", "appendMatch": [
            {"type": "Domain", "value": "example.com", "port": 443, "protocol": "tls"}]}}}
    c.call("POST", "/v1/check", "/v1/check", body=json.dumps(matched).encode())
    c.call("POST", "/v1/check", "/v1/check", body=b"type: Mesh\nname: [\n",
           content_type="application/yaml", expect=400)
    c.call("POST", "/v1/check", "/v1/check", body=mesh_off("busy"), auth=False, expect=401)
    c.call("POST", "/v1/check", "/v1/check", body=mesh_off("busy"), auth=False,
           headers={"Authorization": "Bearer wrong"}, expect=401)
    c.call("POST", "/v1/check", "/v1/check", body=b"#" * 17000 + b"\n" + mesh_off("busy"),
           content_type="application/yaml", expect=413)
    status, ctype, text = slow_body(c.url, "/v1/check")
    assert status == 408, text
    c.validate("POST", "/v1/check", "/v1/check", None, status, ctype, text)

    # -- the admission webhook (the token: no rate limit), then unverified peers
    refused = c.call("POST", "/v1/admission", "/v1/admission", body=review("u-1", "busy", False))
    assert refused["response"]["allowed"] is False
    assert refused["response"]["status"]["code"] == 403
    ok = c.call("POST", "/v1/admission", "/v1/admission", body=review("u-2", "idle", False))
    assert ok["response"]["allowed"] is True
    c.call("POST", "/v1/admission", "/v1/admission", body=b'{"kind": "Pod"}', expect=400)
    for i in range(2):  # the burst of limits.unverified_burst
        c.call("POST", "/v1/admission", "/v1/admission", auth=False,
               body=review(f"a-{i}", "idle", True))
    c.call("POST", "/v1/admission", "/v1/admission", auth=False,
           body=review("a-3", "idle", True), expect=429)

    # -- the audit log
    audit = c.call("GET", "/v1/audit", "/v1/audit", query={"limit": "2"})
    assert len(audit["entries"]) == 2 and audit["next"]
    c.call("GET", "/v1/audit", "/v1/audit",
           query={"since": "1h", "mesh": "busy", "verdict": "deny", "cursor": audit["next"]})
    c.call("GET", "/v1/audit", "/v1/audit", query={"limit": "0"}, expect=400)
    c.call("GET", "/v1/audit", "/v1/audit", auth=False, expect=401)

    # -- shadows
    doc = {"type": "Mesh", "name": "busy", "networking": {"outbound": {"passthrough": False}}}
    made = c.call("POST", "/v1/shadows", "/v1/shadows", expect=201,
                  body=json.dumps({"name": "lockdown", "documents": [doc]}).encode())
    assert made["name"] == "lockdown"
    c.call("POST", "/v1/shadows", "/v1/shadows", query={"name": "idle-off"},
           body=mesh_off("idle"), content_type="application/yaml", expect=201)
    c.call("POST", "/v1/shadows", "/v1/shadows", expect=409,
           body=json.dumps({"name": "lockdown", "documents": [doc]}).encode())
    c.call("POST", "/v1/shadows", "/v1/shadows", body=b'{"documents": []}', expect=400)
    c.call("GET", "/v1/shadows", "/v1/shadows")
    c.call("GET", "/v1/shadows/lockdown", "/v1/shadows/{name}", query={"since": "1h"})
    c.call("GET", "/v1/shadows/lockdown", "/v1/shadows/{name}", query={"days": "0"},
           expect=400)
    c.call("GET", "/v1/shadows/nothing", "/v1/shadows/{name}", expect=404)
    c.call("DELETE", "/v1/shadows/idle-off", "/v1/shadows/{name}")
    c.call("DELETE", "/v1/shadows/idle-off", "/v1/shadows/{name}", expect=404)

    # -- verify after a deploy: the idle mesh's change went in (allow)
    ver = c.call("GET", "/v1/verify", "/v1/verify", query={"since": "5m"})
    assert ver["status"] in ("clean", "refusals") and "idle" in ver["meshes"], ver
    c.call("GET", "/v1/verify", "/v1/verify", query={"since": "5m", "mesh": "busy"})
    c.call("GET", "/v1/verify", "/v1/verify", query={"since": "1s", "mesh": "busy"})
    c.call("GET", "/v1/verify", "/v1/verify", expect=400)
    c.call("GET", "/v1/verify", "/v1/verify", query={"since": "yesterday"}, expect=400)
    c.call("GET", "/v1/verify", "/v1/verify", query={"since": "5m", "mesh": "nowhere"},
           expect=404)

    # -- readiness for Kuma 3.0
    ready = c.call("GET", "/v1/readiness", "/v1/readiness", query={"to": "3.0"})
    assert {m["mesh"] for m in ready["meshes"]} == {"busy", "idle"}
    c.call("GET", "/v1/readiness", "/v1/readiness", query={"to": "3.0", "mesh": "busy"})
    c.call("GET", "/v1/readiness", "/v1/readiness", expect=400)
    c.call("GET", "/v1/readiness", "/v1/readiness", query={"to": "9.9"}, expect=400)
    c.call("GET", "/v1/readiness", "/v1/readiness", query={"to": "3.0", "mesh": "nowhere"},
           expect=404)

    # -- the connection cap: any route, 503 with the same error body
    status, ctype, text = capped(c.url)
    assert status == 503, text
    c.validate("GET", "/v1/meshes", "/v1/meshes", None, status, ctype, text)


async def test_answers_with_a_kuma_control_plane_match_the_document(
        envoy_factory: EnvoyFactory, echo_upstream: EchoUpstream, tmp_path: Path) -> None:
    """The answers only a control plane fills in: readiness per dataplane with
    the documents that fix it, exact before/after plans with a MeshPassthrough
    in force, Kuma's version (the CP test server,
    tests/kuma_cp.py, in front of real Envoys), and a dataplane it cannot read."""
    web, api, vault = [await envoy_factory("legacy") for _ in range(3)]
    async with FakeKumaCP() as cp:
        for name, proxy in (("web-1", web), ("api-1", api)):
            cp.add_dataplane("pay", name, admin_url=proxy.admin_url, transparent=True,
                             labels={DISPLAY: name})
        cp.add_dataplane("pay", "gone-1", transparent=True, insight="offline",
                         labels={DISPLAY: "gone-1"})
        cp.add_policy("pay", "api-out", {
            "targetRef": {"kind": "Dataplane", "labels": {DISPLAY: "api-1"}},
            "default": {"passthroughMode": "Matched", "appendMatch": [
                {"type": "IP", "value": "127.0.0.1", "port": echo_upstream.port,
                 "protocol": "tcp"},
                {"type": "Domain", "value": "example.com", "port": 443, "protocol": "tcp"}]}})
        cp.add_mesh("vault", networking={"outbound": {"passthrough": False}})
        cp.add_dataplane("vault", "kv-1", admin_url=vault.admin_url, transparent=True,
                         labels={DISPLAY: "kv-1"})
        cfg = {**passguard_config(tmp_path, [], interval="1s", window="1m",
                                  destinations={"interval": "1s"}),
               "sources": [{"kind": "kuma", "url": cp.url, "discovery_interval": "1s"}]}
        pg = Passguard(cfg, tmp_path)
        c = Contract(pg.url)
        try:
            await asyncio.to_thread(pg.start)
            await send_traffic(web, echo_upstream, 3)
            await send_traffic(api, echo_upstream, 2)
            held = [await passthrough_connect(p.listener_host("ipv4"), p.listener_port("ipv4"),
                                              echo_upstream.host, echo_upstream.port, hold=True)
                    for p in (web, api)]
            try:
                await asyncio.to_thread(wait_until, lambda: pg.get(
                    "/v1/readiness?to=3.0")["status"] == "not_ready" and len(pg.get(
                        "/v1/destinations?mesh=pay")["destinations"]) >= 2, WAIT,
                    "pay not ready for 3.0, with its destinations", details=pg.log_tail)
            finally:
                for h in held:
                    await h.close()
            await asyncio.to_thread(exercise_kuma, c)
        finally:
            await asyncio.to_thread(pg.close)
    assert not c.errors, "answers that do not match docs/openapi.yaml:\n" + "\n\n".join(
        c.errors)


def exercise_kuma(c: Contract) -> None:
    ready = c.call("GET", "/v1/readiness", "/v1/readiness", query={"to": "3.0"})
    pay = {m["mesh"]: m for m in ready["meshes"]}["pay"]
    assert pay["dataplanes"] and pay["keep_traffic"] and pay["rejected_entries"], pay
    c.call("GET", "/v1/readiness", "/v1/readiness", query={"to": "3.0", "mesh": "vault"})
    c.call("GET", "/v1/meshes", "/v1/meshes")
    detail = c.call("GET", "/v1/meshes/pay", "/v1/meshes/{mesh}")
    assert any(d["error"] for d in detail["dataplanes"]), detail  # gone-1: nothing to read
    c.call("GET", "/v1/destinations", "/v1/destinations")
    off = c.call("POST", "/v1/check", "/v1/check", body=mesh_off("pay"),
                 content_type="application/yaml")
    assert off["verdict"] == "deny", off
    # api-1's policy narrowed to the Domain entry: its IP traffic is lost or unproven.
    narrowed = {"type": "MeshPassthrough", "name": "api-out", "mesh": "pay", "spec": {
        "targetRef": {"kind": "Dataplane", "labels": {DISPLAY: "api-1"}},
        "default": {"passthroughMode": "Matched", "appendMatch": [
            {"type": "Domain", "value": "example.com", "port": 443, "protocol": "tls"}]}}}
    c.call("POST", "/v1/check", "/v1/check", body=json.dumps(narrowed).encode())
    c.call("POST", "/v1/check", "/v1/check", body=json.dumps(
        {"object": None, "oldObject": {**narrowed, "spec": {
            **narrowed["spec"], "default": {"passthroughMode": "All"}}}}).encode())
    c.call("GET", "/v1/verify", "/v1/verify", query={"since": "5m", "mesh": "pay"})
