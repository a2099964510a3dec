"""What every ``passguard`` client command shares: exit codes, the one-line
error, output helpers, the HTTP client that sends the token only where it was
told, and reading documents from files or stdin."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from email.message import Message
from pathlib import Path
from typing import IO, Any, TextIO

from passguard import __version__
from passguard.envoy.excerpt import for_log
from passguard.errors import InputError, PassguardError
from passguard.loader import load_documents

EXIT_OK, EXIT_REFUSED, EXIT_ERROR = 0, 1, 2
DEFAULT_SERVER = "http://127.0.0.1:9110"


class CliError(PassguardError):
    """An error the CLI reports as one line and exit code 2."""


# -- output helpers ----------------------------------------------------------------

class Style:
    def __init__(self, stream: TextIO) -> None:
        self.on = stream.isatty() and os.environ.get("NO_COLOR") is None

    def __call__(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.on else text

    def verdict(self, v: str) -> str:
        return self(v.upper(), {"allow": "32", "warn": "33", "deny": "1;31"}.get(v, "0"))


#: ``-o`` of every command whose output is structured (DESIGN §6).
OUTPUTS = ("text", "json", "yaml")


def emit(body: Any, fmt: str, out: TextIO | None = None) -> None:
    """``body`` as ``-o json`` (indented) or ``-o yaml`` (the same document,
    keys in the server's order)."""
    out = out or sys.stdout
    if fmt == "json":
        json.dump(body, out, indent=2)
        out.write("\n")
    else:
        import yaml

        out.write(yaml.safe_dump(body, sort_keys=False, allow_unicode=True))


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    for r in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(lines)


# -- HTTP client -------------------------------------------------------------------

def _server(args: argparse.Namespace) -> str:
    return (args.server or os.environ.get("PASSGUARD_SERVER") or DEFAULT_SERVER).rstrip("/")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are errors: followed, the request (and its bearer token)
    would go to whichever host the Location names, not the one the user gave."""

    def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int,
                         msg: str, headers: Message, newurl: str) -> urllib.request.Request | None:
        fp.close()
        raise CliError(f"{req.full_url}: HTTP {code} redirects to {for_log(newurl, 200)}; "
                       "passguard does not follow redirects (the token must only go to the "
                       "server given): use that URL as --server / PASSGUARD_SERVER if you "
                       "trust it")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _opener(url: str, token: str | None) -> urllib.request.OpenerDirector:
    """The server is the only host that sees a request: no redirect is
    followed, and a token for a plain-HTTP server does not go through an
    HTTP proxy from the environment (the proxy would read it; over https a
    proxy only tunnels the encrypted stream)."""
    parts = urllib.parse.urlsplit(url)
    if token and parts.scheme == "http":
        if not _is_loopback(parts.hostname or ""):
            sys.stderr.write(f"passguard: warning: PASSGUARD_TOKEN is sent over plain HTTP to "
                             f"{parts.hostname}: anyone on the network path can read it; use "
                             "https://\n")
        return urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect)
    return urllib.request.build_opener(_NoRedirect)


def http(method: str, url: str, body: bytes | None = None,
         content_type: str = "application/json", timeout: float = 30.0) -> tuple[int, Any]:
    headers = {"Accept": "application/json", "User-Agent": f"passguard-cli/{__version__}"}
    if body is not None:
        headers["Content-Type"] = content_type
    token = (os.environ.get("PASSGUARD_TOKEN") or "").strip() or None
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if not url.startswith(("http://", "https://")):
        raise CliError(f"server URL must start with http:// or https://, got {url!r}")
    if "@" in url.split("//", 1)[1].split("/", 1)[0]:
        # Never echoed: the user information is likely a password.
        raise CliError("server URL must not carry user information (user:password@); "
                       "set PASSGUARD_TOKEN for a token")
    req = urllib.request.Request(url, data=body, method=method, headers=headers)  # noqa: S310
    try:
        with _opener(url, token).open(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CliError(f"cannot reach passguard at {url}: {reason}") from None
    try:
        data = json.loads(raw) if raw else None
    except ValueError:
        data = None
    if status >= 300:  # a 3xx here is a redirect without a Location
        detail = data.get("error") if isinstance(data, dict) else raw[:200].decode(errors="replace")
        hint = " (set PASSGUARD_TOKEN)" if status in (401, 403) else ""
        raise CliError(f"{url}: HTTP {status}: {detail}{hint}")
    if data is None:
        raise CliError(f"{url}: the answer is not JSON")
    return status, data


# -- check -------------------------------------------------------------------------

def _read_docs(paths: list[str]) -> list[Any]:
    docs: list[Any] = []
    for p in paths:
        try:
            raw = sys.stdin.buffer.read() if p == "-" else Path(p).read_bytes()
        except OSError as exc:
            raise CliError(f"cannot read {p}: {exc.strerror or exc}") from None
        try:
            docs.extend(load_documents(raw))
        except InputError as exc:
            raise CliError(f"{'stdin' if p == '-' else p}: {exc}") from None
    return docs
