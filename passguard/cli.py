"""``passguard`` command line (DESIGN §3).

Exit codes are the interface pipelines depend on: ``check`` exits 0 when the
change is allowed (warnings printed), 1 when refused, 2 on any error (bad
input, unreachable server, authentication). Errors are one line on stderr,
never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, TextIO

from passguard import __version__, cli_init, cli_ops, cli_shadow, cli_verify
from passguard import config as config_mod
from passguard.cli_common import (
    DEFAULT_SERVER,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_REFUSED,
    OUTPUTS,
    CliError,
    Style,
    _read_docs,
    _server,
    emit,
    http,
    table,
)
from passguard.cli_progress import Progress
from passguard.documents import parse_resource
from passguard.durations import format_duration
from passguard.errors import ConfigError, InputError, PassguardError
from passguard.gate import service
from passguard.logqueue import use_format as _log_format


def _pair_old(docs: list[Any], old_docs: list[Any]) -> list[Any]:
    """Send ``--old`` as oldObject next to the document it is the old version of."""
    old_by_ident = {}
    for i, od in enumerate(old_docs):
        r = parse_resource(od, f"old document {i + 1}")
        if not isinstance(r, str):
            old_by_ident[r.ident] = od
    out = []
    for i, doc in enumerate(docs):
        r = parse_resource(doc, f"document {i + 1}")
        if not isinstance(r, str) and r.ident in old_by_ident:
            out.append({"object": doc, "oldObject": old_by_ident[r.ident]})
        else:
            out.append(doc)
    return out


def _standalone_check(cfg_path: str, docs: list[Any], old_docs: list[Any]) -> dict[str, Any]:
    from passguard.envoy.clusters import Destination
    from passguard.scraper import Scraper
    from passguard.sources.sourceset import SourceSet
    from passguard.store.store import Store
    from passguard.targets import Target

    cfg = config_mod.load(cfg_path)

    async def once() -> dict[str, Any]:
        # The daemon's sources, without its server, scheduler or database:
        # one discovery, one scrape, one /clusters read.
        sources = SourceSet(cfg)
        scraper = Scraper(cfg)
        progress = Progress()  # stderr, on a terminal only
        try:
            progress.say("listing dataplanes…")
            await sources.discover()
            for s in sources.kuma:
                if s.last_error:
                    raise CliError(f"control plane {s.cfg.url}: {s.last_error}")
            store = Store(cfg.window, cfg.stale_after, since_start=True)
            store.set_targets(sources.targets())
            targets_now = list(store.targets.values())
            progress.start(sum(not t.offline for t in targets_now), "stats", "destinations")
            store.record(await scraper.cycle(targets_now, sources.request_for,
                                             on_result=lambda _: progress.done("stats")))
            extra = await sources.collect(time.time())

            # A one-shot read: nobody waits behind it, so no spreading. One
            # pass per target, so each /clusters body (tens of MB through the
            # inspect API) is counted as it ends.
            async def clusters(t: Target) -> list[tuple[Target, float, list[Destination] | None,
                                                         str | None]]:
                read = await scraper.clusters_pass([t], sources.request_for)
                progress.done("destinations")
                return read

            reads = [r for rs in await asyncio.gather(*map(clusters, targets_now)) for r in rs]
            store.record_destinations([(t, at, d) for t, at, d, _ in reads if d is not None])
            snap = store.build_snapshot(time.time(), extra)
        finally:
            progress.clear()
            await scraper.close()
            await sources.close()
        body, _ = service.check(docs, old_docs, snap, cfg.gate, sources.mesh_states(),
                                time.time(), cfg.limits.documents.max_matches)
        return body

    return asyncio.run(once())


def print_decision(body: dict[str, Any], out: TextIO) -> None:
    style = Style(out)
    for d in body["decisions"]:
        ch = d["change"]
        out.write(f"{style.verdict(d['verdict']):<5}  {ch['kind']} {ch['name']} "
                  f"(mesh {d['mesh']}): {ch['effect']}\n")
        for r in d["reasons"]:
            out.write(f"       - {r}\n")
        for row in (d.get("dataplanes") or [])[:10]:
            if "dataplane" not in row:
                out.write(f"         ... and {row.get('omitted', 0)} more dataplanes\n")
                continue
            lost = ", ".join(f"{x['address']}{' ' + x['transport'] if x['transport'] else ''} "
                             f"({x['connections']})" for x in row["lost"][:5])
            unproven = ", ".join(f"{x['address']} ({x['connections']})"
                                 for x in row["unproven"][:5])
            out.write(f"         {row['dataplane']}: {row['before']} -> {row['after']}"
                      + (f"; loses {lost}" if lost else "")
                      + (f"; unproven {unproven}" if unproven else "")
                      + (f"; {row['unknown']}" if row.get("unknown") else "") + "\n")
    for w in body["warnings"]:
        out.write(f"{style('warning', '33')}: {w}\n")
    if "evidence_source" in body:
        out.write(f"evidence: {body['evidence_source']}\n")
    result = "allowed" if body["allowed"] else "refused"
    out.write(f"verdict: {style.verdict(body['verdict'])} ({body['mode']} mode): {result}\n")


def cmd_check(args: argparse.Namespace) -> int:
    docs = _read_docs(args.file)
    old_docs = _read_docs(args.old) if args.old else []
    if args.config and not args.server:
        body = _standalone_check(args.config, docs, old_docs)
    else:
        payload = "\n".join("---\n" + json.dumps(d) for d in _pair_old(docs, old_docs))
        _, body = http("POST", _server(args) + "/v1/check", payload.encode(),
                       "application/yaml")
        if not isinstance(body, dict) or "allowed" not in body:
            raise CliError("the server's answer is not a passguard decision")
    if args.output in ("json", "yaml"):
        emit(body, args.output)
    else:
        print_decision(body, sys.stdout)
    return EXIT_OK if body["allowed"] else EXIT_REFUSED


# -- status ------------------------------------------------------------------------

def cmd_status(args: argparse.Namespace) -> int:
    _, body = http("GET", _server(args) + "/v1/meshes")
    if args.output in ("json", "yaml"):
        emit(body, args.output)
        return EXIT_OK
    style = Style(sys.stdout)
    rows = []
    for m in body.get("meshes", []):
        c = m["dataplanes"]
        rows.append([m["mesh"], str(c["total"]), str(c["fresh"]), str(c["stale"]),
                     str(c["failed"]), str(c["offline"]), str(c["with_traffic"]),
                     str(c["unknown"]), str(m["connections"]), str(m["active_connections"]),
                     str(m["blocked_connections"]), m["verdict_if_disabled"]])
    window = body.get("window_seconds")
    sys.stdout.write(f"window: {format_duration(window) if window else '-'}\n")
    if not rows:
        sys.stdout.write("no dataplanes known\n")
        return EXIT_OK
    text = table(rows, ["MESH", "DATAPLANES", "FRESH", "STALE", "FAILED", "OFFLINE", "TRAFFIC",
                        "UNKNOWN", "CONNECTIONS", "ACTIVE", "BLOCKED", "IF DISABLED"])
    if style.on:
        for v in ("allow", "warn", "deny"):
            text = text.replace(f"  {v}\n", f"  {style.verdict(v)}\n")
    sys.stdout.write(text + "\n")
    return EXIT_OK


# -- destinations ---------------------------------------------------------------------

def policies(dests: list[dict[str, Any]], per_service: bool, kubernetes: bool,
             namespace: str) -> list[dict[str, Any]]:
    """MeshPassthrough ``Matched`` policies that keep every observed destination reachable.

    Kuma's ``tcp`` entry keeps plain TCP only and ``tls`` TLS only
    (docs/semantics.md R2): a destination whose transport Envoy did not show
    (a generic passthrough cluster) gets both, so the policy cuts nothing seen."""
    groups: dict[tuple[str, str], set[tuple[str, int, str]]] = {}
    for d in dests:
        host, port = d["address"].rsplit(":", 1)
        key = (d["mesh"], d["service"] if per_service else "")
        known = d.get("transport")
        for proto in (known,) if known in ("tcp", "tls") else ("tcp", "tls"):
            groups.setdefault(key, set()).add((host.strip("[]"), int(port), proto))
    out = []
    for (mesh, svc), addrs in sorted(groups.items()):
        name = "passguard-observed" + (f"-{_dns_label(svc)}" if svc else "")
        target: dict[str, Any] = {"kind": "Mesh"}
        if svc:
            target = {"kind": "MeshSubset", "tags": {"kuma.io/service": svc}}
        spec = {"targetRef": target, "default": {
            "passthroughMode": "Matched",
            "appendMatch": [{"type": "IP", "value": ip, "port": port, "protocol": proto}
                            for ip, port, proto in sorted(addrs)]}}
        if kubernetes:
            out.append({"apiVersion": "kuma.io/v1alpha1", "kind": "MeshPassthrough",
                        "metadata": {"name": name, "namespace": namespace,
                                     "labels": {"kuma.io/mesh": mesh}}, "spec": spec})
        else:
            out.append({"type": "MeshPassthrough", "name": name, "mesh": mesh, "spec": spec})
    return out


def _dns_label(text: str) -> str:
    label = "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")
    return label[:40] or "service"


def cmd_destinations(args: argparse.Namespace) -> int:
    path = "/v1/destinations" + (f"?mesh={urllib.parse.quote(args.mesh)}" if args.mesh else "")
    _, body = http("GET", _server(args) + path)
    dests = body.get("destinations", [])
    if args.output == "json":
        json.dump(body, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif args.output == "yaml":
        import yaml

        docs = policies(dests, args.per_service, args.kubernetes, args.namespace)
        sys.stdout.write("# MeshPassthrough policies (passthroughMode: Matched) allowing every "
                         "destination passguard observed.\n# Check them before applying: a "
                         "destination not yet observed is not in here.\n")
        sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=False) if docs else "")
    else:
        rows = [[d["mesh"], d["dataplane"], d["service"], d["address"], str(d["connections"]),
                 d["last_seen"] or "-"] for d in dests]
        if not rows:
            sys.stdout.write("no destinations observed\n")
        else:
            sys.stdout.write(table(rows, ["MESH", "DATAPLANE", "SERVICE", "DESTINATION",
                                          "CONNECTIONS", "LAST SEEN"]) + "\n")
    return EXIT_OK


# -- config / token / run ------------------------------------------------------------

def cmd_config_check(args: argparse.Namespace) -> int:
    try:
        cfg = config_mod.load(args.config)
    except ConfigError as exc:
        for e in exc.errors:
            sys.stderr.write(f"{args.config}: {e}\n")
        return EXIT_ERROR
    n = sum(len(s.targets) for s in cfg.sources if isinstance(s, config_mod.EnvoySource))
    cps = sum(1 for s in cfg.sources if not isinstance(s, config_mod.EnvoySource))
    sys.stdout.write(f"{args.config}: valid ({len(cfg.sources)} source(s): {n} inline "
                     f"target(s), {cps} control plane(s); gate mode {cfg.gate.mode})\n")
    return EXIT_OK


def cmd_config_schema(args: argparse.Namespace) -> int:
    sys.stdout.write(json.dumps(config_mod.json_schema(), indent=2) + "\n")
    return EXIT_OK


def cmd_token_hash(args: argparse.Namespace) -> int:
    token = sys.stdin.readline().strip()
    if not token:
        raise CliError("no token on stdin")
    sys.stdout.write(hashlib.sha256(token.encode()).hexdigest() + "\n")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from passguard.app import Daemon
    from passguard.logqueue import log_off_the_loop

    cfg = config_mod.load(args.config)
    if args.log_format is None:  # the flag wins over log.format
        _log_format(cfg.log_format)
    writer = log_off_the_loop()
    try:
        asyncio.run(Daemon(cfg, Path(args.config)).run_forever())
        return EXIT_OK
    finally:
        writer.stop()  # what is still queued is written before the exit


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="passguard", description="Guards the Kuma passthrough "
                                "switch: refuses to disable it while traffic still uses it.")
    p.add_argument("--version", action="version", version=f"passguard {__version__}")
    p.add_argument("--log-level", default=os.environ.get("PASSGUARD_LOG_LEVEL", "info"),
                   choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", choices=["text", "json"],
                   help="log lines as text, or one JSON object each (default: log.format of "
                   "the config for run, else text)")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("-c", "--config", required=True)
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check", help="ask the gate about a change")
    check.add_argument("-f", "--file", action="append", required=True,
                       help="Mesh/MeshPassthrough YAML or JSON (- for stdin); repeatable")
    check.add_argument("--old", action="append", help="the previous version of the documents")
    check.add_argument("--server", help=f"passguard URL (env PASSGUARD_SERVER; {DEFAULT_SERVER})")
    check.add_argument("-c", "--config", help="no server: scrape once with this config")
    check.add_argument("-o", "--output", choices=OUTPUTS, default="text")
    check.set_defaults(func=cmd_check)

    status = sub.add_parser("status", help="per-mesh readiness")
    status.add_argument("--server")
    status.add_argument("-o", "--output", choices=OUTPUTS, default="text")
    status.set_defaults(func=cmd_status)

    dst = sub.add_parser("destinations", help="external destinations seen via passthrough")
    dst.add_argument("--server")
    dst.add_argument("--mesh")
    dst.add_argument("-o", "--output", choices=["text", "json", "yaml"], default="text")
    dst.add_argument("--per-service", action="store_true",
                     help="yaml: one policy per service (MeshSubset kuma.io/service)")
    dst.add_argument("--kubernetes", action="store_true", help="yaml: Kubernetes form")
    dst.add_argument("--namespace", default="kuma-system", help="yaml: namespace (Kubernetes)")
    dst.set_defaults(func=cmd_destinations)

    cfg = sub.add_parser("config", help="configuration tools")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True)
    cc = cfg_sub.add_parser("check", help="validate a config file")
    cc.add_argument("-c", "--config", required=True)
    cc.set_defaults(func=cmd_config_check)
    cs = cfg_sub.add_parser("schema", help="print the config file's JSON Schema (for editors)")
    cs.set_defaults(func=cmd_config_schema)

    tok = sub.add_parser("token", help="token tools")
    tok_sub = tok.add_subparsers(dest="token_command", required=True)
    th = tok_sub.add_parser("hash", help="SHA-256 digest of a token read on stdin")
    th.set_defaults(func=cmd_token_hash)

    cli_init.register(sub)
    cli_shadow.register(sub)
    cli_verify.register(sub)
    cli_ops.register(sub, p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), handlers=[logging.StreamHandler()],
                        force=True)
    _log_format(args.log_format or "text")
    # APScheduler logs every run at INFO: one line per interval drowns the journal.
    logging.getLogger("apscheduler").setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        code: int = args.func(args)
        return code
    except ConfigError as exc:
        for e in exc.errors:
            sys.stderr.write(f"passguard: config: {e}\n")
        return EXIT_ERROR
    except (CliError, InputError) as exc:
        sys.stderr.write(f"passguard: {exc}\n")
        return EXIT_ERROR
    except PassguardError as exc:
        sys.stderr.write(f"passguard: {exc}\n")
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
