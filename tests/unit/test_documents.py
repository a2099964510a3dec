"""Document interpretation: Kuma-format files (the project's own in tests/data/kuma,
Kuma's own ones as cross-checks) and bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from passguard.documents import parse_documents, parse_resource
from passguard.errors import InputError
from passguard.loader import load_documents
from tests.kuma_fixtures import cross_check, kuma, own


def load(path: Path) -> list[Any]:
    return load_documents(path.read_bytes())


@pytest.mark.parametrize("name", ["mesh/mesh-passthrough-false.k8s.yaml",
                                  "mesh/mesh-passthrough-false.universal.yaml"])
def test_mesh_documents_disable_passthrough(name: str) -> None:
    [r] = [parse_resource(d, "doc") for d in load(own(name))]
    assert not isinstance(r, str)
    assert (r.kind, r.name, r.mesh, r.mode) == ("Mesh", "payments", "payments", "None")


def test_meshpassthrough_documents() -> None:
    [none] = load(own("meshpassthrough/disable.universal.yaml"))
    r = parse_resource(none, "doc")
    assert not isinstance(r, str)
    assert (r.mode, r.mesh, r.target_ref.kind) == ("None", "payments", "Dataplane")
    [some] = load(own("meshpassthrough/allow-some.universal.yaml"))
    r = parse_resource(some, "doc")
    assert not isinstance(r, str)
    assert r.mode == "Matched" and len(r.matches) == 4
    assert r.target_ref.labels == {"app": "checkout"}
    assert {m.type for m in r.matches} == {"Domain", "IP", "CIDR"}


def test_spec_wrapped_as_universal_defaults_to_matched() -> None:
    [spec] = load(own("meshpassthrough/spec.yaml"))
    r = parse_resource({"type": "MeshPassthrough", "name": "x", "mesh": "m", "spec": spec}, "d")
    assert not isinstance(r, str)
    # passthroughMode unset: kept unset, for the version to decide (Matched
    # from 2.10 and on Universal; the 2.8-2.9 CRD stored None).
    assert r.mode is None and len(r.matches) == 3
    assert r.policy().mode is None and not r.policy().kubernetes
    assert r.matches[1].value == "198.51.100.0/24"  # CIDR normalised


# --------------------------------------------------------------------------- Kuma's own files


@cross_check
@pytest.mark.parametrize("name", ["mesh/website-mesh-passthrough-false.k8s.yaml",
                                  "mesh/website-mesh-passthrough-false.universal.yaml"])
def test_kuma_mesh_fixtures_disable_passthrough(name: str) -> None:
    [r] = [parse_resource(d, "doc") for d in load(kuma(name))]
    assert not isinstance(r, str)
    assert (r.kind, r.name, r.mesh, r.mode) == ("Mesh", "default", "default", "None")


@cross_check
def test_kuma_meshpassthrough_fixtures() -> None:
    [none] = load(kuma("meshpassthrough/website-disable-passthrough.universal.yaml"))
    r = parse_resource(none, "doc")
    assert not isinstance(r, str)
    assert (r.mode, r.mesh, r.target_ref.kind) == ("None", "default", "Dataplane")
    [some] = load(kuma("meshpassthrough/website-allow-some-passthrough.universal.yaml"))
    r = parse_resource(some, "doc")
    assert not isinstance(r, str)
    assert r.mode == "Matched" and len(r.matches) == 5
    assert r.target_ref.labels == {"app": "demo-app"}
    assert {m.type for m in r.matches} == {"Domain", "IP", "CIDR"}


@cross_check
def test_kuma_spec_fixture_wrapped_as_universal_defaults_to_matched() -> None:
    [spec] = load(kuma("meshpassthrough/v2.14.3-valid.spec.input.yaml"))
    r = parse_resource({"type": "MeshPassthrough", "name": "x", "mesh": "m", "spec": spec}, "d")
    assert not isinstance(r, str)
    # Unset: kept so, for the Kuma version to decide (Matched from 2.10).
    assert r.mode is None and len(r.matches) == 6
    assert r.matches[2].value == "1.2.3.0/24"  # CIDR normalised


# --------------------------------------------------------------------------- other input


def test_object_old_object_pair_and_other_kinds() -> None:
    new = {"type": "Mesh", "name": "m1", "networking": {"outbound": {"passthrough": False}}}
    old = {"type": "Mesh", "name": "m1", "networking": {"outbound": {"passthrough": False}}}
    parsed = parse_documents([{"object": new, "oldObject": old},
                              {"apiVersion": "apps/v1", "kind": "Deployment"}])
    [change] = parsed.changes
    assert change.old is not None and change.old_source == "document"
    assert parsed.warnings == ["document 2: apps/v1 Deployment is not a Mesh or "
                               "MeshPassthrough: ignored"]


@pytest.mark.parametrize(("doc", "message"), [
    ({"type": "Mesh", "name": "m", "networking": {"outbound": {"passthrough": "false"}}},
     "networking.outbound.passthrough must be true or false, got a string 'false'"),
    ({"type": "Mesh"}, "name is required"),
    ({"apiVersion": "kuma.io/v1alpha1", "kind": "Mesh", "metadata": {}}, "metadata.name is"),
    ({"type": "MeshPassthrough", "name": "x", "spec": {"default": {"passthroughMode": "Some"}}},
     "passthroughMode must be All, Matched or None"),
    ({"type": "MeshPassthrough", "name": "x", "spec": {"default": {"appendMatch": [
        {"type": "IP", "value": "999.1.1.1"}]}}}, "appendMatch[0].value is not a valid IP"),
    ({"type": "MeshPassthrough", "name": "x", "spec": {"default": {"appendMatch": [
        {"type": "IP", "value": "1.1.1.1", "port": 70000}]}}}, "port must be between"),
    ({"type": "Mesh", "name": "m", "networking": "off"}, "networking must be a mapping"),
    ({"hello": "world"}, "not a Kuma resource"),
    ("just a string", "expected a resource (a mapping), got a string"),
    ({"type": "Mesh", "name": "m", "labels": {"passguard.io/acknowledge-traffic": " "}},
     "must give a reason"),
])
def test_bad_documents_name_the_field(doc: Any, message: str) -> None:
    with pytest.raises(InputError, match=None) as info:
        parse_documents([doc])
    assert message in str(info.value)


def test_k8s_break_glass_annotation_and_mesh_label() -> None:
    doc = {"apiVersion": "kuma.io/v1alpha1", "kind": "MeshPassthrough",
           "metadata": {"name": "mp", "namespace": "kuma-system",
                        "labels": {"kuma.io/mesh": "prod"},
                        "annotations": {"passguard.io/acknowledge-traffic": "INC-1"}},
           "spec": {"default": {"passthroughMode": "None"}}}
    r = parse_resource(doc, "d")
    assert not isinstance(r, str)
    assert (r.mesh, r.break_glass, r.target_ref.kind) == ("prod", "INC-1", "Mesh")
