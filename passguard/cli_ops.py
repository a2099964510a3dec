"""``passguard audit`` (a client of ``GET /v1/audit``) and ``passguard
completion bash|zsh`` (a script generated from the argparse parser itself, so
it cannot fall behind the commands)."""

from __future__ import annotations

import argparse
import shlex
import sys
import urllib.parse
from typing import Any

from passguard import cli_common as cli
from passguard.fields import escape_controls

#: Entries ``passguard audit`` fetches at most (``--limit``); the server's page is ≤ 1000.
MAX_LIMIT = 100_000
PAGE = 1000


# -- audit -------------------------------------------------------------------------

def fetch_audit(args: argparse.Namespace) -> dict[str, Any]:
    """Newest first, ``next`` pages followed until ``--limit`` entries: at most
    ``limit / 1000 + 1`` requests, and a cursor that does not move stops it."""
    entries: list[dict[str, Any]] = []
    cursor: str | None = None
    nxt: str | None = None
    for _ in range(args.limit // PAGE + 2):
        q = {"limit": str(min(PAGE, args.limit - len(entries)))}
        for key in ("since", "mesh", "verdict"):
            if getattr(args, key):
                q[key] = getattr(args, key)
        if cursor is not None:
            q["cursor"] = cursor
        _, body = cli.http("GET", cli._server(args) + "/v1/audit?" + urllib.parse.urlencode(q))
        if not isinstance(body, dict) or not isinstance(body.get("entries"), list):
            raise cli.CliError("the server's answer is not an audit page")
        entries.extend(body["entries"])
        nxt = body.get("next")
        if nxt is None or nxt == cursor or len(entries) >= args.limit or not body["entries"]:
            break
        cursor = str(nxt)
    return {"entries": entries[:args.limit],
            "next": nxt if len(entries) >= args.limit else None}


def _change(e: dict[str, Any]) -> str:
    docs = e.get("documents") or []
    words = ", ".join(f"{d.get('kind')} {d.get('name')}" for d in docs[:3])
    return words + (f" and {len(docs) - 3} more" if len(docs) > 3 else "") or "-"


def cmd_audit(args: argparse.Namespace) -> int:
    if not 1 <= args.limit <= MAX_LIMIT:
        raise cli.CliError(f"--limit must be between 1 and {MAX_LIMIT}")
    body = fetch_audit(args)
    if args.output != "text":
        cli.emit(body, args.output)
        return cli.EXIT_OK
    style = cli.Style(sys.stdout)
    rows = []
    for e in body["entries"]:
        flags = ("dry run " if e.get("dry_run") else "") + \
            ("break glass" if e.get("break_glass") else "")
        # The requester and names are the callers' words: escaped for the terminal.
        rows.append([str(e.get("id")), e.get("time") or "-", e.get("verdict") or "-",
                     e.get("mode") or "-", escape_controls(e.get("mesh") or "-"),
                     e.get("source") or "-", escape_controls(e.get("requester") or "-"),
                     escape_controls(_change(e)), flags.strip() or "-"])
    if not rows:
        sys.stdout.write("no audit entries\n")
        return cli.EXIT_OK
    text = cli.table(rows, ["ID", "TIME", "VERDICT", "MODE", "MESH", "SOURCE", "REQUESTER",
                            "CHANGE", "FLAGS"])
    if style.on:
        for v in ("allow", "warn", "deny"):
            text = text.replace(f"  {v}  ", f"  {style.verdict(v)}  ")
    sys.stdout.write(text + "\n")
    if body["next"] is not None:
        sys.stdout.write(f"… more entries: raise --limit (now {args.limit}) or narrow --since\n")
    return cli.EXIT_OK


# -- completion --------------------------------------------------------------------

def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
          ) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    out = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.extend(_walk(sub, (*path, name)))
    return out


def _tables(parser: argparse.ArgumentParser) -> tuple[dict[str, list[str]], dict[str, list[str]],
                                                       dict[tuple[str, str], list[str]],
                                                       set[tuple[str, str]]]:
    """Per command path: its words (subcommands, positional choices), its
    options, the choices of each option, and the options that take a file
    or another free value."""
    words: dict[str, list[str]] = {}
    opts: dict[str, list[str]] = {}
    choices: dict[tuple[str, str], list[str]] = {}
    free: set[tuple[str, str]] = set()
    for path, p in _walk(parser):
        key = " ".join(path)
        words[key], opts[key] = [], []
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                words[key].extend(action.choices)
            elif not action.option_strings:
                words[key].extend(str(c) for c in action.choices or ())
            elif action.help != argparse.SUPPRESS:
                opts[key].extend(action.option_strings)
                for o in action.option_strings:
                    if action.choices:
                        choices[(key, o)] = [str(c) for c in action.choices]
                    elif action.nargs != 0:
                        free.add((key, o))
    return words, opts, choices, free


def _case(arms: dict[str, list[str]]) -> str:
    """The arms of a shell ``case``: each key's words, quoted for the shell."""
    lines = []
    for key, values in sorted(arms.items()):
        if values:
            pattern = shlex.quote(key) if key else '""'
            lines.append(f"        {pattern}) echo {shlex.quote(' '.join(values))} ;;\n")
    return "".join(lines)


def _lookups(parser: argparse.ArgumentParser) -> str:
    """The shell functions both scripts look the parser's tables up with
    (POSIX ``case``: the same text serves bash and zsh)."""
    words, opts, choices, free = _tables(parser)
    ch = {f"{k}|{o}": v for (k, o), v in choices.items()}
    fr = sorted(f"{k}|{o}" for k, o in free)
    return f"""_passguard_words() {{
    case "$1" in
{_case(words)}    esac
}}
_passguard_opts() {{
    case "$1" in
{_case(opts)}    esac
}}
_passguard_choices() {{
    case "$1|$2" in
{_case(ch)}    esac
}}
_passguard_free() {{
    case "$1|$2" in
        {'|'.join(shlex.quote(x) for x in fr) or '""'}) return 0 ;;
    esac
    return 1
}}
"""


def bash_script(parser: argparse.ArgumentParser) -> str:
    return f"""# bash completion for passguard (generated by `passguard completion bash`).
# Load it with: source <(passguard completion bash)
# or install it: passguard completion bash > /etc/bash_completion.d/passguard
{_lookups(parser)}_passguard() {{
    local cur prev cmd i w s list
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    prev=""
    (( COMP_CWORD > 0 )) && prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    cmd=""
    for (( i = 1; i < COMP_CWORD; i++ )); do
        w="${{COMP_WORDS[i]}}"
        for s in $(_passguard_words "$cmd"); do
            if [[ "$w" == "$s" ]]; then cmd="${{cmd:+$cmd }}$w"; break; fi
        done
    done
    COMPREPLY=()
    list="$(_passguard_choices "$cmd" "$prev")"
    if [[ -n "$list" ]]; then
        COMPREPLY=($(compgen -W "$list" -- "$cur"))
    elif _passguard_free "$cmd" "$prev"; then
        COMPREPLY=($(compgen -f -- "$cur"))
    elif [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "$(_passguard_opts "$cmd")" -- "$cur"))
    else
        COMPREPLY=($(compgen -W "$(_passguard_words "$cmd")" -- "$cur"))
    fi
}}
complete -o bashdefault -o default -F _passguard passguard
"""


def zsh_script(parser: argparse.ArgumentParser) -> str:
    return f"""#compdef passguard
# zsh completion for passguard (generated by `passguard completion zsh`).
# Install it as _passguard in a directory of $fpath, e.g.
#   passguard completion zsh > "${{fpath[1]}}/_passguard"
# or load it in the current shell: source <(passguard completion zsh)
{_lookups(parser)}_passguard() {{
    local cur prev cmd w s list
    local -i i
    cur="${{words[CURRENT]}}"
    prev="${{words[CURRENT-1]}}"
    cmd=""
    for (( i = 2; i < CURRENT; i++ )); do
        w="${{words[i]}}"
        for s in ${{=$(_passguard_words "$cmd")}}; do
            if [[ "$w" == "$s" ]]; then cmd="${{cmd:+$cmd }}$w"; break; fi
        done
    done
    list="$(_passguard_choices "$cmd" "$prev")"
    if [[ -n "$list" ]]; then
        compadd -- ${{=list}}
    elif _passguard_free "$cmd" "$prev"; then
        _files
    elif [[ "$cur" == -* ]]; then
        compadd -- ${{=$(_passguard_opts "$cmd")}}
    else
        list="$(_passguard_words "$cmd")"
        if [[ -n "$list" ]]; then compadd -- ${{=list}}; else _files; fi
    fi
}}
if [[ "$funcstack[1]" == _passguard ]]; then
    _passguard "$@"
else
    compdef _passguard passguard
fi
"""


def cmd_completion(args: argparse.Namespace) -> int:
    root = args.root_parser
    sys.stdout.write(bash_script(root) if args.shell == "bash" else zsh_script(root))
    return cli.EXIT_OK


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser],
             root: argparse.ArgumentParser) -> None:
    a = sub.add_parser("audit", help="the gate's recorded decisions (GET /v1/audit)")
    a.add_argument("--server", help=f"passguard URL (env PASSGUARD_SERVER; {cli.DEFAULT_SERVER})")
    a.add_argument("--since", help="RFC 3339 time, or a duration back from now (1h, 7d)")
    a.add_argument("--mesh")
    a.add_argument("--verdict", choices=["allow", "warn", "deny"])
    a.add_argument("--limit", type=int, default=100,
                   help=f"entries at most, newest first (default 100, at most {MAX_LIMIT})")
    a.add_argument("-o", "--output", choices=cli.OUTPUTS, default="text")
    a.set_defaults(func=cmd_audit)

    c = sub.add_parser("completion", help="print a shell completion script")
    c.add_argument("shell", choices=["bash", "zsh"])
    c.set_defaults(func=cmd_completion, root_parser=root)


__all__ = ["bash_script", "cmd_audit", "cmd_completion", "fetch_audit", "register",
           "zsh_script"]
