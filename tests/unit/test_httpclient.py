"""The shared HTTP client layer: TLS contexts and their reload, credentials
read per use, bounded reads, timeouts and the wording of a server's refusal."""

from __future__ import annotations

import asyncio
import os
import re
import ssl
from pathlib import Path

import aiohttp
import pytest
import trustme
from aiohttp import web
from aiohttp.test_utils import TestServer

from passguard.httpclient import (
    ClientTLS,
    HttpProblem,
    auth_headers,
    client_ssl_context,
    error_detail,
    exchange,
    http_problem,
    read_bounded,
)


def test_client_ssl_context(tmp_path: Path) -> None:
    insecure = client_ssl_context(None, True)
    assert insecure.verify_mode == ssl.CERT_NONE and not insecure.check_hostname
    default = client_ssl_context(None, False)
    assert default.verify_mode == ssl.CERT_REQUIRED and default.check_hostname
    with pytest.raises(HttpProblem, match=re.escape(f"ca_file {tmp_path}/none.pem: no such file")):
        client_ssl_context(str(tmp_path / "none.pem"), False)
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(HttpProblem, match="not a usable PEM CA bundle"):
        client_ssl_context(str(bad), False)


def test_client_tls_is_rebuilt_when_the_ca_file_changes(tmp_path: Path) -> None:
    assert ClientTLS(None, False).context() is True  # aiohttp's default: system roots
    ca_file = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca_file))
    tls = ClientTLS(str(ca_file), False)
    first = tls.context()
    assert isinstance(first, ssl.SSLContext) and tls.context() is first
    trustme.CA().cert_pem.write_to_path(str(ca_file))
    os.utime(ca_file, (1, 1))  # a new stamp even within the clock's resolution
    assert tls.context() is not first
    ca_file.unlink()
    with pytest.raises(HttpProblem, match=re.escape(f"cannot read ca_file {ca_file}")):
        tls.context()


def test_auth_headers_are_read_at_each_call(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("one\n")
    assert auth_headers(str(token)) == {"Authorization": "Bearer one"}
    token.write_text("two")
    assert auth_headers(str(token)) == {"Authorization": "Bearer two"}
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    assert auth_headers(None, "passguard", str(pw)) == {
        "Authorization": "Basic cGFzc2d1YXJkOnMzY3JldA=="}
    assert auth_headers(None) == {}
    with pytest.raises(HttpProblem, match=r"token_file .* is empty"):
        token.write_text("")
        auth_headers(str(token))


@pytest.mark.parametrize(("body", "detail"), [
    (b'{"title": "Could not find", "detail": "mesh x"}', "Could not find: mesh x"),
    (b'{"title": "Bad Request", "details": "offset"}', "Bad Request: offset"),
    (b'{"status": "error", "errorType": "bad_data", "error": "parse"}', "bad_data: parse"),
    (b"<html>Bad Gateway</html>", "<html>Bad Gateway</html>"),
    (b"line\n\x1b[2Jforged", "line\\n\\x1b[2Jforged"),  # escaped: no forged log line
    (b'{"title": "' + b"x" * 500 + b'"}', "x" * 160 + "... (500 characters)"),
])
def test_error_detail_is_the_servers_own_words_cut_and_escaped(body: bytes, detail: str) -> None:
    assert error_detail(body) == detail


def test_http_problem_wording() -> None:
    assert http_problem("GET /meshes", 500, b'{"title": "boom"}', "the Kuma CP") == \
        "GET /meshes: HTTP 500 from the Kuma CP: boom"
    assert http_problem("GET /meshes", 401, b"", "the Kuma CP", "set token_file") == \
        "GET /meshes: HTTP 401 Unauthorized (set token_file)"
    assert http_problem("POST q", 403, b"no") == "POST q: HTTP 403 Forbidden: no"


async def _serve(handler: web.RequestHandler) -> TestServer:  # type: ignore[type-arg]
    app = web.Application()
    app.router.add_get("/x", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


async def test_bounded_read_and_timeout() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        if request.query.get("slow"):
            await asyncio.sleep(5)
        resp = web.StreamResponse()  # chunked: no length announced
        await resp.prepare(request)
        for _ in range(4):
            await resp.write(b"x" * 1000)
        await resp.write_eof()
        return resp

    server = await _serve(handler)
    url = str(server.make_url("/x"))
    try:
        async with aiohttp.ClientSession() as session:
            async with exchange(session, "GET", url, timeout=2, origin="o") as resp:
                assert len(await read_bounded(resp, 4000, "/x")) == 4000
            with pytest.raises(HttpProblem, match=r"^GET /x: the server sent more than 3999 "
                                                  r"bytes \(max_response_bytes\)$"):
                async with exchange(session, "GET", url, timeout=2, origin="o") as resp:
                    await read_bounded(resp, 3999, "GET /x: the server", "max_response_bytes")
            with pytest.raises(HttpProblem, match=r"^GET /x: no complete answer from the CP "
                                                  r"within 0.2s$"):
                async with exchange(session, "GET", url + "?slow=1", timeout=0.2, origin="o",
                                    server="the CP", what="GET /x") as resp:
                    await read_bounded(resp, 4000, "/x")
    finally:
        await server.close()
