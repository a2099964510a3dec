"""``passguard shadow add|list|show|rm|promote`` (DESIGN §6): clients of ``/v1/shadows``.

Exit codes as elsewhere: 0 done, 2 error (bad input, unreachable, auth,
unknown shadow). ``promote`` exits 1 when the shadow has not been clean for
``--clean-for``, naming what it would cut, and prints the documents only
when it has: its output can go straight to ``kumactl apply -f -``.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.parse
from typing import Any

import yaml

from passguard import cli_common as cli
from passguard.durations import format_duration, parse_duration

MAX_ROWS = 20


def _url(args: argparse.Namespace, path: str = "") -> str:
    return cli._server(args) + "/v1/shadows" + path


def _quoted(name: str) -> str:
    return "/" + urllib.parse.quote(name, safe="")


def cmd_add(args: argparse.Namespace) -> int:
    docs = cli._read_docs(args.file)
    body = json.dumps({"name": args.name, "documents": docs}).encode()
    _, out = cli.http("POST", _url(args), body)
    for w in out.get("warnings", []):
        sys.stderr.write(f"passguard: warning: {w}\n")
    if args.output in ("json", "yaml"):
        cli.emit(out, args.output)
    else:
        docs_words = ", ".join(f"{d['kind']} {d['name']} (mesh {d['mesh']})"
                               for d in out["documents"])
        sys.stdout.write(f"shadow {out['name']} added: {docs_words}\n"
                         "evaluated against new passthrough connections from now on\n")
    return cli.EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    _, out = cli.http("GET", _url(args))
    if args.output in ("json", "yaml"):
        cli.emit(out, args.output)
        return cli.EXIT_OK
    items = out.get("shadows", [])
    if not items:
        sys.stdout.write("no shadows\n")
        return cli.EXIT_OK
    rows = [[s["name"], ",".join(s["meshes"]), str(len(s["documents"])),
             str(s["would_block_connections"]), str(s["unproven_connections"]),
             str(s["allowed_connections"]), str(s["destinations_cut_in_window"]),
             format_duration(s["clean_for_seconds"]) if s["clean_for_seconds"] >= 1 else "0s",
             s["created"]] for s in items]
    sys.stdout.write(cli.table(rows, ["NAME", "MESHES", "DOCS", "WOULD BLOCK", "UNPROVEN",
                                      "ALLOWED", "CUT NOW", "CLEAN FOR", "CREATED"]) + "\n")
    return cli.EXIT_OK


def _show_query(args: argparse.Namespace) -> str:
    return f"?days={args.days}"


def _dest_rows(items: list[dict[str, Any]]) -> str:
    rows = [[d["mesh"], d["dataplane"], d["address"], d["transport"] or "?",
             str(d["connections"]), d["first_seen"], d["last_seen"]] for d in items[:MAX_ROWS]]
    text = cli.table(rows, ["MESH", "DATAPLANE", "DESTINATION", "TRANSPORT", "CONNECTIONS",
                            "FIRST SEEN", "LAST SEEN"])
    if len(items) > MAX_ROWS:
        text += f"\n… and {len(items) - MAX_ROWS} more (-o json lists up to 100)"
    return text


def cmd_show(args: argparse.Namespace) -> int:
    _, out = cli.http("GET", _url(args, _quoted(args.name) + _show_query(args)))
    if args.output == "json":
        _json(out)
        return cli.EXIT_OK
    if args.output == "yaml":
        sys.stdout.write(yaml.safe_dump(out, sort_keys=False))
        return cli.EXIT_OK
    w = sys.stdout.write
    w(f"shadow {out['name']} (created {out['created']} by {out['requester']})\n")
    for d in out["documents"]:
        w(f"  {d['kind']} {d['name']} in mesh {d['mesh']}\n")
    w(f"since it was added: {out['would_block_connections']} connections would have been "
      f"refused, {out['unproven_connections']} unproven, {out['allowed_connections']} "
      "let through (on dataplanes whose passthrough it shrinks)\n")
    w(f"in the last {args.days}d: ")
    if out["refused"]:
        w(f"it would have cut {len(out['refused'])} destinations\n"
          + _dest_rows(out["refused"]) + "\n")
    else:
        w("it would have cut nothing\n")
    if out["unproven"]:
        blocking = any(out["unproven_blocks"].values())
        why = "counts against it: gate.on_unproven is deny" if blocking \
            else "allowed: gate.on_unproven is warn"
        w(f"unproven ({why}):\n" + _dest_rows(out["unproven"]) + "\n")
    clean = out["clean_for_seconds"]
    w(f"clean since {out['clean_since']} ({format_duration(clean) if clean >= 1 else '0s'})\n")
    return cli.EXIT_OK


def cmd_rm(args: argparse.Namespace) -> int:
    cli.http("DELETE", _url(args, _quoted(args.name)))
    sys.stdout.write(f"shadow {args.name} removed\n")
    return cli.EXIT_OK


def cmd_promote(args: argparse.Namespace) -> int:
    if args.clean_for is not None:
        try:
            clean_for = parse_duration(args.clean_for)
        except ValueError:
            raise cli.CliError(f"--clean-for: {args.clean_for!r} is not a duration like "
                               "15m or 7d") from None
        if clean_for <= 0:
            raise cli.CliError("--clean-for: must be more than 0")
        query = f"?since={args.clean_for}"
    else:
        clean_for, query = None, ""
    _, out = cli.http("GET", _url(args, _quoted(args.name) + query))
    if clean_for is None:
        clean_for = float(out["window_seconds"])  # one evidence window
        _, out = cli.http("GET", _url(args, _quoted(args.name)
                                      + f"?since={int(max(1, clean_for))}s"))
    if out["clean_for_seconds"] >= clean_for:
        sys.stdout.write(yaml.safe_dump_all(out["source"], sort_keys=False))
        return cli.EXIT_OK
    e = sys.stderr.write
    e(f"passguard: shadow {out['name']} has been clean for "
      f"{format_duration(out['clean_for_seconds']) if out['clean_for_seconds'] >= 1 else '0s'}"
      f", not {format_duration(clean_for)}: not promoted\n")
    if out["refused"]:
        e(f"it would cut, in the last {format_duration(clean_for)}:\n"
          + _dest_rows(out["refused"]) + "\n")
    blocking = [d for d in out["unproven"] if out["unproven_blocks"].get(d["mesh"])]
    if blocking:
        e("unproven (gate.on_unproven is deny):\n" + _dest_rows(blocking) + "\n")
    if not out["refused"] and not blocking:
        e("nothing refused: it was added (or last refused something) too recently\n")
    return cli.EXIT_REFUSED


def _json(out: Any) -> None:
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")


def register(sub: Any) -> None:
    """The ``shadow`` subcommands, added to ``passguard``'s parser."""
    sh = sub.add_parser("shadow", help="rehearse policies on live traffic")
    s = sh.add_subparsers(dest="shadow_command", required=True)

    def common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--server", help=f"passguard URL (env PASSGUARD_SERVER; "
                                        f"{cli.DEFAULT_SERVER})")
        return p

    add = common(s.add_parser("add", help="register a shadow: documents to rehearse"))
    add.add_argument("name")
    add.add_argument("-f", "--file", action="append", required=True,
                     help="Mesh/MeshPassthrough YAML or JSON (- for stdin); repeatable")
    add.add_argument("-o", "--output", choices=cli.OUTPUTS, default="text")
    add.set_defaults(func=cmd_add)

    ls = common(s.add_parser("list", help="every shadow and its counts"))
    ls.add_argument("-o", "--output", choices=cli.OUTPUTS, default="text")
    ls.set_defaults(func=cmd_list)

    show = common(s.add_parser("show", help="what it would have cut, and since when it is "
                                            "clean"))
    show.add_argument("name")
    show.add_argument("--days", type=int, default=7, help="look back this many days (1-31)")
    show.add_argument("-o", "--output", choices=["text", "json", "yaml"], default="text")
    show.set_defaults(func=cmd_show)

    rm = common(s.add_parser("rm", help="remove a shadow and its record"))
    rm.add_argument("name")
    rm.set_defaults(func=cmd_rm)

    pr = common(s.add_parser("promote", help="print the documents if clean for --clean-for"))
    pr.add_argument("name")
    pr.add_argument("--clean-for", help="duration (default: one evidence window)")
    pr.set_defaults(func=cmd_promote)
