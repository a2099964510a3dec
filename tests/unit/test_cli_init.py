"""``passguard init`` against the Kuma CP test server: from ``--kuma-url`` and
from kumactl's config in a temporary HOME; the file it writes passes
``config check``; every failure is exit 2 with one line and nothing written."""

from __future__ import annotations

import asyncio
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from passguard import cli
from tests.kuma_cp import FakeKumaCP

TOKEN = "user-token-abc"


@pytest.fixture
async def cp() -> AsyncIterator[FakeKumaCP]:
    async with FakeKumaCP(token=TOKEN) as server:
        server.add_mesh("default")
        server.add_mesh("payments")
        server.add_dataplane("default", "web-1")
        server.add_dataplane("payments", "api-1")
        server.add_dataplane("payments", "api-2", insight="disconnected")
        yield server


async def run(*argv: str) -> int:
    # main() runs its own event loop: off this one, which serves the CP.
    return await asyncio.to_thread(cli.main, list(argv))


def kumactl_config(home: Path, url: str, token: str | None = TOKEN, **extra: str) -> Path:
    # The shape of kumactl's golden files (app/kumactl/cmd/config/testdata in kumahq/kuma).
    auth = (f"      authType: tokens\n      authConf:\n        token: {token}\n"
            if token else "")
    more = "".join(f"      {k}: {v}\n" for k, v in extra.items())
    path = home / ".kumactl" / "config"
    path.parent.mkdir(parents=True)
    path.write_text(f"""contexts:
- controlPlane: local
  defaults:
    mesh: default
  name: local
- controlPlane: other
  name: other
controlPlanes:
- coordinates:
    apiServer:
      url: https://elsewhere.invalid:5682
  name: other
- coordinates:
    apiServer:
{auth}{more}      url: {url}
  name: local
currentContext: local
""")
    return path


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


async def test_init_from_kuma_url_writes_a_config_that_checks(
        cp: FakeKumaCP, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    token = tmp_path / "secrets" / "token"
    token.parent.mkdir()
    token.write_text(TOKEN + "\n")
    out = tmp_path / "etc" / "passguard.yaml"
    out.parent.mkdir()
    assert await run("init", "--kuma-url", cp.url, "--token-file", str(token),
                     "-c", str(out)) == 0
    said = capsys.readouterr().out
    assert "Kuma 2.14.3; 2 meshes (default, payments), 3 dataplanes (2 online)" in said
    text = out.read_text()
    assert "kind: kuma" in text and f'"{cp.url}"' in text and str(token) in text
    assert TOKEN not in text
    # It listed meshes and dataplanes with the token before writing.
    assert any("/dataplanes/_overview" in r.path_qs and r.authorization == f"Bearer {TOKEN}"
               for r in cp.requests)
    assert not (out.parent / "passguard-kuma-token").exists()
    assert await run("config", "check", "-c", str(out)) == 0
    assert "1 control plane(s)" in capsys.readouterr().out


async def test_init_from_kumactl_config_writes_the_token_apart(
        cp: FakeKumaCP, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    kumactl_config(home, cp.url)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    assert await run("init") == 0
    said = capsys.readouterr().out
    assert "kumactl context 'local'" in said and "3 dataplanes" in said
    cfg = tmp_path / "passguard.yaml"
    token = tmp_path / "passguard-kuma-token"
    assert TOKEN not in cfg.read_text()
    assert 'token_file: "passguard-kuma-token"' in cfg.read_text()
    assert token.read_text().strip() == TOKEN
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert await run("config", "check", "-c", str(cfg)) == 0
    # No staged file is left beside them.
    assert names(tmp_path) == ["home", "passguard-kuma-token",
                                                          "passguard.yaml"]


async def test_init_refuses_to_overwrite_without_force(
        cp: FakeKumaCP, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    kumactl_config(tmp_path, cp.url)
    out = tmp_path / "pg.yaml"
    out.write_text("mine\n")
    assert await run("init", "-c", str(out)) == 2
    assert "exists; --force overwrites it" in one_error_line(capsys.readouterr().err)
    assert out.read_text() == "mine\n"
    assert await run("init", "-c", str(out), "--force") == 0
    assert "kind: kuma" in out.read_text()


@pytest.mark.parametrize("case", ["bad-url", "unreachable", "no-token", "wrong-token"])
async def test_init_failures_are_one_line_and_write_nothing(
        cp: FakeKumaCP, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], case: str) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token\n")
    argv = {
        "bad-url": ["--kuma-url", "kuma-cp:5681"],
        "unreachable": ["--kuma-url", "http://127.0.0.1:1"],
        "no-token": ["--kuma-url", cp.url],
        "wrong-token": ["--kuma-url", cp.url, "--token-file", str(wrong)],
    }[case]
    assert await run("init", *argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("passguard: ")
    expected = {"bad-url": "must be http(s)://host", "unreachable": "cannot connect",
                "no-token": "HTTP 401", "wrong-token": f"refused the token from {wrong}"}[case]
    assert expected in line
    assert names(tmp_path) == ["wrong"]


async def test_init_names_what_is_wrong_in_kumactl_config(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert await run("init") == 2
    assert "no kumactl config at" in one_error_line(capsys.readouterr().err)
    path = kumactl_config(tmp_path, "http://127.0.0.1:1")
    path.write_text(path.read_text().replace("currentContext: local", "currentContext: gone"))
    assert await run("init") == 2
    assert "'gone' is not in contexts" in one_error_line(capsys.readouterr().err)
    path.write_text("contexts: [unclosed\n")
    assert await run("init") == 2
    assert "not kumactl's YAML config" in one_error_line(capsys.readouterr().err)


async def test_kumactl_ca_and_skip_verify_carry_over(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from passguard.cli_init import from_kumactl, render

    path = kumactl_config(tmp_path, "https://cp:5682", token=None,
                          caCertFile="/etc/kuma/ca.pem", skipVerify="true")
    c = from_kumactl(path, None, None)
    assert (c.url, c.ca_file, c.skip_verify, c.token) == ("https://cp:5682", "/etc/kuma/ca.pem",
                                                          True, None)
    text = render(c, tmp_path)
    assert 'ca_file: "/etc/kuma/ca.pem"' in text and "insecure_skip_verify: true" in text
