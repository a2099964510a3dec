"""The CLI's HTTP client and its bearer token (issue 13, finding 9).

Real HTTP servers on 127.0.0.1 (threads): one that redirects, one that
records what reached it, one that acts as an HTTP proxy from the environment.
The token must reach the server it was given and no other.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from passguard import cli, cli_common

TOKEN = "tok-finding-9"
MESHES = {"window_seconds": 900, "meshes": []}


class Recorder:
    """An HTTP server on 127.0.0.1 that records each request's path and
    Authorization header and answers with ``answer(path)``."""

    def __init__(self, answer: Callable[[str], tuple[int, dict[str, str], bytes]]) -> None:
        self.seen: list[tuple[str, str | None]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                outer.seen.append((self.path, self.headers.get("Authorization")))
                status, headers, body = answer(self.path)
                self.send_response(status)
                for k, v in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _any  # http.server dispatches on these names

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def servers() -> Iterator[Callable[..., Recorder]]:
    made: list[Recorder] = []

    def make(answer: Callable[[str], tuple[int, dict[str, str], bytes]]) -> Recorder:
        made.append(Recorder(answer))
        return made[-1]

    yield make
    for r in made:
        r.close()


def ok(path: str) -> tuple[int, dict[str, str], bytes]:
    return 200, {"Content-Type": "application/json"}, json.dumps(MESHES).encode()


@pytest.fixture(autouse=True)
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PASSGUARD_SERVER", "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY",
                 "no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PASSGUARD_TOKEN", TOKEN)


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_a_redirect_is_an_error_and_the_token_stays(
    code: int, servers: Callable[..., Recorder], capsys: pytest.CaptureFixture[str],
) -> None:
    elsewhere = servers(ok)
    gate = servers(lambda path: (code, {"Location": elsewhere.url + path}, b""))
    assert cli.main(["status", "--server", gate.url]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert f"HTTP {code} redirects to {elsewhere.url}/v1/meshes" in err, err
    assert "does not follow redirects" in err and "Traceback" not in err
    assert gate.seen == [("/v1/meshes", f"Bearer {TOKEN}")]
    assert elsewhere.seen == []  # the token never went there


def test_check_is_not_redirected_either(servers: Callable[..., Recorder], tmp_path: Any,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    elsewhere = servers(ok)
    gate = servers(lambda path: (307, {"Location": elsewhere.url + path}, b""))
    doc = tmp_path / "mesh.yaml"
    doc.write_text("type: Mesh\nname: default\n")
    assert cli.main(["check", "-f", str(doc), "--server", gate.url]) == cli.EXIT_ERROR
    assert "HTTP 307 redirects to" in capsys.readouterr().err
    assert elsewhere.seen == []


def test_a_token_over_plain_http_skips_the_environment_proxy(
    servers: Callable[..., Recorder], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An HTTP proxy would read a token sent over plain HTTP: the request goes
    straight to the server. Without a token the proxy is used as before."""
    gate = servers(ok)
    proxy = servers(ok)
    monkeypatch.setenv("http_proxy", proxy.url)
    assert cli.main(["status", "--server", gate.url, "-o", "json"]) == cli.EXIT_OK
    assert gate.seen == [("/v1/meshes", f"Bearer {TOKEN}")] and proxy.seen == []
    assert "warning" not in capsys.readouterr().err  # loopback: no warning
    monkeypatch.delenv("PASSGUARD_TOKEN")
    assert cli.main(["status", "--server", gate.url, "-o", "json"]) == cli.EXIT_OK
    assert proxy.seen == [(f"{gate.url}/v1/meshes", None)]


@pytest.mark.parametrize(("url", "warned"), [
    ("http://10.1.2.3:9110/v1/meshes", True),
    ("http://passguard.example:9110/v1/meshes", True),
    ("https://passguard.example:9110/v1/meshes", False),
    ("http://127.0.0.1:9110/v1/meshes", False),
    ("http://localhost:9110/v1/meshes", False),
    ("http://[::1]:9110/v1/meshes", False),
])
def test_warning_for_a_token_over_plain_http(url: str, warned: bool,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    cli_common._opener(url, TOKEN)
    err = capsys.readouterr().err
    assert ("warning: PASSGUARD_TOKEN is sent over plain HTTP" in err) is warned, err
    cli_common._opener(url, None)
    assert capsys.readouterr().err == ""  # no token, nothing to warn about


def test_server_url_with_user_information(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["status", "--server", "http://u:hunter2@127.0.0.1:1"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "must not carry user information" in err and "hunter2" not in err
