"""Real child processes for the end-to-end tests: ``passguard run``, Prometheus, Chromium.

Everything here is synchronous (``subprocess`` + ``urllib``) so it can be used
from any test; async tests call the waiting parts through ``asyncio.to_thread``
so the event loop (which serves the echo upstreams) keeps running.

Rules every helper follows:

* a missing tool FAILS the test (``require_binary``), it never skips: an e2e
  test that passes by doing nothing proves nothing;
* every wait is bounded and, on timeout, says what it waited for and shows
  the tail of the process's log;
* every process is stopped (SIGTERM, then SIGKILL) by ``close()``, which is
  idempotent and safe to call from a ``finally``;
* loopback HTTP never goes through a proxy from the environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")

# Loopback requests must never go to an http_proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the caller binds it soon after)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def require_binary(name: str, package: str | None = None) -> str:
    """The path of ``name``; the test FAILS (never skips) when it is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: this end-to-end test runs the real program "
                    f"(Debian: apt-get install {package or name}; `bash .ci/test` does it)")
    return path


def tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class ProcessDied(AssertionError):
    """A child process the test needs has exited."""


def wait_until(check: Callable[[], T | None], timeout: float, what: str,
               interval: float = 0.2, details: Callable[[], str] | None = None) -> T:
    """Call ``check`` until it returns something truthy; fail after ``timeout`` s.

    Exceptions from ``check`` count as "not yet" (the last one is reported),
    except ``ProcessDied``, which fails at once."""
    deadline = time.monotonic() + timeout
    last: str = "never true"
    while True:
        try:
            value = check()
        except ProcessDied:
            raise  # waiting longer cannot help
        except Exception as exc:  # reported if the wait times out
            value, last = None, f"{type(exc).__name__}: {exc}"
        if value:
            return value
        if time.monotonic() >= deadline:
            extra = f"\n{details()}" if details else ""
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what} "
                                 f"(last: {last}){extra}")
        time.sleep(interval)


def http(url: str, *, method: str = "GET", body: bytes | None = None,
         headers: Mapping[str, str] | None = None, timeout: float = 10
         ) -> tuple[int, str, str]:
    """(status, content type, body text); HTTP errors are returned, not raised."""
    req = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    try:
        with _OPENER.open(req, timeout=timeout) as r:
            return r.status, r.headers.get_content_type(), r.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers.get_content_type(), exc.read().decode()


class Child:
    """A child process writing to a log file, stopped for sure by ``close()``."""

    name = "process"

    def __init__(self, log: Path) -> None:
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self, argv: Sequence[str], env: Mapping[str, str] | None = None,
              cwd: Path | None = None) -> None:
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} already runs"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, cwd=cwd,
                                         env=dict(env) if env is not None else None)

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was never started"
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def assert_running(self) -> None:
        assert self.proc is not None, f"{self.name} was never started"
        code = self.proc.poll()
        if code is not None:
            raise ProcessDied(f"{self.name} exited with code {code}:\n{tail(self.log)}")

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None, f"{self.name} was never started"
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None, f"{self.name} was never started"
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not exit within {timeout:g}s:\n"
                                 f"{tail(self.log)}") from None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        """Send ``sig`` and return the exit code (fails if it does not exit in time)."""
        self.send_signal(sig)
        return self.wait(timeout)

    def close(self, timeout: float = 10) -> None:
        """SIGTERM, then SIGKILL: never leaves the process behind. Idempotent."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout)

    def log_tail(self, lines: int = 40) -> str:
        return f"--- {self.name} log ({self.log}) ---\n{tail(self.log, lines)}"


# --------------------------------------------------------------------------- passguard


def passguard_config(tmp: Path, targets: Sequence[Mapping[str, Any]], *,
                     interval: str = "1s", timeout: str = "800ms", window: str = "1m",
                     **extra: Any) -> dict[str, Any]:
    """A `passguard run` config on a free loopback port with static Envoy targets."""
    return {
        "listen": f"127.0.0.1:{free_port()}",
        "scrape": {"interval": interval, "timeout": timeout},
        "window": window,
        "state": {"path": str(tmp / "state.db")},
        "sources": [{"kind": "envoy", "targets": [dict(t) for t in targets]}],
        **extra,
    }


def envoy_target(url: str, mesh: str, dataplane: str, service: str = "web") -> dict[str, Any]:
    return {"url": url, "labels": {"mesh": mesh, "dataplane": dataplane, "service": service}}


class Passguard(Child):
    """``passguard run -c FILE`` as a child process (``python -m passguard``)."""

    name = "passguard"

    def __init__(self, cfg: Mapping[str, Any], tmp: Path) -> None:
        super().__init__(tmp / "passguard.log")
        self.cfg = dict(cfg)
        self.path = tmp / "passguard.yaml"
        self.write(self.cfg)
        self.address = str(cfg["listen"])
        self.url = f"http://{self.address}"

    def write(self, cfg: Mapping[str, Any]) -> None:
        self.path.write_text(yaml.safe_dump(dict(cfg)))

    def start(self, *, env: Mapping[str, str] | None = None, wait_ready: bool = True,
              timeout: float = 30) -> None:
        """Start the daemon; ``env`` replaces the environment (default: inherited).

        With ``wait_ready`` (default) returns once ``GET /-/ready`` answers 200."""
        self.spawn([sys.executable, "-m", "passguard", "run", "-c", str(self.path)],
                   env=env, cwd=REPO)
        if wait_ready:
            self.wait_ready(timeout)

    def ready(self) -> bool:
        self.assert_running()
        try:
            status, _, _ = http(self.url + "/-/ready", timeout=2)
        except OSError:
            return False
        return status == 200

    def wait_ready(self, timeout: float = 30) -> None:
        def check() -> bool:
            self.assert_running()  # a crash fails at once, not after the timeout
            return self.ready()

        wait_until(check, timeout, f"passguard {self.url}/-/ready", details=self.log_tail)

    def get(self, path: str, headers: Mapping[str, str] | None = None) -> Any:
        """GET a route that must answer 200: parsed JSON, or the text."""
        status, ctype, body = http(self.url + path, headers=headers)
        assert status == 200, f"GET {path}: {status} {body[:500]}"
        return json.loads(body) if ctype == "application/json" else body

    def post(self, path: str, body: bytes, content_type: str = "application/yaml"
             ) -> tuple[int, Any]:
        status, ctype, text = http(self.url + path, method="POST", body=body,
                                   headers={"Content-Type": content_type})
        return status, json.loads(text) if ctype == "application/json" else text


# --------------------------------------------------------------------------- Prometheus


class PromQLError(AssertionError):
    """Prometheus refused a query (bad expression, execution error)."""


class Prometheus(Child):
    """A real Prometheus server with its own TSDB in ``tmp``."""

    name = "prometheus"

    def __init__(self, tmp: Path, *, scrape_configs: Sequence[Mapping[str, Any]],
                 rule_files: Sequence[Path] = (), interval: str = "1s") -> None:
        super().__init__(tmp / "prometheus.log")
        self.dir = tmp
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = tmp / "prometheus.yml"
        self.config: dict[str, Any] = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval,
                       "scrape_timeout": interval},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [dict(c) for c in scrape_configs],
        }
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))

    def start(self, binary: str, timeout: float = 30) -> None:
        self.spawn([
            binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.dir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ], cwd=self.dir)

        def ready() -> bool:
            self.assert_running()
            status, _, _ = http(self.url + "/-/ready", timeout=2)
            return status == 200

        wait_until(ready, timeout, f"Prometheus {self.url}/-/ready", details=self.log_tail)

    def api(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        """``GET /api/v1/<path>``: the ``data`` of a successful answer, else PromQLError."""
        query = "?" + urllib.parse.urlencode(dict(params)) if params else ""
        status, _, text = http(f"{self.url}/api/v1/{path}{query}", timeout=15)
        try:
            body = json.loads(text)
        except ValueError:
            raise PromQLError(f"/api/v1/{path} answered {status}: {text[:500]}") from None
        if status != 200 or body.get("status") != "success":
            raise PromQLError(f"{body.get('errorType')}: {body.get('error')} "
                              f"(HTTP {status}, params {params})")
        if body.get("warnings"):
            raise PromQLError(f"warnings {body['warnings']} (params {params})")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query: the result vector (a scalar becomes one sample)."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("query", params)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def query_range(self, expr: str, start: float, end: float, step: float
                    ) -> list[dict[str, Any]]:
        data = self.api("query_range", {"query": expr, "start": f"{start:.3f}",
                                        "end": f"{end:.3f}", "step": f"{step:g}"})
        result: list[dict[str, Any]] = data["result"]
        return result

    def values(self, expr: str, by: str) -> dict[str, float]:
        """An instant query as ``{value of label `by`: float}``."""
        return {s["metric"].get(by, ""): float(s["value"][1]) for s in self.query(expr)}


# --------------------------------------------------------------------------- Chromium


def chromium_args(binary: str, profile: Path) -> list[str]:
    """Headless Chromium that talks to nothing but the page it is given."""
    return [
        binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-proxy-server", "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
    ]


def run_chromium(args: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    try:
        return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                              env=env, check=False, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"chromium did not finish within {timeout:g}s: {args}\n"
                             f"{exc.stderr!r}") from None
