"""Serving TLS, with the certificate re-read when its files change.

Kubernetes updates a mounted secret by swapping a symlink, and cert-manager
renews certificates while passguard runs, so the files' digest is compared on
``auth.tls.reload_interval`` (and at each config reload).

Each change builds a *new* SSLContext from the files, proves it with a real
TLS handshake in memory, and only then swaps it in (``on_swap`` hands it to
the listener). Loading into the live context, as passguard once did, was
unsafe twice over: ``load_cert_chain`` installs the certificate before it
checks the key, so a half-rotated pair (new certificate, old key) left the
live context with no usable key until a valid pair appeared; and
``load_verify_locations`` only *adds* to the trust store, so a replaced or
removed client CA stayed trusted. Connections already open keep the context
they were accepted with; new handshakes get the new one. A pair that fails
is logged and counted, and the previous context keeps serving.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from passguard.config import TLSConfig
from passguard.errors import ConfigError

log = logging.getLogger(__name__)

#: Rounds of the in-memory handshake; TLS 1.2 and 1.3 need two or three.
_HANDSHAKE_ROUNDS = 10


@dataclass(frozen=True)
class Loaded:
    """A context built from the files whose contents hash to ``digest``,
    already proven by a handshake."""

    cfg: TLSConfig
    context: ssl.SSLContext
    digest: str


def _files(cfg: TLSConfig) -> list[tuple[str, Path]]:
    return [("auth.tls.cert_file", cfg.cert_file), ("auth.tls.key_file", cfg.key_file)] + (
        [("auth.tls.client_ca_file", cfg.client_ca_file)] if cfg.client_ca_file else [])


def _read(cfg: TLSConfig) -> tuple[str, bytes]:
    """The digest of every file and the certificate file's bytes; a
    ConfigError naming the key of a file that cannot be read."""
    h = hashlib.sha256()
    cert = b""
    for key, path in _files(cfg):
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError([f"{key}: cannot read {path}: {exc.strerror or exc}"]) from None
        if path == cfg.cert_file:
            cert = data
        h.update(data)
        h.update(b"\0")
    return h.hexdigest(), cert


def _leaf_der(cert_pem: bytes, cfg: TLSConfig) -> bytes:
    """The first certificate of the chain file: what a client must be served."""
    text = cert_pem.decode("ascii", "replace")
    begin = text.find("-----BEGIN CERTIFICATE-----")
    end = text.find("-----END CERTIFICATE-----", begin)
    if begin < 0 or end < 0:
        raise ConfigError([f"auth.tls.cert_file: {cfg.cert_file} holds no PEM certificate"])
    try:
        return ssl.PEM_cert_to_DER_cert(text[begin:end + len("-----END CERTIFICATE-----")])
    except ValueError as exc:
        raise ConfigError([f"auth.tls.cert_file: {cfg.cert_file}: {exc}"]) from None


def _context(cfg: TLSConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError([f"auth.tls.cert_file, auth.tls.key_file: cannot use "
                           f"{cfg.cert_file} with {cfg.key_file}: {exc}"]) from None
    if cfg.client_ca_file:
        try:
            ctx.load_verify_locations(cafile=str(cfg.client_ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError([f"auth.tls.client_ca_file: cannot use {cfg.client_ca_file}: "
                               f"{exc}"]) from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def handshake(server: ssl.SSLContext) -> bytes:
    """A real TLS handshake against ``server``, in memory: the certificate a
    client is served (DER). Raises ssl.SSLError when it fails.

    The probing client presents no certificate, so client verification is
    off for the probe: ``server`` is new and not yet shared, so this changes
    no live connection, and its mode is restored before it is published.
    """
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE  # the probe checks the key, not the issuer
    mode = server.verify_mode
    server.verify_mode = ssl.CERT_NONE
    try:
        c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
        c = client.wrap_bio(c_in, c_out, server_side=False)
        s = server.wrap_bio(s_in, s_out, server_side=True)
        c_done = s_done = False
        for _ in range(_HANDSHAKE_ROUNDS):
            if not c_done:
                try:
                    c.do_handshake()
                    c_done = True
                except ssl.SSLWantReadError:
                    pass
            s_in.write(c_out.read())
            if not s_done:
                try:
                    s.do_handshake()
                    s_done = True
                except ssl.SSLWantReadError:
                    pass
            c_in.write(s_out.read())
            if c_done and s_done:
                break
        else:
            raise ssl.SSLError("the TLS handshake did not complete")
        served = c.getpeercert(binary_form=True)
        if not served:
            raise ssl.SSLError("the server presented no certificate")
        return served
    finally:
        server.verify_mode = mode


def load(cfg: TLSConfig) -> Loaded:
    """Build and prove a new context from ``cfg``'s files; ConfigError naming
    the key when they cannot serve. Blocking (file reads, a handshake)."""
    # Digest first: if the files change while they are loaded, the digest is
    # the older one and the next check loads them again (never the reverse).
    digest, cert_pem = _read(cfg)
    leaf = _leaf_der(cert_pem, cfg)
    ctx = _context(cfg)
    try:
        served = handshake(ctx)
    except ssl.SSLError as exc:
        raise ConfigError([f"auth.tls: a test handshake with {cfg.cert_file} and "
                           f"{cfg.key_file} failed: {exc}"]) from None
    if served != leaf:
        # The files changed between reading and loading: try again later.
        raise ConfigError([f"auth.tls.cert_file: {cfg.cert_file} changed while it was "
                           "loaded"])
    return Loaded(cfg, ctx, digest)


class CertReloader:
    """The serving context, replaced whole when the files change.

    ``reloads`` and ``failures`` count swaps and refused changes;
    ``on_swap`` is told each new context (the listener uses it for new
    connections) and ``on_result`` each outcome (the metrics)."""

    def __init__(self, cfg: TLSConfig,
                 on_swap: Callable[[ssl.SSLContext], None] | None = None,
                 on_result: Callable[[bool], None] | None = None) -> None:
        loaded = load(cfg)
        self.cfg = cfg
        self.context = loaded.context
        self._digest = loaded.digest
        # The digest of files that were refused: not retried (nor logged
        # again) every interval until they change.
        self._refused: str | None = None
        self.on_swap = on_swap
        self.on_result = on_result
        self.reloads = 0
        self.failures = 0

    def use(self, loaded: Loaded) -> bool:
        """Serve ``loaded`` from now on (a config reload already proved it).
        True when something changed."""
        if loaded.cfg == self.cfg and loaded.digest == self._digest:
            return False
        self._swap(loaded)
        return True

    def _swap(self, loaded: Loaded) -> None:
        self.cfg = loaded.cfg
        self.context = loaded.context
        self._digest = loaded.digest
        self._refused = None
        self.reloads += 1
        if self.on_swap is not None:
            self.on_swap(loaded.context)
        if self.on_result is not None:
            self.on_result(True)
        log.info("TLS certificate reloaded from %s", self.cfg.cert_file)

    def _fail(self, reason: str) -> None:
        self.failures += 1
        if self.on_result is not None:
            self.on_result(False)
        log.error("new TLS files refused, the previous certificate keeps serving: %s", reason)

    def poll(self) -> Loaded | ConfigError | None:
        """What the files hold now: None when unchanged (or unreadable), a new
        proven context, or why the new files cannot serve. Blocking (file
        reads, a handshake): the timer runs it in a thread."""
        cfg = self.cfg
        try:
            current, _ = _read(cfg)
        except ConfigError as exc:
            # Mid-rotation (a symlink swap) or gone: retried next interval.
            log.warning("TLS files unreadable, keeping the current certificate: %s", exc)
            return None
        if current in (self._digest, self._refused):
            return None
        try:
            return load(cfg)
        except ConfigError as exc:
            # Often a rotation caught half-way: retried once the files change.
            self._refused = current
            return exc

    def settle(self, result: Loaded | ConfigError | None) -> bool:
        """Act on a poll() in the event loop's thread: swap, or log and count.
        True when a new context is in use."""
        if result is None:
            return False
        if isinstance(result, ConfigError):
            self._fail(str(result))
            return False
        if result.cfg != self.cfg:
            return False  # a config reload changed the files meanwhile: stale
        return self.use(result)

    def check(self) -> bool:
        """poll() and settle() in one; blocking."""
        return self.settle(self.poll())


