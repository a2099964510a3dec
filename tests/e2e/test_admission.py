"""The admission webhook over real TLS, authentication, certificate rotation, and
the audit log — against a real daemon watching real Envoy sidecars.

AdmissionReview bodies are shaped exactly like the API server's (v1, with
uid, kind, resource, operation, userInfo, object/oldObject, dryRun, options).
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from passguard import config as config_mod
from passguard.app import Daemon
from passguard.demo.traffic import EchoUpstream, send_traffic

from .conftest import EnvoyFactory

TOKEN = "s3cr3t-ci-token"


def review(obj: dict[str, Any] | None, old: dict[str, Any] | None = None,
           operation: str = "CREATE", dry_run: bool = False) -> dict[str, Any]:
    src = obj or old or {}
    kind = src.get("kind", "Mesh")
    plural = {"Mesh": "meshes", "MeshPassthrough": "meshpassthroughs"}[kind]
    meta = src.get("metadata", {})
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": "kuma.io", "version": "v1alpha1", "kind": kind},
            "resource": {"group": "kuma.io", "version": "v1alpha1", "resource": plural},
            "requestKind": {"group": "kuma.io", "version": "v1alpha1", "kind": kind},
            "requestResource": {"group": "kuma.io", "version": "v1alpha1", "resource": plural},
            "name": meta.get("name", ""),
            "namespace": meta.get("namespace", ""),
            "operation": operation,
            "userInfo": {"username": "alice@example.com", "uid": "u-1",
                         "groups": ["system:authenticated", "platform"]},
            "object": obj,
            "oldObject": old,
            "dryRun": dry_run,
            "options": {"apiVersion": "meta.k8s.io/v1",
                        "kind": {"CREATE": "CreateOptions", "UPDATE": "UpdateOptions",
                                 "DELETE": "DeleteOptions"}[operation]},
        },
    }


def k8s_mesh(name: str, passthrough: bool | None, annotations: dict[str, str] | None = None
             ) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if passthrough is not None:
        spec = {"networking": {"outbound": {"passthrough": passthrough}}}
    return {"apiVersion": "kuma.io/v1alpha1", "kind": "Mesh",
            "metadata": {"name": name, "uid": "m-1", "resourceVersion": "42",
                         "creationTimestamp": "2026-11-29T10:00:00Z",
                         "annotations": annotations or {}},
            "spec": spec}


def k8s_mp(name: str, mesh: str, mode: str) -> dict[str, Any]:
    return {"apiVersion": "kuma.io/v1alpha1", "kind": "MeshPassthrough",
            "metadata": {"name": name, "namespace": "kuma-system",
                         "labels": {"kuma.io/mesh": mesh}},
            "spec": {"targetRef": {"kind": "Mesh"}, "default": {"passthroughMode": mode}}}


class Env:
    def __init__(self, daemon: Daemon, ca: trustme.CA, tmp: Path) -> None:
        self.daemon = daemon
        self.ca = ca
        self.tmp = tmp
        self.url = f"https://127.0.0.1:{daemon.config.listen.port}"

    def client_ssl(self, ca: trustme.CA | None = None,
                   client: trustme.LeafCert | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        (ca or self.ca).configure_trust(ctx)
        if client is not None:
            client.configure_cert(ctx)
        return ctx

    async def post(self, path: str, body: Any, token: str | None = TOKEN,
                   ctx: ssl.SSLContext | None = None) -> tuple[int, Any, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with aiohttp.ClientSession() as s, s.post(
                self.url + path, json=body, headers=headers,
                ssl=ctx or self.client_ssl()) as r:
            return r.status, await r.json(), r.headers

    async def get(self, path: str, token: str | None = TOKEN) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with aiohttp.ClientSession() as s, s.get(
                self.url + path, headers=headers, ssl=self.client_ssl()) as r:
            ctype = r.content_type
            return r.status, (await r.json() if ctype == "application/json" else await r.text())


EnvFactory = Callable[..., Awaitable[Env]]


@pytest.fixture
async def make_env(envoy_factory: EnvoyFactory, echo_upstream: EchoUpstream,
                   tmp_path: Path) -> AsyncIterator[EnvFactory]:
    daemons: list[Daemon] = []

    async def make(client_ca: bool = False, **auth: Any) -> Env:
        busy = await envoy_factory("legacy")
        idle = await envoy_factory("unified")
        ca = trustme.CA()
        leaf = ca.issue_cert("127.0.0.1", "localhost", "passguard.passguard.svc")
        leaf.private_key_pem.write_to_path(str(tmp_path / "tls.key"))
        leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "tls.crt"))
        tls: dict[str, Any] = {"cert_file": "tls.crt", "key_file": "tls.key",
                               "reload_interval": "1s"}
        if client_ca:
            ca.cert_pem.write_to_path(str(tmp_path / "client-ca.crt"))
            tls["client_ca_file"] = "client-ca.crt"
        digest = hashlib.sha256(TOKEN.encode()).hexdigest()
        (tmp_path / "tokens.yaml").write_text(
            f"tokens:\n  - {{name: ci-deploy, sha256: {digest}}}\n")
        raw = {"listen": "127.0.0.1:0", "scrape": {"interval": "1s", "timeout": "500ms"},
               "window": "30s", "state": {"path": "state.db"},
               "auth": {"tokens_file": "tokens.yaml", "tls": tls, **auth},
               "sources": [{"kind": "envoy", "targets": [
                   {"url": busy.admin_url, "labels": {"mesh": "busy", "dataplane": "busy-1"}},
                   {"url": idle.admin_url, "labels": {"mesh": "idle", "dataplane": "idle-1"}}]}]}
        d = Daemon(config_mod.build(raw, tmp_path))
        daemons.append(d)
        await d.start(schedule=False)
        await d.cycle()
        await send_traffic(busy, echo_upstream, 2)
        await d.cycle()
        return Env(d, ca, tmp_path)

    yield make
    for d in daemons:
        await d.stop()


async def test_admission_create_update_dry_run(make_env: EnvFactory) -> None:
    env = await make_env()
    # CREATE of a Mesh that disables passthrough where traffic flows: refused.
    body = review(k8s_mesh("busy", False))
    status, ans, _ = await env.post("/v1/admission", body, token=None)
    assert status == 200
    assert ans["apiVersion"] == "admission.k8s.io/v1" and ans["kind"] == "AdmissionReview"
    r = ans["response"]
    assert r["uid"] == body["request"]["uid"]
    assert r["allowed"] is False
    assert r["status"]["code"] == 403
    assert "busy-1 (2)" in r["status"]["message"] and r["status"]["message"].startswith("passguard")
    # The same on the idle mesh: allowed, no status.
    status, ans, _ = await env.post("/v1/admission", review(k8s_mesh("idle", False)), token=None)
    assert ans["response"]["allowed"] is True and "status" not in ans["response"]
    # UPDATE whose oldObject already had passthrough off: nothing is reduced.
    status, ans, _ = await env.post("/v1/admission", review(
        k8s_mesh("busy", False), k8s_mesh("busy", False), "UPDATE"), token=None)
    assert ans["response"]["allowed"] is True
    # UPDATE from true to false, as a dry run: same decision, marked in the audit.
    status, ans, _ = await env.post("/v1/admission", review(
        k8s_mesh("busy", False), k8s_mesh("busy", True), "UPDATE", dry_run=True), token=None)
    assert ans["response"]["allowed"] is False
    status, audit = await env.get("/v1/audit?limit=1")
    [entry] = audit["entries"]
    assert entry["source"] == "admission" and entry["dry_run"] is True
    assert entry["requester"] == "alice@example.com (unverified)" and entry["verdict"] == "deny"
    assert entry["documents"][0]["kind"] == "Mesh"
    assert entry["evidence"]["connections"] == 2


async def test_admission_meshpassthrough_delete_and_break_glass(make_env: EnvFactory) -> None:
    env = await make_env()
    _, ans, _ = await env.post("/v1/admission", review(k8s_mp("off", "busy", "None")),
                               token=None)
    assert ans["response"]["allowed"] is False
    # Deleting a MeshPassthrough that allowed everything is a reduction too.
    _, ans, _ = await env.post("/v1/admission", review(
        None, k8s_mp("open", "busy", "All"), "DELETE"), token=None)
    assert ans["response"]["allowed"] is False, ans
    message = ans["response"]["status"]["message"]
    assert "fall back to the other policies or the Mesh flag" in message
    _, ans, _ = await env.post("/v1/admission", review(
        None, k8s_mp("open", "idle", "All"), "DELETE"), token=None)
    assert ans["response"]["allowed"] is True
    mesh = k8s_mesh("busy", False, {"passguard.io/acknowledge-traffic": "CHG-77 " + "x" * 300})
    _, ans, _ = await env.post("/v1/admission", review(mesh), token=None)
    r = ans["response"]
    assert r["allowed"] is True
    assert r["warnings"] and all(len(w) < 120 for w in r["warnings"])
    assert sum(len(w.encode()) for w in r["warnings"]) < 4096
    assert any("acknowledge-traffic" in w for w in r["warnings"])
    _, audit = await env.get("/v1/audit?limit=1")
    assert audit["entries"][0]["break_glass"].startswith("CHG-77")


@pytest.mark.parametrize(("body", "fragment"), [
    ({"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1beta1", "request": {}},
     "admissionReviewVersions"),
    ({"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1"}, "request must be"),
    ({"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1",
      "request": {"uid": "x", "operation": "PATCH"}}, "request.operation"),
    ({"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1",
      "request": {"uid": "x", "operation": "UPDATE", "object": {}}}, "oldObject is required"),
    ([1, 2], "must be a JSON object"),
])
async def test_malformed_review_is_400(make_env: EnvFactory, body: Any, fragment: str) -> None:
    env = await make_env()
    status, ans, _ = await env.post("/v1/admission", body, token=None)
    assert status == 400 and fragment in ans["error"], ans


async def test_unusable_object_is_refused_with_the_reason(make_env: EnvFactory) -> None:
    env = await make_env()
    bad = k8s_mesh("busy", None)
    bad["spec"] = {"networking": {"outbound": {"passthrough": "false"}}}
    status, ans, _ = await env.post("/v1/admission", review(bad), token=None)
    assert status == 200 and ans["response"]["allowed"] is False
    assert "must be true or false" in ans["response"]["status"]["message"]


async def test_token_auth(make_env: EnvFactory) -> None:
    env = await make_env()
    doc = {"type": "Mesh", "name": "idle", "networking": {"outbound": {"passthrough": False}}}
    status, ans, headers = await env.post("/v1/check", doc, token=None)
    assert status == 401 and headers["WWW-Authenticate"].startswith('Bearer realm="passguard"')
    status, ans, headers = await env.post("/v1/check", doc, token="wrong")
    assert status == 401 and 'error="invalid_token"' in headers["WWW-Authenticate"]
    status, ans, _ = await env.post("/v1/check", doc)
    assert status == 200 and ans["verdict"] == "allow"
    status, audit = await env.get("/v1/audit?limit=5&verdict=allow")
    assert audit["entries"][0]["requester"] == "token:ci-deploy"
    assert (await env.get("/v1/audit", token=None))[0] == 401
    assert (await env.post("/-/reload", {}, token=None))[0] == 401
    # Open without a token unless protect_metrics.
    assert (await env.get("/metrics", token=None))[0] == 200
    assert (await env.get("/-/healthy", token=None))[0] == 200
    assert (await env.get("/", token=None))[0] == 200


async def test_protect_metrics(make_env: EnvFactory) -> None:
    env = await make_env(protect_metrics=True)
    assert (await env.get("/metrics", token=None))[0] == 401
    assert (await env.get("/", token=None))[0] == 401
    assert (await env.get("/v1/meshes", token=None))[0] == 401
    assert (await env.get("/metrics"))[0] == 200
    # Probes cannot send a token: health stays open.
    assert (await env.get("/-/ready", token=None))[0] == 200
    # The API server authenticates by TLS: admission stays reachable.
    _, ans, _ = await env.post("/v1/admission", review(k8s_mesh("idle", False)), token=None)
    assert ans["response"]["allowed"] is True


async def test_certificate_rotation_while_serving(make_env: EnvFactory) -> None:
    env = await make_env()
    old_ctx = env.client_ssl()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=old_ctx)) as kept:
        async with kept.get(env.url + "/-/healthy") as r:
            assert r.status == 200
        new_ca = trustme.CA()
        leaf = new_ca.issue_cert("127.0.0.1")
        # Write the key first and the certificate last, as a rotation would.
        leaf.private_key_pem.write_to_path(str(env.tmp / "tls.key"))
        leaf.cert_chain_pems[0].write_to_path(str(env.tmp / "tls.crt"))
        for _ in range(40):
            await asyncio.sleep(0.25)
            assert env.daemon.tls is not None
            if env.daemon.tls.reloads:
                break
        assert env.daemon.tls is not None and env.daemon.tls.reloads == 1
        # The kept-alive connection from before the rotation still works.
        async with kept.get(env.url + "/-/healthy") as r:
            assert r.status == 200
    # A new connection gets the new chain: it verifies with the new CA only.
    async with aiohttp.ClientSession() as s:
        async with s.get(env.url + "/-/healthy", ssl=env.client_ssl(new_ca)) as r:
            assert r.status == 200
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            async with s.get(env.url + "/-/healthy", ssl=env.client_ssl()):
                pass
    # A broken pair (key of another certificate) is refused; the new one keeps serving.
    other = new_ca.issue_cert("127.0.0.1")
    other.private_key_pem.write_to_path(str(env.tmp / "tls.key"))
    assert env.daemon.tls.check() is False
    async with aiohttp.ClientSession() as s, s.get(
            env.url + "/-/healthy", ssl=env.client_ssl(new_ca)) as r:
        assert r.status == 200


async def test_mutual_tls(make_env: EnvFactory) -> None:
    env = await make_env(client_ca=True)
    apiserver = env.ca.issue_cert("kube-apiserver")
    status, ans, _ = await env.post("/v1/admission", review(k8s_mesh("idle", False)),
                                    token=None, ctx=env.client_ssl(client=apiserver))
    assert status == 200 and ans["response"]["allowed"] is True
    with pytest.raises(aiohttp.ClientError):
        await env.post("/v1/admission", review(k8s_mesh("idle", False)), token=None)
    entries, _ = env.daemon.audit.query(limit=1)
    assert entries[0].requester == "alice@example.com via cert:kube-apiserver"


async def test_audit_query_filters_and_pages(make_env: EnvFactory) -> None:
    env = await make_env()
    for mesh in ("busy", "idle", "busy"):
        await env.post("/v1/check", {"type": "Mesh", "name": mesh,
                                     "networking": {"outbound": {"passthrough": False}}})
    _, page1 = await env.get("/v1/audit?limit=2")
    assert len(page1["entries"]) == 2 and page1["next"] is not None
    _, page2 = await env.get(f"/v1/audit?limit=2&cursor={page1['next']}")
    assert len(page2["entries"]) == 1 and page2["next"] is None
    ids = [e["id"] for e in page1["entries"] + page2["entries"]]
    assert ids == sorted(ids, reverse=True), "newest first"
    _, busy = await env.get("/v1/audit?mesh=busy&verdict=deny")
    assert [e["mesh"] for e in busy["entries"]] == ["busy", "busy"]
    _, recent = await env.get("/v1/audit?since=1h")
    assert len(recent["entries"]) == 3
    status, err = await env.get("/v1/audit?since=yesterday")
    assert status == 400 and "since" in err["error"]
    status, err = await env.get("/v1/audit?verdict=maybe")
    assert status == 400


async def test_audit_unwritable_refuses_in_enforce_mode(make_env: EnvFactory) -> None:
    env = await make_env()
    env.daemon.audit.close()  # every write now fails
    doc = {"type": "Mesh", "name": "idle", "networking": {"outbound": {"passthrough": False}}}
    status, ans, _ = await env.post("/v1/check", doc)
    assert status == 200 and ans["allowed"] is False and ans["verdict"] == "deny"
    assert any("audit log cannot be written" in w for w in ans["warnings"])
    # Keep stop() from failing on the closed connection.
    env.daemon.audit = copy.copy(env.daemon.audit)
    env.daemon.audit.close = lambda: None  # type: ignore[method-assign]
