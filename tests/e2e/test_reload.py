"""Safe reloads (issue 13, findings 4 and 5), against a real daemon serving on
127.0.0.1 with real TLS (trustme certificates) and real handshakes.

A reload cannot move the socket nor switch TLS on or off, so a file that
asks for that is refused (the old config keeps running); the auth rule is
checked against the socket actually bound; and new certificate files serve
only once a handshake proved them.
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
import yaml

from passguard import config as config_mod
from passguard.app import Daemon

TOKEN = "reload-test-token"


class Env:
    def __init__(self, daemon: Daemon, raw: dict[str, Any], tmp: Path,
                 ca: trustme.CA | None) -> None:
        self.daemon, self.raw, self.tmp, self.ca = daemon, raw, tmp, ca
        scheme = "https" if ca is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{daemon.config.listen.port}"

    def write(self, **changes: Any) -> None:
        (self.tmp / "passguard.yaml").write_text(yaml.safe_dump({**self.raw, **changes}))

    def client_ssl(self, ca: trustme.CA | None = None,
                   client: trustme.LeafCert | None = None) -> ssl.SSLContext | bool:
        if self.ca is None:
            return False
        ctx = ssl.create_default_context()
        (ca or self.ca).configure_trust(ctx)
        if client is not None:
            client.configure_cert(ctx)
        return ctx

    async def status(self, path: str, token: str | None = None,
                     ssl_ctx: ssl.SSLContext | bool | None = None) -> int:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        ctx = self.client_ssl() if ssl_ctx is None else ssl_ctx
        async with aiohttp.ClientSession() as s, s.get(self.url + path, headers=headers,
                                                       ssl=ctx) as r:
            return r.status

    def metric(self, outcome: str, name: str = "passguard_config_reloads_total") -> float:
        value = self.daemon.metrics.registry.get_sample_value(name, {"outcome": outcome})
        return float(value or 0.0)


EnvFactory = Callable[..., Awaitable[Env]]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def make_env(tmp_path: Path) -> AsyncIterator[EnvFactory]:
    daemons: list[Daemon] = []

    async def make(tls: bool = False, client_ca: bool = False) -> Env:
        digest = hashlib.sha256(TOKEN.encode()).hexdigest()
        (tmp_path / "tokens.yaml").write_text(
            f"tokens:\n  - {{name: ci-deploy, sha256: {digest}}}\n")
        auth: dict[str, Any] = {"tokens_file": "tokens.yaml"}
        ca = None
        if tls:
            ca = trustme.CA()
            leaf = ca.issue_cert("127.0.0.1")
            leaf.private_key_pem.write_to_path(str(tmp_path / "tls.key"))
            leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "tls.crt"))
            auth["tls"] = {"cert_file": "tls.crt", "key_file": "tls.key",
                           # Long: the tests drive checks themselves.
                           "reload_interval": "1h"}
            if client_ca:
                ca.cert_pem.write_to_path(str(tmp_path / "client-ca.crt"))
                auth["tls"]["client_ca_file"] = "client-ca.crt"
        raw: dict[str, Any] = {"listen": f"127.0.0.1:{_free_port()}",
                               "state": {"path": "state.db"}, "window": "30s", "auth": auth}
        path = tmp_path / "passguard.yaml"
        path.write_text(yaml.safe_dump(raw))
        d = Daemon(config_mod.load(path), path)
        daemons.append(d)
        await d.start(schedule=False)
        return Env(d, raw, tmp_path, ca)

    yield make
    for d in daemons:
        await d.stop()


async def test_reload_cannot_move_the_socket_or_drop_its_auth(make_env: EnvFactory) -> None:
    """Finding 4: the file moves `listen` to another loopback address and drops
    the tokens. The socket cannot move, so accepting it left the running socket
    without authentication; it is refused, and the tokens keep guarding it."""
    env = await make_env()
    assert await env.status("/v1/audit") == 401
    env.write(listen=f"127.0.0.2:{env.daemon.config.listen.port}", auth={})
    error = await env.daemon.reload()
    assert error is not None and "listen: changed from 127.0.0.1" in error
    assert "restart passguard to apply it" in error
    assert env.metric("failure") == 1 and env.metric("success") == 0
    assert env.daemon.tokens is not None
    assert await env.status("/v1/audit") == 401
    assert await env.status("/v1/audit", TOKEN) == 200
    # state.path is opened at start: refused the same way, naming the key.
    env.write(state={"path": "elsewhere.db"})
    error = await env.daemon.reload()
    assert error is not None and error.startswith("state.path: changed from")
    assert env.metric("failure") == 2
    # The same file as at start is accepted.
    env.write()
    assert await env.daemon.reload() is None and env.metric("success") == 1


async def test_auth_rule_is_checked_against_the_bound_socket(
        make_env: EnvFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 4: the rule is about who can reach the socket, so it is checked
    against the addresses actually bound, not the file's. (The tests bind
    127.0.0.1 only, so a wildcard bind is reported by standing in for bound().)"""
    env = await make_env()
    port = env.daemon.config.listen.port
    assert env.daemon.bound() == [("127.0.0.1", port)]
    env.write(auth={})  # same listen as the file, tokens dropped: fine on loopback
    assert await env.daemon.reload() is None
    assert await env.status("/v1/audit") == 200
    env.write()
    assert await env.daemon.reload() is None and env.daemon.tokens is not None
    monkeypatch.setattr(env.daemon, "bound", lambda: [("0.0.0.0", port)])
    env.write(auth={})
    error = await env.daemon.reload()
    assert error == (f"auth: the running socket 0.0.0.0:{port} is not a loopback "
                     "address and no authentication is configured (auth.tokens_file or "
                     "auth.tls.client_ca_file); bind 127.0.0.1, or set auth.insecure: true to "
                     "expose the gate without authentication on purpose")
    assert await env.status("/v1/audit") == 401
    env.write(auth={"insecure": True})
    assert await env.daemon.reload() is None


async def test_tls_on_or_off_needs_a_restart(make_env: EnvFactory) -> None:
    """Finding 4: adding auth.tls (with missing files, even) was accepted and
    applied no TLS; removing it is refused the same way."""
    env = await make_env()
    env.write(auth={**env.raw["auth"], "tls": {"cert_file": "missing.crt",
                                               "key_file": "missing.key"}})
    error = await env.daemon.reload()
    assert error is not None and error.startswith("auth.tls: turning TLS on")
    assert env.daemon.tls is None and env.metric("failure") == 1
    tls_env = await make_env(tls=True)
    tls_env.write(auth={"tokens_file": "tokens.yaml"})
    error = await tls_env.daemon.reload()
    assert error is not None and error.startswith("auth.tls: turning TLS off")
    assert await tls_env.status("/-/healthy") == 200


async def test_reload_with_new_tls_files(make_env: EnvFactory) -> None:
    """New certificate settings are proven before the reload is accepted: a
    missing file is refused naming its key, and the old certificate serves."""
    env = await make_env(tls=True)
    tls = env.raw["auth"]["tls"]
    env.write(auth={**env.raw["auth"], "tls": {**tls, "cert_file": "missing.crt"}})
    error = await env.daemon.reload()
    assert error is not None and error.startswith("auth.tls.cert_file: cannot read")
    assert await env.status("/-/healthy") == 200
    # A valid new pair under new names is swapped in by the reload.
    assert env.ca is not None
    other = trustme.CA()
    leaf = other.issue_cert("127.0.0.1")
    leaf.private_key_pem.write_to_path(str(env.tmp / "new.key"))
    leaf.cert_chain_pems[0].write_to_path(str(env.tmp / "new.crt"))
    env.write(auth={**env.raw["auth"], "tls": {**tls, "cert_file": "new.crt",
                                               "key_file": "new.key"}})
    assert await env.daemon.reload() is None
    assert await env.status("/-/healthy", ssl_ctx=env.client_ssl(other)) == 200
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await env.status("/-/healthy")
    # Requiring client certificates takes effect on a reload too.
    other.cert_pem.write_to_path(str(env.tmp / "client-ca.crt"))
    env.write(auth={**env.raw["auth"], "tls": {**tls, "cert_file": "new.crt",
                                               "key_file": "new.key",
                                               "client_ca_file": "client-ca.crt"}})
    assert await env.daemon.reload() is None
    client = other.issue_cert("kube-apiserver")
    assert await env.status("/-/healthy", ssl_ctx=env.client_ssl(other, client)) == 200
    with pytest.raises(aiohttp.ClientError):
        await env.status("/-/healthy", ssl_ctx=env.client_ssl(other))


async def test_half_rotated_pair_keeps_serving(make_env: EnvFactory) -> None:
    """Finding 5: new certificate with the old key. Loaded into the live
    context it left the daemon unable to complete any handshake."""
    env = await make_env(tls=True)
    assert env.ca is not None and env.daemon.tls is not None
    env.ca.issue_cert("127.0.0.1").cert_chain_pems[0].write_to_path(str(env.tmp / "tls.crt"))
    env.daemon.tls.check()
    for _ in range(3):
        assert await env.status("/-/healthy") == 200
    assert env.metric("failure", "passguard_tls_certificate_reloads_total") == 1
    # A reload reads the files too, and does not fail the config for them.
    assert await env.daemon.reload() is None
    assert await env.status("/-/healthy") == 200


async def test_replaced_client_ca_is_no_longer_trusted(make_env: EnvFactory) -> None:
    """Finding 5: load_verify_locations added the new CA to the live trust
    store, so clients of the replaced CA were still let in."""
    env = await make_env(tls=True, client_ca=True)
    assert env.ca is not None and env.daemon.tls is not None
    old_client = env.ca.issue_cert("old-client")
    assert await env.status("/-/healthy", ssl_ctx=env.client_ssl(client=old_client)) == 200
    new_ca = trustme.CA()
    new_ca.cert_pem.write_to_path(str(env.tmp / "client-ca.crt"))
    env.daemon.tls.check()
    new_client = new_ca.issue_cert("new-client")
    assert await env.status("/-/healthy", ssl_ctx=env.client_ssl(client=new_client)) == 200
    with pytest.raises(aiohttp.ClientError):
        await env.status("/-/healthy", ssl_ctx=env.client_ssl(client=old_client))
    assert env.metric("success", "passguard_tls_certificate_reloads_total") == 1
