"""Kubernetes ``AdmissionReview`` v1: validate the request, shape the response.

The API server expects: the request's ``uid`` echoed; ``allowed``; on a denial
``status.code`` 403 and a message; ``warnings`` each under 120 characters and
all together under 4 KiB (longer ones are truncated by the API server or the
request fails, so passguard trims them itself and says so).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from passguard.errors import InputError
from passguard.fields import NAME_BYTES, USER_BYTES, cap

API_VERSION = "admission.k8s.io/v1"
MAX_WARNING = 119
MAX_WARNINGS_BYTES = 4000
MAX_MESSAGE = 3000
OPERATIONS = ("CREATE", "UPDATE", "DELETE", "CONNECT")


@dataclass(frozen=True)
class AdmissionRequest:
    uid: str
    kind: str
    operation: Literal["CREATE", "UPDATE", "DELETE", "CONNECT"]
    username: str
    groups: tuple[str, ...]
    object: Any
    old_object: Any
    dry_run: bool
    name: str
    namespace: str


def parse_review(body: Any) -> AdmissionRequest:
    """Check the envelope field by field; InputError names the first bad field."""
    if not isinstance(body, dict):
        raise InputError("AdmissionReview: body must be a JSON object")
    if body.get("kind") != "AdmissionReview":
        raise InputError(f"AdmissionReview: kind must be AdmissionReview, got {body.get('kind')!r}")
    if body.get("apiVersion") != API_VERSION:
        raise InputError(f"AdmissionReview: apiVersion must be {API_VERSION} (configure "
                         f"admissionReviewVersions: [v1]), got {body.get('apiVersion')!r}")
    req = body.get("request")
    if not isinstance(req, dict):
        raise InputError("AdmissionReview: request must be an object")
    uid = req.get("uid")
    if not isinstance(uid, str) or not uid:
        raise InputError("AdmissionReview: request.uid must be a non-empty string")
    op = req.get("operation")
    if op not in OPERATIONS:
        raise InputError(f"AdmissionReview: request.operation must be one of "
                         f"{', '.join(OPERATIONS)}, got {op!r}")
    kind = req.get("kind") or {}
    if not isinstance(kind, dict) or not isinstance(kind.get("kind", ""), str):
        raise InputError("AdmissionReview: request.kind must be a GroupVersionKind object")
    user = req.get("userInfo") or {}
    if not isinstance(user, dict):
        raise InputError("AdmissionReview: request.userInfo must be an object")
    username = user.get("username", "")
    groups = user.get("groups") or []
    if not isinstance(username, str) or not isinstance(groups, list) or \
            not all(isinstance(g, str) for g in groups):
        raise InputError("AdmissionReview: request.userInfo.username must be a string and "
                         "groups a list of strings")
    obj, old = req.get("object"), req.get("oldObject")
    for name, value in (("object", obj), ("oldObject", old)):
        if value is not None and not isinstance(value, dict):
            raise InputError(f"AdmissionReview: request.{name} must be an object or null")
    if op in ("CREATE", "UPDATE") and obj is None:
        raise InputError(f"AdmissionReview: request.object is required for {op}")
    if op == "UPDATE" and old is None:
        raise InputError("AdmissionReview: request.oldObject is required for UPDATE")
    if op == "DELETE" and old is None:
        raise InputError("AdmissionReview: request.oldObject is required for DELETE")
    dry = req.get("dryRun", False)
    if not isinstance(dry, bool):
        raise InputError("AdmissionReview: request.dryRun must be true or false")
    # The names go into the audit and the log: capped here, with the digest of
    # the whole value (passguard.fields), whatever the body claims.
    return AdmissionRequest(uid=uid, kind=cap(str(kind.get("kind", "")), NAME_BYTES),
                            operation=op, username=cap(username or "unknown", USER_BYTES),
                            groups=tuple(groups), object=obj,
                            old_object=old if op != "CREATE" else None, dry_run=dry,
                            name=cap(str(req.get("name") or ""), NAME_BYTES),
                            namespace=cap(str(req.get("namespace") or ""), NAME_BYTES))


def documents(req: AdmissionRequest) -> list[Any]:
    """The request as the gate's ``{"object", "oldObject"}`` input."""
    return [{"object": None if req.operation == "DELETE" else req.object,
             "oldObject": req.old_object}]


def fit_warnings(warnings: list[str]) -> list[str]:
    """Trim to the API server's limits; a last line says when some were dropped."""
    out: list[str] = []
    used = 0
    for i, w in enumerate(warnings):
        w = " ".join(w.split())
        if len(w) > MAX_WARNING:
            w = w[:MAX_WARNING - 1] + "…"
        size = len(w.encode())
        if used + size > MAX_WARNINGS_BYTES - 120:
            out.append(f"passguard: {len(warnings) - i} more warning(s) in the audit log")
            break
        out.append(w)
        used += size
    return out


def response(uid: str, allowed: bool, message: str, warnings: list[str]) -> dict[str, Any]:
    resp: dict[str, Any] = {"uid": uid, "allowed": allowed}
    if not allowed:
        if len(message) > MAX_MESSAGE:
            message = message[:MAX_MESSAGE - 1] + "…"
        resp["status"] = {"code": 403, "reason": "Forbidden", "message": message}
    fitted = fit_warnings(warnings)
    if fitted:
        resp["warnings"] = fitted
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": resp}
