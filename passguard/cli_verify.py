"""``passguard verify`` and ``passguard upgrade-check`` (DESIGN §6).

Both ask a running daemon (``--server``, ``PASSGUARD_SERVER``): the evidence
lives there. Exit codes are the interface:

- ``verify``: 0 no refusal from ``--since`` until ``--since`` + ``--for``,
  1 at the first refusal (naming dataplane and count), 2 on error, or when a
  watched dataplane could not be read up to the end (nothing can be vouched for).
- ``upgrade-check``: 0 ready, 1 not ready (traffic would be lost or a lockdown
  lifted, under either reading of 3.0), 2 error, or readiness unknown (no
  control plane state for a mesh).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import urllib.parse
from typing import Any, TextIO

import yaml

from passguard.cli_common import (
    DEFAULT_SERVER,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_REFUSED,
    CliError,
    Style,
    _server,
    http,
    table,
)
from passguard.durations import format_duration, parse_duration
from passguard.gate.readiness import without_nulls
from passguard.verify import SinceError, parse_since, rfc3339

#: Longest --for accepted: a pipeline step, not a monitor.
MAX_FOR = 24 * 3600.0
#: Polls of GET /v1/verify are spaced by the daemon's scrape interval, within these.
MIN_POLL, MAX_POLL = 1.0, 60.0
#: After the deadline, how many intervals to wait for every dataplane's sample past it.
SETTLE_INTERVALS = 3


def _emit(body: Any, fmt: str, out: TextIO) -> None:
    if fmt == "json":
        json.dump(body, out, indent=2)
        out.write("\n")
    else:
        out.write(yaml.safe_dump(body, sort_keys=False))


# -- verify --------------------------------------------------------------------------

def _verify_url(args: argparse.Namespace, since: float) -> str:
    q = {"since": f"{since:.3f}"}
    if args.mesh:
        q["mesh"] = args.mesh
    return _server(args) + "/v1/verify?" + urllib.parse.urlencode(q)


def _refusal_line(r: dict[str, Any]) -> str:
    parts = []
    if r["refused"]:
        parts.append(f"{r['refused']} refused (no route / no filter chain)")
    if r["connect_failures"]:
        parts.append(f"{r['connect_failures']} connect failures")
    if r["overflows"]:
        parts.append(f"{r['overflows']} overflows")
    return f"{r['mesh']}/{r['dataplane']}: " + ", ".join(parts)


def cmd_verify(args: argparse.Namespace) -> int:
    now = time.time()
    try:
        since = parse_since(args.since, now)
    except SinceError as exc:
        raise CliError(f"--since: {exc}") from None
    try:
        window = parse_duration(args.for_) if args.for_ else 0.0
    except ValueError as exc:
        raise CliError(f"--for: {exc}") from None
    if window > MAX_FOR:
        raise CliError(f"--for: at most {format_duration(MAX_FOR)}")
    deadline = since + window
    out, style = sys.stdout, Style(sys.stdout)
    url = _verify_url(args, since)
    # Bounded whatever the clock does: polls to the deadline at the fastest
    # pace, plus the settling polls after it.
    budget = math.ceil(max(0.0, deadline - now) / MIN_POLL) + SETTLE_INTERVALS + 2
    body: dict[str, Any] = {}
    settle_until: float | None = None
    for _ in range(budget):
        _, body = http("GET", url)
        if not isinstance(body, dict) or "status" not in body:
            raise CliError(f"{url}: the answer is not a verify report")
        if body["status"] == "nothing_to_watch":
            raise CliError(str(body.get("reason", "nothing to watch")))
        if body["refusals"]:
            if args.output == "text":
                for r in body["refusals"]:
                    out.write(f"{style('REFUSED', '1;31')}  {_refusal_line(r)} since "
                              f"{body['since']}\n")
                out.write(f"verify: refusals seen after {body['since']}: roll back or fix "
                          "the policy\n")
            else:
                _emit(body, args.output, out)
            return EXIT_REFUSED
        interval = min(MAX_POLL, max(MIN_POLL, float(body.get("scrape_interval_seconds") or 1)))
        t = time.time()
        if t >= deadline:
            oldest = body.get("oldest_sample_unix")
            settled = oldest is not None and oldest >= deadline and not body["pending"]
            if settled:
                break
            if settle_until is None:
                settle_until = t + SETTLE_INTERVALS * interval
            if t >= settle_until:
                break
            time.sleep(interval)
            continue
        time.sleep(max(0.05, min(interval, deadline - t)))
    if args.output != "text":
        _emit(body, args.output, out)
    pending = body.get("pending", [])
    if pending:
        if args.output == "text":
            for p in pending:
                out.write(f"{style('UNKNOWN', '33')}  {p['mesh']}/{p['dataplane']}: "
                          f"{p['reason']}\n")
        sys.stderr.write(f"passguard: verify: {len(pending)} dataplane(s) could not be read "
                         f"up to {rfc3339(deadline)}: no refusal seen, but none can be "
                         "vouched for on them\n")
        return EXIT_ERROR
    if args.output == "text":
        meshes = ", ".join(body.get("meshes", []))
        decided = ", ".join(f"#{d['id']} {' '.join(d['documents'])}"
                            for d in body.get("decisions", [])[:5])
        out.write(f"{style('CLEAN', '32')}  no passthrough refusal on {body['watched']} "
                  f"dataplane(s) of {meshes} from {rfc3339(since)} to "
                  f"{rfc3339(max(deadline, since))}"
                  + (f" (decisions: {decided})" if decided else "") + "\n")
    return EXIT_OK


# -- upgrade-check -------------------------------------------------------------------

def _side(row: dict[str, Any], outcome: str) -> str:
    s = row[outcome]
    words = str(s["after"])
    if s["lost"]:
        words += " loses " + ", ".join(f"{x['address']}" + (f" {x['transport']}"
                                                            if x["transport"] else "")
                                       + f" ({x['connections']})" for x in s["lost"][:3])
    if s["unproven"]:
        words += " unproven " + ", ".join(f"{x['address']} ({x['connections']})"
                                          for x in s["unproven"][:3])
    if s.get("unobserved_connections"):
        words += f" unobserved ({s['unobserved_connections']})"
    if s["opens"]:
        words += " OPENS"
    if s.get("unknown"):
        words += f" unknown: {s['unknown']}"
    return words


def print_readiness(body: dict[str, Any], out: TextIO) -> None:
    style = Style(out)
    src = body["source"]
    out.write(f"Kuma {body['to']} rules from {src['repository']} {src['ref']} "
              f"{src['commit']} ({src['commit_date']})\n")
    colour = {"ready": "32", "not_ready": "1;31", "unknown": "33"}
    for m in body["meshes"]:
        status = style(m["status"].upper().replace("_", " "), colour.get(m["status"], "0"))
        version = f", control plane {m['current_version']}" if m.get("current_version") else ""
        out.write(f"\nmesh {m['mesh']}: {status}{version}\n")
        for r in m["reasons"]:
            out.write(f"  - {r}\n")
        if m["dataplanes"]:
            rows = [[d["dataplane"], f"{d['now']}", str(d["connections"]),
                     _side(d, "as_if_true"), _side(d, "none")] for d in m["dataplanes"]]
            text = table(rows, ["DATAPLANE", "NOW", "CONNECTIONS", "3.0 NO POLICY = ON",
                                "3.0 NO POLICY = NONE"])
            out.write("".join(f"  {line}\n" for line in text.splitlines()))
        for r in m["rejected_entries"]:
            out.write(f"  rejected by Kuma {'/'.join(r['versions'])}: MeshPassthrough "
                      f"{r['policy']} {r['path']}: {r['message']}\n")
        for n in m["notes"]:
            out.write(f"  note: {n}\n")
        if m["keep_lockdown"]:
            out.write("  keeps the lockdown (apply before upgrading):\n")
            out.write(_indent(yaml.safe_dump_all([without_nulls(d) for d in m["keep_lockdown"]],
                                                 sort_keys=False)))
        if m["keep_traffic"]:
            out.write("  keeps the observed traffic (apply before upgrading):\n")
            out.write(_indent(yaml.safe_dump_all([without_nulls(d) for d in m["keep_traffic"]],
                                                 sort_keys=False)))
    out.write(f"\nupgrade-check --to {body['to']}: {body['status'].replace('_', ' ')}\n")


def _indent(text: str) -> str:
    return "".join(f"    {line}\n" for line in text.splitlines())


def cmd_upgrade_check(args: argparse.Namespace) -> int:
    q = {"to": args.to}
    if args.mesh:
        q["mesh"] = args.mesh
    url = _server(args) + "/v1/readiness?" + urllib.parse.urlencode(q)
    _, body = http("GET", url)
    if not isinstance(body, dict) or "meshes" not in body:
        raise CliError(f"{url}: the answer is not a readiness report")
    if args.output == "json":
        _emit(body, "json", sys.stdout)
    elif args.output == "yaml":
        docs = [without_nulls(d) for m in body["meshes"]
                for d in (*m["keep_lockdown"], *m["keep_traffic"])]
        sys.stdout.write(f"# MeshPassthrough documents that keep today's passthrough on Kuma "
                         f"{body['to']} (status: {body['status']}).\n# Review them, apply "
                         "before upgrading, then run upgrade-check again.\n")
        sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=False) if docs else "")
    else:
        print_readiness(body, sys.stdout)
    if body["status"] == "not_ready":
        return EXIT_REFUSED
    if body["status"] == "unknown":
        reasons = [r for m in body["meshes"] if m["status"] == "unknown" for r in m["reasons"]]
        sys.stderr.write("passguard: readiness unknown: "
                         + ("; ".join(reasons) or "passguard knows no mesh") + "\n")
        return EXIT_ERROR
    return EXIT_OK


def register(sub: Any) -> None:
    """Add the two subcommands to ``passguard``'s parser."""
    v = sub.add_parser("verify", help="after a deploy: did the proxies refuse passthrough?")
    v.add_argument("--since", required=True,
                   help="the deploy: RFC 3339 time, Unix seconds, or a duration back (10m)")
    v.add_argument("--for", dest="for_", metavar="DURATION",
                   help="keep watching until --since + DURATION (default: check once)")
    v.add_argument("--mesh", help="watch this mesh (default: the meshes of the changes the "
                                  "gate let in since --since)")
    v.add_argument("--server", help=f"passguard URL (env PASSGUARD_SERVER; {DEFAULT_SERVER})")
    v.add_argument("-o", "--output", choices=["text", "json", "yaml"], default="text")
    v.set_defaults(func=cmd_verify)

    u = sub.add_parser("upgrade-check", help="what a Kuma upgrade does to passthrough")
    u.add_argument("--to", required=True, choices=["3.0"], help="target Kuma version")
    u.add_argument("--mesh")
    u.add_argument("--server", help=f"passguard URL (env PASSGUARD_SERVER; {DEFAULT_SERVER})")
    u.add_argument("-o", "--output", choices=["text", "json", "yaml"], default="text",
                   help="yaml: only the documents to apply")
    u.set_defaults(func=cmd_upgrade_check)
