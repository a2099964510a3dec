"""Serving TLS, with the certificate re-read when its files change.

Kubernetes updates a mounted secret by swapping a symlink, and cert-manager
renews certificates while passguard runs, so the files' digest is compared on
``auth.tls.reload_interval``. A new chain is loaded into the *same* SSLContext:
connections already open keep their session, new handshakes get the new
certificate, nothing restarts. A broken pair (key not matching, half-written
file) is refused and the previous certificate keeps serving.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
from pathlib import Path

from passguard.config import TLSConfig

log = logging.getLogger(__name__)


def _digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


class CertReloader:
    def __init__(self, cfg: TLSConfig) -> None:
        self.cfg = cfg
        self._files = [cfg.cert_file, cfg.key_file] + (
            [cfg.client_ca_file] if cfg.client_ca_file else [])
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
            if cfg.client_ca_file:
                ctx.load_verify_locations(cafile=str(cfg.client_ca_file))
                ctx.verify_mode = ssl.CERT_REQUIRED
            self._digest = _digest(self._files)
        except (OSError, ssl.SSLError) as exc:
            from passguard.errors import ConfigError

            raise ConfigError([f"auth.tls: cannot load {cfg.cert_file} / {cfg.key_file}: "
                               f"{exc}"]) from None
        self.context = ctx
        self.reloads = 0

    def check(self) -> bool:
        """Reload when the files changed; True when a new certificate is in use."""
        try:
            current = _digest(self._files)
        except OSError as exc:
            log.warning("TLS files unreadable, keeping the current certificate: %s", exc)
            return False
        if current == self._digest:
            return False
        try:
            self.context.load_cert_chain(self.cfg.cert_file, self.cfg.key_file)
            if self.cfg.client_ca_file:
                self.context.load_verify_locations(cafile=str(self.cfg.client_ca_file))
        except (OSError, ssl.SSLError) as exc:
            # Often a rotation caught half-way: the next check retries.
            log.warning("new TLS files refused, keeping the current certificate: %s", exc)
            return False
        self._digest = current
        self.reloads += 1
        log.info("TLS certificate reloaded from %s", self.cfg.cert_file)
        return True

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.cfg.reload_interval)
            except TimeoutError:
                await asyncio.to_thread(self.check)
