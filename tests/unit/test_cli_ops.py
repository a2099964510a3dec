"""``passguard audit`` against a real HTTP server on 127.0.0.1 (pages
followed, bounded), ``-o yaml`` beside ``-o json``, and the completion
scripts: bash parses them and completes with them."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from passguard import cli
from tests.unit.test_cli_http import Recorder

ENTRIES = [{"id": i, "time": f"2026-12-01T00:00:{i:02d}.000Z", "source": "check",
            "requester": "ci\nforged" if i == 7 else "ci", "mesh": "default", "mode": "enforce",
            "verdict": "deny" if i % 2 else "allow", "dry_run": False, "break_glass": None,
            "reasons": [], "documents": [{"kind": "Mesh", "name": "default", "digest": "x"}],
            "evidence": None, "peer": "127.0.0.1"} for i in range(25, 0, -1)]


def audit_answer(path: str) -> tuple[int, dict[str, str], bytes]:
    """GET /v1/audit as the daemon pages it: newest first, ``next`` = the cursor."""
    q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(path).query))
    rows = [e for e in ENTRIES if "cursor" not in q or e["id"] < int(q["cursor"])]
    limit = int(q["limit"])
    page, more = rows[:limit], len(rows) > limit
    body = {"entries": page, "next": str(page[-1]["id"]) if more else None}
    return 200, {"Content-Type": "application/json"}, json.dumps(body).encode()


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    monkeypatch.delenv("PASSGUARD_TOKEN", raising=False)
    monkeypatch.delenv("PASSGUARD_SERVER", raising=False)
    r = Recorder(audit_answer)
    yield r
    r.close()


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().out


def test_audit_follows_pages_up_to_the_limit(server: Recorder, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("passguard.cli_ops.PAGE", 10)
    code, out = run(["audit", "--server", server.url, "--limit", "23", "--since", "1h",
                     "--mesh", "default", "-o", "json"], capsys)
    assert code == 0
    body = json.loads(out)
    assert [e["id"] for e in body["entries"]] == list(range(25, 2, -1))
    assert body["next"] == "3"
    paths = [urllib.parse.parse_qs(urllib.parse.urlsplit(p).query) for p, _ in server.seen]
    assert [q.get("cursor") for q in paths] == [None, ["16"], ["6"]]
    assert [q["limit"] for q in paths] == [["10"], ["10"], ["3"]]
    assert all(q["since"] == ["1h"] and q["mesh"] == ["default"] for q in paths)


def test_audit_text_and_yaml(server: Recorder, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(["audit", "--server", server.url, "--verdict", "deny"], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "TIME", "VERDICT", "MODE", "MESH", "SOURCE", "REQUESTER",
                                "CHANGE", "FLAGS"]
    assert len(lines) == 26 and "ci\\nforged" in out  # a newline in a value stays escaped
    assert "verdict=deny" in server.seen[0][0]
    code, out = run(["audit", "--server", server.url, "--limit", "2", "-o", "yaml"], capsys)
    assert yaml.safe_load(out) == {"entries": ENTRIES[:2], "next": "24"}


def test_audit_refuses_a_bad_limit(server: Recorder, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["audit", "--server", server.url, "--limit", "0"]) == cli.EXIT_ERROR
    assert server.seen == []


def test_status_yaml_is_the_json_body(capsys: pytest.CaptureFixture[str]) -> None:
    body = {"window_seconds": 900, "meshes": [{"mesh": "default", "verdict_if_disabled": "deny"}]}
    r = Recorder(lambda _: (200, {"Content-Type": "application/json"},
                            json.dumps(body).encode()))
    try:
        _, as_json = run(["status", "--server", r.url, "-o", "json"], capsys)
        _, as_yaml = run(["status", "--server", r.url, "-o", "yaml"], capsys)
    finally:
        r.close()
    assert json.loads(as_json) == yaml.safe_load(as_yaml) == body


def test_every_json_output_has_yaml_beside_it() -> None:
    from passguard.cli_ops import _walk

    for path, parser in _walk(cli.build_parser()):
        for action in parser._actions:
            if "--output" in action.option_strings and "json" in (action.choices or ()):
                assert "yaml" in action.choices, " ".join(path)  # type: ignore[operator]


# -- completion --------------------------------------------------------------------

@pytest.fixture(scope="module")
def bash() -> str:
    found = shutil.which("bash")
    if found is None:
        pytest.skip("no bash")
    return found


def script(shell: str, capsys: pytest.CaptureFixture[str]) -> str:
    code, out = run(["completion", shell], capsys)
    assert code == 0
    return out


def complete(bash: str, text: str, words: list[str]) -> list[str]:
    """What ``_passguard`` offers for the last of ``words``, in a bash that
    sourced the script (as a user's shell would), via compgen."""
    array = " ".join(f"'{w}'" for w in words)
    program = (f"{text}\nCOMP_WORDS=({array}); COMP_CWORD={len(words) - 1}; "
               "_passguard; printf '%s\\n' \"${COMPREPLY[@]}\"")
    done = subprocess.run([bash, "--norc", "--noprofile", "-c", program], capture_output=True,
                          text=True, timeout=20, check=False)
    assert done.returncode == 0, done.stderr
    return [w for w in done.stdout.splitlines() if w]


def test_bash_parses_both_scripts(bash: str, capsys: pytest.CaptureFixture[str]) -> None:
    for shell in ("bash", "zsh"):  # no zsh here: its script must at least be sh-shaped
        text = script(shell, capsys)
        done = subprocess.run([bash, "-n"], input=text, capture_output=True, text=True,
                              timeout=20, check=False)
        assert done.returncode == 0, (shell, done.stderr)
    assert "complete -o bashdefault -o default -F _passguard passguard" in script("bash", capsys)
    assert script("zsh", capsys).startswith("#compdef passguard\n")


@pytest.mark.parametrize(("words", "expected"), [
    (["passguard", "ch"], ["check"]),
    (["passguard", ""], ["run", "check", "status", "destinations", "config", "token", "init",
                         "shadow", "verify", "upgrade-check", "audit", "completion"]),
    (["passguard", "shadow", "p"], ["promote"]),
    (["passguard", "--log-level", "debug", "shadow", "l"], ["list"]),
    (["passguard", "check", "-o", "y"], ["yaml"]),
    (["passguard", "audit", "--verdict", ""], ["allow", "warn", "deny"]),
    (["passguard", "audit", "--me"], ["--mesh"]),
    (["passguard", "--log-format", "j"], ["json"]),
    (["passguard", "completion", "z"], ["zsh"]),
    (["passguard", "config", "check", "-"], ["-h", "--help", "-c", "--config"]),
])
def test_bash_completes(bash: str, words: list[str], expected: list[str],
                        capsys: pytest.CaptureFixture[str]) -> None:
    assert complete(bash, script("bash", capsys), words) == expected


def test_bash_completes_files_for_file_options(bash: str, tmp_path: Any,
                                               capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mesh-off.yaml").write_text("type: Mesh\n")
    monkeypatch.chdir(tmp_path)
    assert complete(bash, script("bash", capsys), ["passguard", "check", "-f", "me"]) == \
        ["mesh-off.yaml"]


