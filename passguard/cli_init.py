"""``passguard init``: a working config for a Kuma control plane, checked before it is written.

The control plane comes from ``--kuma-url`` (with ``--token-file`` and
``--ca-file``), or else from kumactl's current one in ``~/.kumactl/config``.
The config is written only after passguard's own kuma source
(``KumaSource.discover()``, the daemon's code) has listed the CP's meshes and
dataplanes with it; an existing file is kept unless ``--force``. A token taken
from kumactl's config goes to a 0600 file beside the config, which names the
file: a config is read by many, a token by passguard alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from passguard import config as config_mod
from passguard.cli_common import EXIT_OK, CliError
from passguard.errors import InputError
from passguard.loader import load_documents
from passguard.sources.kuma import KumaSource
from passguard.sources.settings import KumaSourceConfig

# kumactl's auth plugin for user tokens: authType "tokens", the token in
# authConf["token"] (pkg/plugins/authn/api-server/tokens/cli/plugin.go).
KUMACTL_TOKEN_AUTH = "tokens"  # noqa: S105 - a plugin name, not a secret
KUMACTL_TOKEN_KEY = "token"  # noqa: S105 - a key name
# A CP that does not answer within this is reported, not waited on.
CHECK_TIMEOUT = 10.0


@dataclass(frozen=True)
class Coordinates:
    """Where the CP is and how to talk to it; ``token`` only when it must be written."""

    url: str
    origin: str  # what the user is told: "--kuma-url", 'kumactl context "x"'
    token_file: str | None = None
    token: str | None = None
    ca_file: str | None = None
    skip_verify: bool = False
    notes: tuple[str, ...] = ()


def register(sub: Any) -> None:
    p = sub.add_parser("init", help="write a config for a Kuma control plane, checked against it",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kuma-url", help="the Kuma API, e.g. https://kuma-cp:5682 "
                   "(default: kumactl's current control plane, ~/.kumactl/config)")
    p.add_argument("--token-file", help="a file holding the CP user token")
    p.add_argument("--ca-file", help="the CA that signed the CP's certificate (PEM)")
    p.add_argument("-c", "--config", default="passguard.yaml",
                   help="the config file to write (default: passguard.yaml)")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.set_defaults(func=cmd_init)


def cmd_init(args: argparse.Namespace) -> int:
    out = Path(args.config).absolute()
    token_out = out.with_name(f"{out.stem}-kuma-token")
    coords = (from_flags(args.kuma_url, args.token_file, args.ca_file) if args.kuma_url
              else from_kumactl(kumactl_config_path(), args.token_file, args.ca_file))
    url_problem(coords.url)
    if coords.token is not None:
        coords = replace(coords, token_file=str(token_out))
    if not args.force:
        for path in (out, token_out if coords.token is not None else None):
            if path is not None and path.exists():
                raise CliError(f"{path} exists; --force overwrites it")
    if not out.parent.is_dir():
        raise CliError(f"{out.parent}: no such folder")
    for note in coords.notes:
        sys.stderr.write(f"passguard: note: {note}\n")

    text = render(coords, out.parent)
    with _staged(out.parent) as stage:
        staged_cfg = stage(out, text, 0o644)
        staged_token = stage(token_out, coords.token + "\n", 0o600) if coords.token else None
        # The file about to be written, loaded as the daemon will load it.
        cfg = config_mod.load(str(staged_cfg))
        kuma = next(s for s in cfg.sources if isinstance(s, KumaSourceConfig))
        if staged_token is not None:
            kuma = replace(kuma, token_file=str(staged_token))
        summary = asyncio.run(check_cp(kuma, coords, {str(staged_token): str(token_out)}
                                       if staged_token is not None else {}))
        if staged_token is not None:
            os.replace(staged_token, token_out)
        os.replace(staged_cfg, out)
    sys.stdout.write(f"control plane {coords.url} ({coords.origin}): {summary}\n")
    sys.stdout.write(f"wrote {_shown(out)}"
                     + (f" and {_shown(token_out)} (the token, mode 0600)" if coords.token else "")
                     + "\n")
    cfg_arg = _shown(out)
    sys.stdout.write(f"next:\n  passguard check -c {cfg_arg} -f mesh.yaml   # one-shot: read "
                     f"every dataplane once, judge a change\n  passguard run -c {cfg_arg}"
                     "                  # the daemon (docs/systemd.md)\n")
    return EXIT_OK


# -- where the CP is ------------------------------------------------------------------

def from_flags(url: str, token_file: str | None, ca_file: str | None) -> Coordinates:
    return Coordinates(url.rstrip("/"), "--kuma-url", token_file=_abs(token_file),
                       ca_file=_abs(ca_file))


def kumactl_config_path() -> Path:
    # kumactl's default, $HOME/.kumactl/config (app/kumactl/pkg/config/io.go).
    return Path(os.environ.get("HOME") or Path.home()) / ".kumactl" / "config"


def from_kumactl(path: Path, token_file: str | None, ca_file: str | None) -> Coordinates:
    """kumactl's current control plane. The file's shape is kumactl's
    ``Configuration`` message (pkg/config/app/kumactl/v1alpha1/config.proto in
    kumahq/kuma), written as YAML with protojson's camelCase names, which
    protojson also reads in their proto spelling: ``contexts[].controlPlane``,
    ``currentContext``, ``controlPlanes[].coordinates.apiServer`` with ``url``,
    ``caCertFile``, ``skipVerify``, ``headers``, ``authType``, ``authConf``."""
    where = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CliError(f"no --kuma-url, and no kumactl config at {where} (kumactl config "
                       "control-planes add writes it)") from None
    except OSError as exc:
        raise CliError(f"cannot read {where}: {exc.strerror or exc}") from None
    try:
        docs = load_documents(raw, "application/yaml")
    except InputError as exc:
        raise CliError(f"{where}: not kumactl's YAML config: {exc}") from None
    doc = docs[0] if len(docs) == 1 else None
    if not isinstance(doc, dict):
        raise CliError(f"{where}: not kumactl's config (one YAML mapping expected)")
    current = _get(doc, "currentContext", "current_context")
    if not isinstance(current, str) or not current:
        raise CliError(f"{where}: no current context (kumactl config use-context NAME)")
    context = next((c for c in _list(doc, "contexts") if c.get("name") == current), None)
    if context is None:
        raise CliError(f"{where}: the current context {current!r} is not in contexts")
    cp_name = _get(context, "controlPlane", "control_plane")
    cp = next((c for c in _list(doc, "controlPlanes", "control_planes")
               if c.get("name") == cp_name), None)
    if cp is None:
        raise CliError(f"{where}: context {current!r} names control plane {cp_name!r}, "
                       "which is not in controlPlanes")
    coordinates = cp.get("coordinates")
    api = _get(coordinates, "apiServer", "api_server") if isinstance(coordinates, dict) else None
    if not isinstance(api, dict) or not isinstance(api.get("url"), str) or not api["url"]:
        raise CliError(f"{where}: control plane {cp_name!r} has no coordinates.apiServer.url")
    home = os.environ.get("HOME")
    shown = ("~/" + str(path.relative_to(home)) if home and path.is_relative_to(home)
             else where)
    origin = f"kumactl context {current!r}, {shown}"
    notes = []
    token = None
    auth_type = _get(api, "authType", "auth_type") or ""
    if auth_type == KUMACTL_TOKEN_AUTH and token_file is None:
        conf = _get(api, "authConf", "auth_conf")
        token = conf.get(KUMACTL_TOKEN_KEY) if isinstance(conf, dict) else None
        if not isinstance(token, str) or not token.strip():
            raise CliError(f"{where}: control plane {cp_name!r} has authType tokens but no "
                           "authConf.token")
        token = token.strip()
    elif auth_type not in ("", KUMACTL_TOKEN_AUTH):
        raise CliError(f"{where}: control plane {cp_name!r} uses authType {auth_type!r}; "
                       "passguard sends a user token: pass --kuma-url and --token-file")
    if _get(api, "clientCertFile", "client_cert_file"):
        notes.append(f"kumactl's client certificate for {cp_name!r} is not used: passguard "
                     "authenticates with a token")
    if _list(api, "headers"):
        notes.append(f"kumactl's extra headers for {cp_name!r} are not sent")
    kumactl_ca = _get(api, "caCertFile", "ca_cert_file")
    skip = _get(api, "skipVerify", "skip_verify") is True and ca_file is None
    return Coordinates(api["url"].rstrip("/"), origin, token_file=_abs(token_file), token=token,
                       ca_file=_abs(ca_file) or _abs(kumactl_ca if isinstance(kumactl_ca, str)
                                                     and kumactl_ca else None),
                       skip_verify=skip, notes=tuple(notes))


def _get(doc: Any, camel: str, snake: str) -> Any:
    return doc.get(camel, doc.get(snake)) if isinstance(doc, dict) else None


def _list(doc: dict[str, Any], camel: str, snake: str | None = None) -> list[dict[str, Any]]:
    items = _get(doc, camel, snake or camel)
    return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []


def _abs(path: str | None) -> str | None:
    """The config resolves relative paths against its own folder, the user meant the
    current one: written absolute."""
    return str(Path(path).expanduser().absolute()) if path else None


def url_problem(url: str) -> None:
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise CliError(f"kuma URL {url!r}: not a URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not host:
        raise CliError(f"kuma URL {url!r}: must be http(s)://host[:port][/prefix] (the Kuma "
                       "API, e.g. https://kuma-control-plane:5682)")
    if "@" in parts.netloc:
        raise CliError("kuma URL: must not carry user:password@ (URLs are shown in /metrics "
                       "and logs); pass --token-file")
    if parts.query or parts.fragment:
        raise CliError(f"kuma URL {url!r}: no query or fragment, the API base only")


# -- the config ---------------------------------------------------------------------

def render(c: Coordinates, folder: Path) -> str:
    """The config text: what ``init`` decided, and pointers to what it left at defaults."""

    def q(value: str) -> str:
        return json.dumps(value)  # a JSON string is a YAML scalar, quoted safely

    def rel(path: str) -> str:
        p = Path(path)
        return p.name if p.parent == folder else path

    lines = [
        f"# Written by `passguard init` from {c.origin}.",
        "# Every key and its default: config/passguard.example.yaml.",
        "# Validate: passguard config check -c THIS_FILE",
        "listen: 127.0.0.1:9110",
        "state:",
        "  path: ./passguard-state.db",
        "sources:",
        "  - kind: kuma",
        f"    url: {q(c.url)}",
    ]
    if c.token_file:
        lines.append(f"    token_file: {q(rel(c.token_file))}   # re-read every pass")
    if c.ca_file:
        lines.append(f"    ca_file: {q(c.ca_file)}")
    if c.skip_verify:
        lines.append("    insecure_skip_verify: true   # as kumactl's skipVerify")
    lines += [
        '    meshes: ["*"]',
        "    stats: inspect   # through the CP's inspect API, with the token",
        "gate:",
        "  mode: enforce",
        "",
    ]
    return "\n".join(lines)


@contextlib.contextmanager
def _staged(folder: Path) -> Any:
    """Files written beside their final names, moved in by the caller; what is
    left when the block ends (a failed check) is removed."""
    made: list[Path] = []

    def stage(final: Path, text: str, mode: int) -> Path:
        fd, name = tempfile.mkstemp(dir=folder, prefix=f".{final.name}.")
        made.append(Path(name))
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(text)
        return Path(name)

    try:
        yield stage
    finally:
        for p in made:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def _shown(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


# -- the check against the CP ---------------------------------------------------------

async def check_cp(cfg: KumaSourceConfig, coords: Coordinates,
                   renamed: dict[str, str]) -> str:
    """One discovery pass with the daemon's kuma source: meshes and dataplanes
    listed, or CliError with the source's own reason (one line)."""
    source = KumaSource(replace(cfg, timeout=min(cfg.timeout, CHECK_TIMEOUT),
                                discovery_interval=CHECK_TIMEOUT))
    # The source logs a failed pass as a warning: here the error line says it.
    quiet = logging.getLogger("passguard.sources.kuma")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        await source.discover()
    finally:
        quiet.setLevel(level)
        await source.close()
    if source.last_error:
        error = source.last_error
        for staged, final in renamed.items():  # the file's name once written
            error = error.replace(staged, final)
        # The source's hint names the config key; here it is a flag.
        error = error.replace("set token_file", "pass --token-file, or use kumactl's config "
                              "with authType tokens")
        raise CliError(f"control plane {coords.url}: {error}; "
                       "nothing written")
    dps = source.dataplanes()
    meshes = source.meshes()
    online = sum(1 for d in dps if d.online is not False)
    version = f"Kuma {source.version}; " if source.version else ""
    shown = ", ".join(meshes[:5]) + (f", … ({len(meshes) - 5} more)" if len(meshes) > 5 else "")
    return (f"{version}{len(meshes)} mesh{'es' if len(meshes) != 1 else ''}"
            f"{f' ({shown})' if meshes else ''}, {len(dps)} dataplane"
            f"{'s' if len(dps) != 1 else ''} ({online} online)")
