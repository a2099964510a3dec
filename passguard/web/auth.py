"""Bearer-token authentication from a file of named SHA-256 digests.

The file never holds a token, only ``sha256(token)`` in hex, so reading it
(a ConfigMap, a backup) does not reveal a credential. It is re-read when it
changes; a broken edit keeps the previous tokens and is logged, so a typo
does not lock every pipeline out (nor let anyone in).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
from pathlib import Path

from passguard.errors import ConfigError, InputError
from passguard.loader import load_documents

log = logging.getLogger(__name__)
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@:/-]{0,127}$")


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_tokens(data: bytes, source: str) -> dict[str, str]:
    """``{digest: name}`` from a tokens file; ConfigError naming each bad entry."""
    try:
        docs = load_documents(data, "application/yaml")
    except InputError as exc:
        raise ConfigError([f"{source}: {exc}"]) from None
    errors: list[str] = []
    doc = docs[0] if len(docs) == 1 else None
    if not isinstance(doc, dict) or set(doc) != {"tokens"} or not isinstance(doc["tokens"], list):
        raise ConfigError([f"{source}: expected one document `tokens: [{{name, sha256}}, …]`"])
    out: dict[str, str] = {}
    names: set[str] = set()
    for i, item in enumerate(doc["tokens"]):
        path = f"{source}: tokens[{i}]"
        if not isinstance(item, dict) or set(item) != {"name", "sha256"}:
            errors.append(f"{path}: must be a mapping with exactly name and sha256")
            continue
        name, hexd = item["name"], item["sha256"]
        if not isinstance(name, str) or not _NAME.match(name):
            errors.append(f"{path}.name: must be a short name (letters, digits, _.@:/-)")
        elif name in names:
            errors.append(f"{path}.name: {name!r} is listed twice")
        if not isinstance(hexd, str) or not _HEX64.match(hexd.lower()):
            errors.append(f"{path}.sha256: must be 64 hex digits (passguard token hash); "
                          "never put the token itself here")
            continue
        if isinstance(name, str):
            names.add(name)
            out[hexd.lower()] = name
    if errors:
        raise ConfigError(errors)
    return out


class TokenStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._tokens: dict[str, str] = {}
        self._stamp: tuple[float, int] | None = None
        self._checked = 0.0
        self.load()

    def load(self) -> None:
        """Read the file now; ConfigError when it is unreadable or invalid."""
        try:
            st = self.path.stat()
            data = self.path.read_bytes()
        except OSError as exc:
            raise ConfigError([f"auth.tokens_file: cannot read {self.path}: "
                               f"{exc.strerror or exc}"]) from None
        self._tokens = parse_tokens(data, str(self.path))
        self._stamp = (st.st_mtime, st.st_size)
        if not self._tokens:
            log.warning("%s lists no tokens: every authenticated route will answer 401",
                        self.path)

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < 1.0:
            return
        self._checked = now
        try:
            st = self.path.stat()
        except OSError as exc:
            log.error("tokens file %s unreadable, keeping the previous tokens: %s", self.path, exc)
            return
        if (st.st_mtime, st.st_size) == self._stamp:
            return
        try:
            self.load()
            log.info("tokens file %s reloaded: %d tokens", self.path, len(self._tokens))
        except ConfigError as exc:
            self._stamp = (st.st_mtime, st.st_size)
            log.error("tokens file %s is invalid, keeping the previous tokens: %s", self.path, exc)

    def name_for(self, token: str) -> str | None:
        """The token's name, or None. Compared in constant time."""
        self._refresh()
        d = digest(token)
        for known, name in self._tokens.items():
            if hmac.compare_digest(known, d):
                return name
        return None
