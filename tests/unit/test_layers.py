"""The import layers of docs/architecture.md, read from the code with ``ast``.

A module may import modules of its own layer or below, never above; no two
modules import each other, directly or around a circle; and the gate and the
passthrough model import nothing of aiohttp, sqlite3 or the config file
(so ``decide()`` stays a pure function, importable anywhere).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "passguard"

#: Lowest first. A module not listed is a failure: every new module takes a place.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("model", ("passguard.errors", "passguard.targets", "passguard.policy.*", "passguard.envoy",
               "passguard.store", "passguard.envoy.names", "passguard.envoy.stats",
               "passguard.verdicts", "passguard.durations")),
    ("parsers", ("passguard.envoy.clusters", "passguard.envoy.promtext", "passguard.envoy.excerpt",
                 "passguard.loader_limits", "passguard.loader_yaml", "passguard.loader",
                 "passguard.documents", "passguard.fields",
                 "passguard.sources.settings", "passguard.secretfile", "passguard.foreground",
                 "passguard.pacing", "passguard.heap", "passguard.logqueue", "passguard.frames",
                 "passguard.sdnotify", "passguard.sources.promql", "passguard.sources.promwire",
                 "passguard.sources.kumawire")),
    ("evidence", ("passguard.store.window", "passguard.store.destinations",
                  "passguard.store.snapshot", "passguard.sources.promevidence")),
    ("config", ("passguard.config_types", "passguard.config_checks", "passguard.config_fields",
                "passguard.config_errors", "passguard.config_schema", "passguard.config")),
    ("clients", ("passguard.httpclient", "passguard.envoy.admin", "passguard.envoy.http1",
                 "passguard.envoy.lean")),
    ("sources", ("passguard.sources.*", "passguard.scraper", "passguard.scrape_process")),
    ("store", ("passguard.store.store", "passguard.store.persistence",
               "passguard.store.shadows", "passguard.audit")),
    ("gate", ("passguard.gate.*", "passguard.verify", "passguard.shadows")),
    ("exposition", ("passguard.metrics", "passguard.exposition")),
    # passguard.web.backend: the Backend protocol the routes read the daemon through.
    ("web", ("passguard.web.backend", "passguard.web.*")),
    ("app", ("passguard.startup", "passguard.app", "passguard.demo.*")),
    ("cli", ("passguard.cli_common", "passguard.cli_init", "passguard.cli_progress",
             "passguard.cli_shadow", "passguard.cli_verify", "passguard.cli_ops",
             "passguard.cli", "passguard.__main__", "passguard.scrape_worker", "passguard")),
]
#: What the pure parts may not import, even indirectly through passguard.
PURE = ("passguard.gate.decide", "passguard.gate.plan", "passguard.gate.shadow",
        "passguard.gate.readiness", "passguard.documents", "passguard.policy.*")
IMPURE = ("aiohttp", "sqlite3", "passguard.config", "yaml")


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = modules()


def imports_of(name: str, typing_too: bool = False) -> Iterator[str]:
    """Modules of passguard (and top-level third-party names) ``name`` imports,
    at module level or inside functions; ``TYPE_CHECKING`` blocks excepted
    unless ``typing_too``."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    skip: set[int] = set()
    for node in ast.walk(tree):
        if not typing_too and isinstance(node, ast.If) \
                and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            yield mod
            for alias in node.names:  # `from passguard.gate import decide`
                if f"{mod}.{alias.name}" in MODULES:
                    yield f"{mod}.{alias.name}"


def local(imported: str) -> str | None:
    while imported and imported not in MODULES:
        imported = imported.rpartition(".")[0]
    return imported or None


def matches(name: str, pattern: str) -> bool:
    """``a.b.*``: the package ``a.b`` and every module in it."""
    if pattern.endswith(".*"):
        return name == pattern[:-2] or name.startswith(pattern[:-1])
    return name == pattern


def layer_of(name: str) -> int:
    for i, (_, patterns) in enumerate(LAYERS):
        if any(matches(name, p) for p in patterns):
            return i
    raise AssertionError(f"{name} has no layer in tests/unit/test_layers.py")


GRAPH = {m: {x for i in imports_of(m) if (x := local(i)) and x != m and x != "passguard"}
         for m in MODULES}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_run_down_the_layers(name: str) -> None:
    mine = layer_of(name)
    up = sorted(f"{d} ({LAYERS[layer_of(d)][0]})" for d in GRAPH[name] if layer_of(d) > mine)
    assert not up, f"{name} ({LAYERS[mine][0]}) imports a higher layer: {up}"


@pytest.mark.parametrize("name", [m for m in sorted(MODULES) if matches(m, "passguard.web.*")])
def test_the_routes_never_see_the_daemon(name: str) -> None:
    """The web layer reads the daemon through passguard.web.backend.Backend
    only: not even a type annotation names passguard.app (routes are tested
    with a fake backend, tests/unit/test_routes_backend.py)."""
    seen = {x for i in imports_of(name, typing_too=True)
            if (x := local(i)) and x != "passguard"}  # `from passguard import __version__`
    assert not {x for x in seen if layer_of(x) > layer_of(name)}, \
        f"{name} imports above the web layer, type annotations included: {sorted(seen)}"


def test_no_import_cycles() -> None:
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(GRAPH[m]):
            if state.get(d) == 1:
                cycles.append([*stack[stack.index(d):], d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)
    assert not cycles, cycles


def _closure(name: str) -> set[str]:
    seen: set[str] = set()
    todo = [name]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(GRAPH[m])
    return seen


@pytest.mark.parametrize("name", [m for m in sorted(MODULES)
                                  if any(matches(m, p) for p in PURE)])
def test_the_gate_and_the_model_are_pure(name: str) -> None:
    reached = _closure(name)
    third = {i.split(".")[0] for m in reached for i in imports_of(m)}
    bad = sorted({*(third & {x.split(".")[0] for x in IMPURE if "." not in x}),
                  *(reached & {x for x in IMPURE if "." in x})})
    assert not bad, f"{name} reaches {bad}"
