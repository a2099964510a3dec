"""Certificate reload (passguard/web/tls.py) with real certificates (trustme)
and real handshakes over loopback sockets.

The server below wraps each accepted connection with the reloader's context
*at accept*, as the daemon's listener does, so a swapped context serves the
next connection and a broken one fails it.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from passguard.config import TLSConfig
from passguard.errors import ConfigError
from passguard.web.tls import CertReloader, handshake, load


class Server:
    """A TLS server on 127.0.0.1 that answers ``ok`` with the context in use."""

    def __init__(self, reloader: CertReloader) -> None:
        self.reloader = reloader
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.errors: list[Exception] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.settimeout(5)
            try:
                with self.reloader.context.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (OSError, ssl.SSLError) as exc:
                self.errors.append(exc)
                conn.close()

    def get(self, ca: trustme.CA, client: trustme.LeafCert | None = None) -> bytes:
        """The certificate served (DER) after a verified handshake and answer."""
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        if client is not None:
            client.configure_cert(ctx)
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            # TLS 1.3: a refused client certificate shows at the first read.
            assert tls.recv(2) == b"ok"
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return der

    def close(self) -> None:
        self.sock.close()


class Files:
    def __init__(self, tmp: Path) -> None:
        self.cert, self.key, self.ca = tmp / "tls.crt", tmp / "tls.key", tmp / "client-ca.crt"

    def write(self, leaf: trustme.LeafCert, cert: bool = True, key: bool = True) -> None:
        if key:
            leaf.private_key_pem.write_to_path(str(self.key))
        if cert:
            leaf.cert_chain_pems[0].write_to_path(str(self.cert))

    def cfg(self, client_ca: bool = False) -> TLSConfig:
        return TLSConfig(self.cert, self.key, self.ca if client_ca else None, 1.0)


def der(leaf: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return Files(tmp_path)


@pytest.fixture
def serve() -> Iterator[list[Server]]:
    servers: list[Server] = []
    yield servers
    for s in servers:
        s.close()


def test_half_rotated_pair_keeps_the_old_certificate_serving(
        files: Files, serve: list[Server]) -> None:
    ca = trustme.CA()
    old, new = ca.issue_cert("127.0.0.1"), ca.issue_cert("127.0.0.1")
    files.write(old)
    results: list[bool] = []
    swapped: list[ssl.SSLContext] = []
    r = CertReloader(files.cfg(), swapped.append, results.append)
    server = Server(r)
    serve.append(server)
    assert server.get(ca) == der(old)
    # New certificate, old key: refused, counted, and the old pair still serves.
    files.write(new, key=False)
    assert r.check() is False
    assert (r.failures, r.reloads, results, swapped) == (1, 0, [False], [])
    assert server.get(ca) == der(old)
    assert server.get(ca) == der(old)
    # The same broken files are not retried (nor counted again) every interval.
    assert r.check() is False and r.failures == 1
    # The key arrives: the new pair is proven and swapped in.
    files.write(new, cert=False)
    assert r.check() is True
    assert (r.reloads, results, swapped) == (1, [False, True], [r.context])
    assert server.get(ca) == der(new)


def test_replaced_client_ca_is_no_longer_trusted(files: Files, serve: list[Server]) -> None:
    ca = trustme.CA()
    files.write(ca.issue_cert("127.0.0.1"))
    old_ca, new_ca = trustme.CA(), trustme.CA()
    old_ca.cert_pem.write_to_path(str(files.ca))
    r = CertReloader(files.cfg(client_ca=True))
    server = Server(r)
    serve.append(server)
    old_client, new_client = old_ca.issue_cert("ci"), new_ca.issue_cert("ci")
    server.get(ca, old_client)
    with pytest.raises(ssl.SSLError):
        server.get(ca, new_client)
    new_ca.cert_pem.write_to_path(str(files.ca))
    assert r.check() is True
    server.get(ca, new_client)
    with pytest.raises(ssl.SSLError):
        server.get(ca, old_client)
    # And a client with no certificate at all is still refused.
    with pytest.raises(ssl.SSLError):
        server.get(ca)


def test_client_ca_removed_from_a_bundle_is_no_longer_trusted(
        files: Files, serve: list[Server]) -> None:
    ca = trustme.CA()
    files.write(ca.issue_cert("127.0.0.1"))
    kept, removed = trustme.CA(), trustme.CA()
    files.ca.write_bytes(kept.cert_pem.bytes() + removed.cert_pem.bytes())
    r = CertReloader(files.cfg(client_ca=True))
    server = Server(r)
    serve.append(server)
    server.get(ca, removed.issue_cert("old-ci"))
    kept.cert_pem.write_to_path(str(files.ca))
    assert r.check() is True
    server.get(ca, kept.issue_cert("ci"))
    with pytest.raises(ssl.SSLError):
        server.get(ca, removed.issue_cert("old-ci"))


def test_unreadable_files_keep_serving_and_are_retried(files: Files, serve: list[Server]
                                                       ) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    files.write(leaf)
    r = CertReloader(files.cfg())
    server = Server(r)
    serve.append(server)
    files.key.unlink()  # a rotation between unlink and rename
    assert r.check() is False
    assert server.get(ca) == der(leaf)
    files.write(leaf, cert=False)
    assert r.check() is False and r.failures == 0  # the same files: nothing to do


@pytest.mark.parametrize(("broken", "key"), [
    ("missing key", "auth.tls.key_file"),
    ("missing cert", "auth.tls.cert_file"),
    ("mismatched key", "auth.tls.cert_file, auth.tls.key_file"),
    ("junk cert", "auth.tls.cert_file"),
    ("junk client ca", "auth.tls.client_ca_file"),
    ("empty client ca", "auth.tls.client_ca_file"),
])
def test_bad_files_are_a_config_error_naming_the_key(files: Files, broken: str, key: str
                                                     ) -> None:
    ca = trustme.CA()
    files.write(ca.issue_cert("127.0.0.1"))
    ca.cert_pem.write_to_path(str(files.ca))
    if broken == "missing key":
        files.key.unlink()
    elif broken == "missing cert":
        files.cert.unlink()
    elif broken == "mismatched key":
        files.write(ca.issue_cert("127.0.0.1"), cert=False)
    elif broken == "junk cert":
        files.cert.write_text("not a certificate\n")
    elif broken == "junk client ca":
        files.ca.write_text("hello\n")
    else:
        files.ca.write_text("")
    with pytest.raises(ConfigError) as info:
        load(files.cfg(client_ca=True))
    assert str(info.value).startswith(key + ":"), info.value
    assert "Traceback" not in str(info.value)


def test_handshake_proves_the_pair(files: Files) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    files.write(leaf)
    ca.cert_pem.write_to_path(str(files.ca))
    loaded = load(files.cfg(client_ca=True))
    assert handshake(loaded.context) == der(leaf)
    # The probe leaves client verification as it was.
    assert loaded.context.verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(ssl.SSLError):
        handshake(ssl.create_default_context(ssl.Purpose.CLIENT_AUTH))  # no certificate
