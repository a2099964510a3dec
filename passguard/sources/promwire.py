"""The Prometheus HTTP API's answers to an instant query, checked field by field.

Invariant: anything that is not a complete ``vector`` answer (an error, a
partial answer with ``warnings``, a wrong shape, not JSON) raises
``PrometheusError`` naming the field; values stay floats, NaN and ±Inf included.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from passguard.errors import PassguardError


class PrometheusError(PassguardError):
    """Prometheus could not be asked, refused, or answered something unusable."""



@dataclass(frozen=True, slots=True)
class Sample:
    labels: Mapping[str, str]
    value: float


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def parse_vector(body: Any, what: str) -> list[Sample]:
    """The ``data.result`` of a successful instant query of type ``vector``.

    Raises PrometheusError naming the field that is wrong.  Values are kept as
    floats, ``NaN`` and ``±Inf`` included (the caller decides what they mean)."""
    if not isinstance(body, dict):
        raise PrometheusError(f"{what}: the answer must be a JSON object, got {_kind(body)}")
    status = body.get("status")
    if status == "error":
        raise PrometheusError(f"{what}: Prometheus answered an error: "
                              f"{body.get('errorType') or 'error'}: {body.get('error')}")
    if status != "success":
        raise PrometheusError(f"{what}: status must be \"success\", got {status!r}")
    warnings = body.get("warnings")
    if warnings:
        # Thanos/Mimir partial responses: some data is missing, and missing
        # samples could hide traffic.
        raise PrometheusError(f"{what}: Prometheus answered with warnings (partial data): "
                              + "; ".join(str(w) for w in warnings)[:500])
    data = body.get("data")
    if not isinstance(data, dict):
        raise PrometheusError(f"{what}: data must be an object, got {_kind(data)}")
    rtype = data.get("resultType")
    if rtype != "vector":
        raise PrometheusError(f"{what}: data.resultType must be \"vector\", got {rtype!r}")
    result = data.get("result")
    if not isinstance(result, list):
        raise PrometheusError(f"{what}: data.result must be a list, got {_kind(result)}")
    out: list[Sample] = []
    for i, item in enumerate(result):
        where = f"{what}: data.result[{i}]"
        if not isinstance(item, dict):
            raise PrometheusError(f"{where} must be an object, got {_kind(item)}")
        metric = item.get("metric")
        if not isinstance(metric, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metric.items()):
            raise PrometheusError(f"{where}.metric must map label names to strings, "
                                  f"got {_kind(metric)}")
        value = item.get("value")
        if not isinstance(value, list) or len(value) != 2:
            raise PrometheusError(f"{where}.value must be [timestamp, \"value\"], "
                                  f"got {_kind(value)}")
        ts, text = value
        if isinstance(ts, bool) or not isinstance(ts, int | float):
            raise PrometheusError(f"{where}.value[0] must be a timestamp, got {_kind(ts)}")
        if not isinstance(text, str):
            raise PrometheusError(f"{where}.value[1] must be a string, got {_kind(text)}")
        try:
            number = float(text)
        except ValueError:
            raise PrometheusError(f"{where}.value[1] is not a number: {text[:40]!r}") from None
        out.append(Sample(metric, number))
    return out


def decode_vector(body: bytes, where: str) -> list[Sample]:
    doc = _json_or_none(body)
    if doc is None:
        head = body[:80].decode("utf-8", "replace").strip()
        raise PrometheusError(f"{where}: the answer is not JSON (starts {head!r}); is url "
                              "the Prometheus API base?")
    return parse_vector(doc, where)


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None
