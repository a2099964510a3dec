"""Tokens file, AdmissionReview limits, and `passguard token hash`."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from passguard.errors import ConfigError
from passguard.gate.admission import fit_warnings, response
from passguard.web.auth import TokenStore, parse_tokens

GOOD = hashlib.sha256(b"tok").hexdigest()


def test_token_store_names_and_reload(tmp_path: Path) -> None:
    f = tmp_path / "tokens.yaml"
    f.write_text(f"tokens:\n  - {{name: ci, sha256: {GOOD}}}\n")
    store = TokenStore(f)
    assert store.name_for("tok") == "ci"
    assert store.name_for("nope") is None
    # A broken edit keeps the previous tokens.
    f.write_text("tokens: [oops")
    store._checked = 0.0
    assert store.name_for("tok") == "ci"


@pytest.mark.parametrize(("text", "error"), [
    ("tokens: [{name: ci, sha256: tok}]", "must be 64 hex digits"),
    (f"tokens: [{{name: ci, sha256: {GOOD}}}, {{name: ci, sha256: {GOOD}}}]", "listed twice"),
    ("tokens: [{name: ci}]", "exactly name and sha256"),
    ("users: []", "expected one document"),
])
def test_bad_tokens_files(text: str, error: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_tokens(text.encode(), "tokens.yaml")
    assert error in str(info.value)


def test_warnings_fit_the_api_server_limits() -> None:
    fitted = fit_warnings(["w" * 500] * 100)
    assert all(len(w) < 120 for w in fitted)
    assert sum(len(w.encode()) for w in fitted) < 4096
    assert "more warning(s) in the audit log" in fitted[-1]
    r = response("u", False, "m" * 10_000, [])["response"]
    assert r["status"]["code"] == 403 and len(r["status"]["message"]) <= 3000
    assert "warnings" not in r


def test_token_hash_cli() -> None:
    res = subprocess.run([sys.executable, "-m", "passguard", "token", "hash"], input="tok\n",
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == GOOD
    empty = subprocess.run([sys.executable, "-m", "passguard", "token", "hash"], input="",
                           capture_output=True, text=True, timeout=60)
    assert empty.returncode == 2 and "no token" in empty.stderr
