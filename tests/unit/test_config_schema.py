"""The JSON Schema of ``passguard config schema`` describes the files ``build()`` accepts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from passguard import config
from passguard.errors import ConfigError
from tests.unit.test_config import ROOT, uncommented_example


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    out = subprocess.run([sys.executable, "-m", "passguard", "config", "schema"],
                         capture_output=True, text=True, timeout=60, check=True)
    schema = json.loads(out.stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def schema_errors(validator: jsonschema.Draft202012Validator, doc: Any) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(doc)]


def test_example_matches_the_schema(validator: jsonschema.Draft202012Validator) -> None:
    doc = yaml.safe_load((ROOT / "config" / "passguard.example.yaml").read_text())
    assert schema_errors(validator, doc) == []


def test_uncommented_example_matches_the_schema(
        validator: jsonschema.Draft202012Validator) -> None:
    doc = yaml.safe_load(uncommented_example())
    assert [s["kind"] for s in doc["sources"]] == ["envoy", "kuma", "prometheus"]
    assert "tls" in doc["auth"] and "tokens_file" in doc["auth"]
    assert schema_errors(validator, doc) == []


def test_defaults_are_shown_as_written(validator: jsonschema.Draft202012Validator) -> None:
    """An editor's hover shows the default as the file spells it."""
    defs = validator.schema["$defs"]
    assert defs["Scrape"]["properties"]["interval"]["default"] == "15s"
    assert defs["Scrape"]["properties"]["spread"]["default"] == "auto"
    assert validator.schema["properties"]["listen"]["default"] == "127.0.0.1:9110"
    assert defs["Log"]["properties"]["format"] == {
        "default": "text", "enum": ["text", "json"], "title": "Format"}


@pytest.mark.parametrize("doc", [
    {"bogus": 1},
    {"scrape": {"intervall": "15s"}},
    {"scrape": {"interval": 15}},
    {"window": "1fortnight"},
    {"gate": {"mode": "block"}},
    {"gate": {"meshes": {"prod": {"mode": "loud", "x": 1}}}},
    {"sources": [{"kind": "consul"}]},
    {"sources": [{"kind": "kuma", "url": "https://cp:5682", "stats": "grpc"}]},
    {"sources": [{"kind": "envoy", "targets": [{"url": "ftp://x"}]}]},
    {"limits": {"max_connections": 2}},
    {"limits": {"max_body_bytes": "lots"}},
    {"auth": {"tls": {"cert_file": "a.crt"}}},
    {"log": {"format": "xml"}},
])
def test_schema_and_build_refuse_alike(validator: jsonschema.Draft202012Validator,
                                       doc: dict[str, Any]) -> None:
    assert schema_errors(validator, doc)
    with pytest.raises(ConfigError):
        config.build(doc, Path("/etc/passguard"))


def test_log_format(tmp_path: Path) -> None:
    assert config.build({}).log_format == "text"
    assert config.build({"log": {"format": "json"}}).log_format == "json"
    with pytest.raises(ConfigError) as info:
        config.build({"log": {"format": "xml"}})
    assert info.value.errors == ["log.format: must be one of text, json, got 'xml'"]
