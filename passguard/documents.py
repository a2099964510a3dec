"""Turn loaded YAML/JSON documents into typed changes to passthrough.

Accepted shapes (DESIGN §3): Mesh and MeshPassthrough in Universal form
(``type:``) or Kubernetes form (``apiVersion: kuma.io/v1alpha1``, ``kind:``),
several per body, a Kubernetes ``List``, or ``{"object": …, "oldObject": …}``.
Other kinds are ignored and listed in warnings. Every error names the document
and the field.

``passthrough: "false"`` (a string) is refused, not guessed: Kuma's API and
its webhook reject a string there too, so a pipeline sending one has a bug the
gate must not paper over.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from passguard.errors import InputError
from passguard.policy.model import (
    MATCH_TYPES,
    PROTOCOLS,
    Match,
    MeshFlag,
    PassthroughMode,
    Policy,
    TargetRef,
)

MODE_RANK: dict[str, int] = {"None": 0, "Matched": 1, "All": 2}
BREAK_GLASS = "passguard.io/acknowledge-traffic"
# Kinds whose documents hold other documents in ``items`` (kubectl reads any
# object with items as a list: List, MeshList, MeshPassthroughList, ...).
MAX_LIST_NESTING = 8
DEFAULT_MAX_MATCHES = 1000  # limits.max_matches


@dataclass(frozen=True)
class Resource:
    """One Mesh or MeshPassthrough document. ``name`` is the control plane's
    name: ``name.namespace`` for a namespaced Kubernetes object."""

    kind: Literal["Mesh", "MeshPassthrough"]
    name: str
    mesh: str
    form: Literal["universal", "kubernetes"]
    # Mesh: "None" (passthrough: false) or "All"; MeshPassthrough: as written,
    # None when passthroughMode is absent (the Kuma version decides).
    mode: PassthroughMode | None
    matches: tuple[Match, ...] = ()
    target_ref: TargetRef = field(default_factory=TargetRef)
    break_glass: str | None = None
    digest: str = ""
    # Mesh only: was networking.outbound.passthrough written at all?
    explicit: bool = True
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def ident(self) -> tuple[str, str, str]:
        return (self.kind, self.mesh, self.name)

    def policy(self) -> Policy:
        """The MeshPassthrough as the control plane would hold it."""
        return Policy(self.name, self.mesh, self.mode, self.matches, self.target_ref,
                      self.labels, self.form == "kubernetes")

    def flag(self) -> MeshFlag:
        return MeshFlag(self.name, None if not self.explicit else self.mode != "None")


OldSource = Literal["document", "assumed", "control-plane"]


@dataclass(frozen=True)
class Change:
    new: Resource | None
    old: Resource | None
    old_source: OldSource
    operation: Literal["CREATE", "UPDATE", "DELETE"] = "UPDATE"

    @property
    def resource(self) -> Resource:
        r = self.new or self.old
        assert r is not None
        return r


@dataclass
class Parsed:
    changes: list[Change] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# Built once: json.dumps() with options builds an encoder per call (a gate
# request digests every document it judges).
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                              default=str)


def digest(doc: Any) -> str:
    """Of a document whose keys are all strings (``_check_keys`` has run):
    mixed key types could not be sorted."""
    canon = _CANONICAL.encode(doc)
    return "sha256:" + hashlib.sha256(canon.encode()).hexdigest()


def _type(value: object) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


class _Doc:
    """Field access on one document with errors that name the document and the path."""

    def __init__(self, doc: dict[str, Any], label: str) -> None:
        self.doc = doc
        self.label = label

    def fail(self, path: str, problem: str) -> InputError:
        return InputError(f"{self.label}: {path} {problem}")

    def get(self, path: str, expect: type | tuple[type, ...], default: Any = None) -> Any:
        cur: Any = self.doc
        walked: list[str] = []
        for part in path.split("."):
            if cur is None:
                return default
            if not isinstance(cur, dict):
                raise self.fail(".".join(walked), f"must be a mapping, got {_type(cur)}")
            walked.append(part)
            cur = cur.get(part)
        if cur is None:
            return default
        if isinstance(cur, bool) and expect is not bool and bool not in (
                expect if isinstance(expect, tuple) else (expect,)):
            raise self.fail(path, f"must be {_names(expect)}, got a boolean")
        if not isinstance(cur, expect):
            raise self.fail(path, f"must be {_names(expect)}, got {_type(cur)} {_show(cur)}")
        return cur


def _names(expect: type | tuple[type, ...]) -> str:
    types = expect if isinstance(expect, tuple) else (expect,)
    words = {bool: "true or false", str: "a string", int: "a whole number", dict: "a mapping",
             list: "a list"}
    return " or ".join(words.get(t, t.__name__) for t in types)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _string_map(d: _Doc, path: str) -> dict[str, str]:
    raw = d.get(path, dict, {})
    out = {}
    for k, v in raw.items():
        if not isinstance(v, str | int | float) or isinstance(v, bool):
            raise d.fail(f"{path}.{k}", f"must be a string, got {_type(v)}")
        out[str(k)] = str(v)
    return out


def _classify(doc: Any, label: str) -> tuple[str | None, str]:
    """(kind or None for ignored, form); raise for things that are not resources."""
    if not isinstance(doc, dict):
        raise InputError(f"{label}: expected a resource (a mapping), got {_type(doc)}")
    if "apiVersion" in doc or "kind" in doc:
        api, kind = doc.get("apiVersion"), doc.get("kind")
        if not isinstance(kind, str):
            raise InputError(f"{label}: kind must be a string, got {_type(kind)}")
        if not isinstance(api, str):
            raise InputError(f"{label}: apiVersion must be a string, got {_type(api)}")
        if api.split("/")[0] == "kuma.io" and kind in ("Mesh", "MeshPassthrough"):
            return kind, "kubernetes"
        return None, f"{api} {kind}"
    if "type" in doc:
        kind = doc.get("type")
        if not isinstance(kind, str):
            raise InputError(f"{label}: type must be a string, got {_type(kind)}")
        if kind in ("Mesh", "MeshPassthrough"):
            return kind, "universal"
        return None, kind
    raise InputError(f"{label}: neither 'type' (Universal) nor 'apiVersion'/'kind' (Kubernetes) "
                     "is set: not a Kuma resource")


def _parse_matches(d: _Doc, path: str, limit: int) -> tuple[Match, ...]:
    items = d.get(path, list, [])
    if len(items) > limit:
        raise d.fail(path, f"has {len(items)} entries, over limits.max_matches ({limit})")
    out = []
    for i, item in enumerate(items):
        ipath = f"{path}[{i}]"
        if not isinstance(item, dict):
            raise d.fail(ipath, f"must be a mapping, got {_type(item)}")
        m = _Doc(item, d.label)
        mtype = m.get("type", str)
        if mtype not in MATCH_TYPES:
            raise d.fail(f"{ipath}.type", f"must be one of {', '.join(MATCH_TYPES)}, "
                                          f"got {_show(mtype)}")
        value = m.get("value", str)
        if not value:
            raise d.fail(f"{ipath}.value", "is required")
        try:
            if mtype == "IP":
                value = str(ipaddress.ip_address(value))
            elif mtype == "CIDR":
                value = str(ipaddress.ip_network(value, strict=False))
        except ValueError:
            raise d.fail(f"{ipath}.value", f"is not a valid {mtype}: {_show(value)}") from None
        port = m.get("port", int)
        if port is not None and not 1 <= port <= 65535:
            raise d.fail(f"{ipath}.port", f"must be between 1 and 65535, got {port}")
        protocol = m.get("protocol", str)
        if protocol is not None and protocol not in PROTOCOLS:
            raise d.fail(f"{ipath}.protocol", f"must be one of {', '.join(PROTOCOLS)}, "
                                              f"got {_show(protocol)}")
        out.append(Match(mtype, value, port, protocol))
    return tuple(out)


def _parse_target_ref(d: _Doc, path: str) -> TargetRef:
    if d.get(path, dict) is None:
        return TargetRef()  # Kuma's default: the whole mesh
    kind = d.get(f"{path}.kind", str, "Mesh")
    proxy_types = d.get(f"{path}.proxyTypes", list, [])
    for i, t in enumerate(proxy_types):
        if t not in ("Sidecar", "Gateway"):
            raise d.fail(f"{path}.proxyTypes[{i}]", f"must be Sidecar or Gateway, got {_show(t)}")
    return TargetRef(kind=kind, name=d.get(f"{path}.name", str),
                     namespace=d.get(f"{path}.namespace", str),
                     labels=_string_map(d, f"{path}.labels"), tags=_string_map(d, f"{path}.tags"),
                     section_name=d.get(f"{path}.sectionName", str),
                     proxy_types=tuple(proxy_types))


def _break_glass(d: _Doc, form: str) -> str | None:
    where = ("metadata.annotations", "metadata.labels") if form == "kubernetes" else ("labels",)
    for path in where:
        reason = _string_map(d, path).get(BREAK_GLASS)
        if reason is not None:
            if not reason.strip():
                raise d.fail(f"{path}.{BREAK_GLASS}", "must give a reason (it is audited)")
            return reason.strip()
    return None


def _all_keys_are_strings(doc: Any) -> bool:
    stack = [doc]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            if not all(isinstance(k, str) for k in value):
                return False
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return True


def _check_keys(doc: Any, label: str) -> None:
    """Kubernetes and Kuma resources are JSON: every key is a string. YAML
    allows `1:` or `true:` keys; refuse them, naming where (iteratively: the
    loader already bounded the depth). The paths for the message are built
    only when there is something to report: on every request they were ~5 %
    of the event loop's time."""
    if _all_keys_are_strings(doc):
        return
    stack: list[tuple[Any, str]] = [(doc, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, dict):
            for k, v in value.items():
                if not isinstance(k, str):
                    where = f" under {path}" if path else ""
                    raise InputError(f"{label}: key {k!r}{where} is not a string (Kubernetes "
                                     "and Kuma resources have string keys only)")
                stack.append((v, f"{path}.{k}" if path else k))
        elif isinstance(value, list):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(value))


def parse_resource(doc: Any, label: str, keys_checked: bool = False,
                   namespace: str | None = None,
                   max_matches: int = DEFAULT_MAX_MATCHES) -> Resource | str:
    """A Resource, or a description of an ignored document (a string).
    ``keys_checked``: ``doc`` is part of a document whose keys were checked
    (walking an AdmissionReview's objects again cost a tenth of a request).
    ``namespace``: where a Kubernetes object without ``metadata.namespace``
    is made (an AdmissionReview's ``request.namespace``)."""
    if not keys_checked:
        _check_keys(doc, label)
    kind, what = _classify(doc, label)
    if kind is None:
        return what
    form: Literal["universal", "kubernetes"] = "kubernetes" if what == "kubernetes" else "universal"
    d = _Doc(doc, label)
    prefix = "spec." if form == "kubernetes" else ""
    name = d.get("metadata.name" if form == "kubernetes" else "name", str)
    if not name:
        raise d.fail("metadata.name" if form == "kubernetes" else "name", "is required")
    label = f"{label} ({kind} {name})"
    d.label = label
    bg = _break_glass(d, form)
    labels = _string_map(d, "metadata.labels" if form == "kubernetes" else "labels")
    if kind == "Mesh":
        passthrough = d.get(f"{prefix}networking.outbound.passthrough", bool)
        mode: PassthroughMode = "None" if passthrough is False else "All"
        return Resource("Mesh", name, name, form, mode, break_glass=bg, digest=digest(doc),
                        explicit=passthrough is not None, labels=labels)
    if form == "kubernetes":
        mesh = labels.get("kuma.io/mesh", "default")
        # The control plane names a namespaced object `name.namespace`
        # (docs/semantics.md): the same name its own listing shows.
        ns = d.get("metadata.namespace", str) or namespace
        if ns:
            name = f"{name}.{ns}"
    else:
        mesh = d.get("mesh", str, "default")
    spec = "spec"
    raw_mode = d.get(f"{spec}.default.passthroughMode", str)
    if raw_mode is not None and raw_mode not in MODE_RANK:
        raise d.fail(f"{spec}.default.passthroughMode",
                     f"must be All, Matched or None, got {_show(raw_mode)}")
    matches = _parse_matches(d, f"{spec}.default.appendMatch", max_matches)
    return Resource("MeshPassthrough", name, mesh, form, raw_mode,
                    matches, _parse_target_ref(d, f"{spec}.targetRef"), bg, digest(doc),
                    labels=labels)


def _flatten(docs: list[Any]) -> list[tuple[Any, Any, bool]]:
    """(object, oldObject, has_old) per entry; Kubernetes Lists are opened."""
    out: list[tuple[Any, Any, bool]] = []
    for doc in docs:
        if isinstance(doc, dict) and "object" in doc and not (
                {"type", "kind", "apiVersion"} & set(doc)):
            unknown = set(doc) - {"object", "oldObject"}
            if unknown:
                raise InputError("unexpected keys next to object/oldObject: "
                                 f"{sorted(unknown, key=repr)}")
            out.append((doc["object"], doc.get("oldObject"), "oldObject" in doc))
        else:
            out.extend((item, None, False) for item in _list_items(doc, 0))
    return out


def _is_list(doc: Any) -> bool:
    """kubectl's rule: an object with ``items`` is a list, whatever its kind
    (``List``, ``MeshList``, ``MeshPassthroughList``) — and so is a kumactl
    listing, which has no kind at all."""
    if not isinstance(doc, dict) or "items" not in doc:
        return False
    kind = doc.get("kind")
    return (kind is None and "type" not in doc) or (isinstance(kind, str) and kind.endswith("List"))


def _list_items(doc: Any, depth: int) -> list[Any]:
    """``doc`` itself, or every resource of a list, nested lists opened."""
    if not _is_list(doc):
        return [doc]
    if depth >= MAX_LIST_NESTING:
        raise InputError(f"lists nested more than {MAX_LIST_NESTING} deep")
    items = doc["items"]
    if items is None:
        return []
    if not isinstance(items, list):
        raise InputError(f"a {doc.get('kind') or 'list'}'s items must be a list, "
                         f"got {_type(items)}")
    return [r for item in items for r in _list_items(item, depth + 1)]


def parse_documents(docs: list[Any], old_docs: list[Any] | None = None,
                    max_matches: int = DEFAULT_MAX_MATCHES) -> Parsed:
    """Changes described by ``docs``; previous state from oldObject or ``old_docs``."""
    parsed = Parsed()
    for i, doc in enumerate(docs):
        _check_keys(doc, f"document {i + 1}")  # before any key is sorted or compared
    old_index: dict[tuple[str, str, str], Resource] = {}
    olds = [item for od in old_docs or [] for item in _list_items(od, 0)]
    for i, od in enumerate(olds):
        r = parse_resource(od, f"old document {i + 1}", max_matches=max_matches)
        if isinstance(r, Resource):
            old_index[r.ident] = r
    entries = _flatten(docs)
    if not entries:
        raise InputError("no documents to check")
    for i, (obj, old_obj, has_old) in enumerate(entries):
        label = f"document {i + 1}"
        new = parse_resource(obj, label, keys_checked=True, max_matches=max_matches) \
            if obj is not None else None
        if isinstance(new, str):
            parsed.warnings.append(f"{label}: {new} is not a Mesh or MeshPassthrough: ignored")
            continue
        old: Resource | None = None
        source: OldSource = "assumed"
        if has_old and old_obj is not None:
            o = parse_resource(old_obj, f"{label} oldObject", keys_checked=True,
                               max_matches=max_matches)
            if isinstance(o, str):
                raise InputError(f"{label}: oldObject is {o}, not the same kind as object")
            old, source = o, "document"
        elif has_old:
            source = "document"  # explicitly no previous object: a creation
        elif new is not None and new.ident in old_index:
            old, source = old_index[new.ident], "document"
        if new is None:
            if old is None:
                raise InputError(f"{label}: object is null and there is no oldObject")
            parsed.changes.append(Change(None, old, source, "DELETE"))
            continue
        if old is not None and old.ident != new.ident:
            raise InputError(f"{label}: oldObject is {old.kind} {old.name} in mesh {old.mesh}, "
                             f"object is {new.kind} {new.name} in mesh {new.mesh}")
        op: Literal["CREATE", "UPDATE"] = "CREATE" if has_old and old is None else "UPDATE"
        parsed.changes.append(Change(new, old, source, op))
    return parsed
