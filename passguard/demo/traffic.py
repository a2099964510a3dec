"""Traffic for a demo sidecar: an echo upstream, and connections through the
passthrough listener that name their real destination in a PROXY v1 header
(the stand-in for Kuma's iptables redirect).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Self, overload

from passguard.demo.kuma_names import (
    IpFamily,
    family_of_address,
)
from passguard.demo.sidecar import EnvoyProcess

# Bound on waiting for a closed connection to be acknowledged.
_CLOSE_TIMEOUT = 5.0


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
