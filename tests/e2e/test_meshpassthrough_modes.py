"""docs/semantics.md §4 against a real Envoy: what passes a Matched passthrough.

Envoys run the listener and cluster shapes Kuma gives a ``Matched`` policy
(``passguard.demo.sidecar``: per-entry filter chains on transport
``raw_buffer`` for ``tcp`` and ``tls`` for ``tls``, a tls_inspector, one
``meshpassthrough_<protocol>_<ip>_<port>`` ORIGINAL_DST cluster per entry).
Real plain and TLS connections go through the passthrough listener; the model
(``passguard.policy.reach``) must predict what Envoy lets through, and the
destination inventory must carry the transport Envoy showed.
"""

from __future__ import annotations

import ssl

import pytest

from passguard.demo.sidecar import EnvoyProcess
from passguard.demo.traffic import EchoUpstream, passthrough_connect
from passguard.envoy.clusters import ClustersParser
from passguard.envoy.names import DEFAULT_CLUSTERS_PATTERN, parse_route
from passguard.policy.model import Match, Version
from passguard.policy.reach import Reach, Reached

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def client_hello(sni: str = "api.example.com") -> bytes:
    """The first flight of a real TLS handshake: what Envoy's tls_inspector reads."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


async def passes(envoy: EnvoyProcess, up: EchoUpstream, payload: bytes) -> bool:
    """Does Envoy carry this connection to ``up`` (the echo comes back)?"""
    try:
        echo = await passthrough_connect(envoy.listener_host(up.family),
                                         envoy.listener_port(up.family), up.host, up.port,
                                         payload, io_timeout=3.0)
    except (ConnectionError, TimeoutError):
        return False
    return echo == payload


async def test_transport_of_an_entry_decides_as_the_model_says() -> None:
    hello = client_hello()
    async with EchoUpstream("127.0.0.1") as tls_up, EchoUpstream("127.0.0.1") as tcp_up, \
            EchoUpstream("::1") as v6_up, \
            EnvoyProcess("meshpassthrough", matches=[
                (tls_up.host, tls_up.port, "tls"), (tcp_up.host, tcp_up.port, "tcp")]) as envoy:
        entries = (Match("IP", tls_up.host, tls_up.port, "tls"),
                   Match("IP", tcp_up.host, tcp_up.port, "tcp"))
        model = Reach(entries, Version(2, 14, 3))
        seen = {}
        for up in (tls_up, tcp_up, v6_up):
            for transport, payload in (("tls", hello), ("raw", b"plain bytes")):
                real = await passes(envoy, up, payload)
                predicted = model.judge(Reached(up.host, up.port, transport))  # type: ignore[arg-type]
                seen[(up.port, transport)] = real
                assert predicted == ("kept" if real else "cut"), (up.host, up.port, transport)
        # Each entry keeps its own transport only; IPv6 has no entry: blocked.
        assert seen == {(tls_up.port, "tls"): True, (tls_up.port, "raw"): False,
                        (tcp_up.port, "tls"): False, (tcp_up.port, "raw"): True,
                        (v6_up.port, "tls"): False, (v6_up.port, "raw"): False}
        # Unknown transport (a generic cluster): neither entry proves it.
        assert model.judge(Reached(tls_up.host, tls_up.port)) == "unproven"

        # The inventory learns the transport from the cluster that carried it.
        body = await envoy.admin_get("/clusters")
        dests = {d.address: d for d in ClustersParser(DEFAULT_CLUSTERS_PATTERN).parse(body)}
        tls_dest = dests[f"127.0.0.1:{tls_up.port}"]
        assert tls_dest.family == "matched"
        [route] = tls_dest.routes
        assert parse_route(route) == ("tls", "127.0.0.1", tls_up.port)
        [route] = dests[f"127.0.0.1:{tcp_up.port}"].routes
        assert parse_route(route) == ("tcp", "127.0.0.1", tcp_up.port)
