"""The gate recipes of docs/pipelines.md, run for real.

Each recipe's gate step is taken from the page as it is written — the
``run`` of the GitHub Actions step ``passguard-gate``, the ``script`` of the
GitLab job ``passguard-gate``, the container ``args`` of the Argo CD PreSync
Job, and the plain ``kubectl`` and ``curl`` blocks — and run in POSIX ``sh``
against a real ``passguard run`` watching two real Envoys: one carrying
passthrough traffic (mesh ``busy``), one idle (mesh ``idle``). Turning
passthrough off must exit 0 on the idle mesh and 1 on the busy one, and a
wrong token must fail without looking like a refusal.

The glue around each step (runners, ``kubectl``, ``argocd``, ``flux``) is not
run and not faked: the page says which part is glue.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from passguard.demo.traffic import EchoUpstream, send_traffic

from .conftest import EnvoyFactory
from .procs import REPO, Passguard, envoy_target, passguard_config, require_binary, wait_until

pytestmark = pytest.mark.e2e
TOKEN = "pipeline-recipe-token"
WAIT = 45.0
RECIPES = ("github-actions", "gitlab-ci", "argocd-presync", "kubectl", "curl")


def mesh_doc(mesh: str) -> str:
    return (f"apiVersion: kuma.io/v1alpha1\nkind: Mesh\nmetadata:\n  name: {mesh}\n"
            "spec:\n  networking:\n    outbound:\n      passthrough: false\n")


APP = ("apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n"
       "  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n"
       "    spec: {containers: [{name: web, image: web:1}]}\n")


def recipe_blocks() -> dict[str, tuple[str, str]]:
    """``{name: (language, text)}`` of the fenced blocks marked ``<!-- recipe: NAME -->``."""
    text = (REPO / "docs" / "pipelines.md").read_text()
    found = re.findall(r"<!-- recipe: ([a-z-]+) -->\n```(\w+)\n(.*?)```", text, re.S)
    blocks = {name: (lang, body) for name, lang, body in found}
    assert len(blocks) == len(found), "a recipe name is used twice in docs/pipelines.md"
    return blocks


def gate_step(name: str) -> tuple[str, dict[str, str]]:
    """The shell of a recipe's gate step, and the variables its CI file sets for it."""
    lang, body = recipe_blocks()[name]
    if name == "github-actions":
        job = yaml.safe_load(body)["jobs"]["passguard-gate"]
        [step] = [s for s in job["steps"] if s.get("id") == "passguard-gate"]
        return step["run"], {**job.get("env", {}), **step.get("env", {})}
    if name == "gitlab-ci":
        job = yaml.safe_load(body)["passguard-gate"]
        return "\n".join(job["script"]), dict(job.get("variables", {}))
    if name == "argocd-presync":
        [job] = [d for d in yaml.safe_load_all(body) if d and d.get("kind") == "Job"]
        [container] = job["spec"]["template"]["spec"]["containers"]
        assert container["command"] == ["/bin/sh", "-c"], container["command"]
        [script] = container["args"]
        return script, {e["name"]: e["value"] for e in container["env"] if "value" in e}
    assert lang == "sh", f"recipe {name}: a sh block"
    return body, {}


def test_the_page_has_every_recipe() -> None:
    assert set(recipe_blocks()) == set(RECIPES)
    for name in RECIPES:
        script, env = gate_step(name)
        assert "passguard check" in script or "/v1/check" in script, name
        assert "MANIFESTS" in script, f"{name}: the gate reads the files from $MANIFESTS"
        # The token comes from the CI system's secrets, never from the file.
        token = str(env.get("PASSGUARD_TOKEN", "${{ secrets."))
        assert token.startswith("${{ secrets."), f"{name}: a literal PASSGUARD_TOKEN"


def run_gate(name: str, tmp: Path, server: str, token: str, docs: Mapping[str, str]
             ) -> subprocess.CompletedProcess[str]:
    """Run the recipe's gate step in ``sh`` in a fresh work tree holding ``docs``."""
    script, declared = gate_step(name)
    work = tmp / f"{name}-{len(list(tmp.iterdir()))}"
    work.mkdir()
    env: dict[str, Any] = {k: v for k, v in os.environ.items()
                           if not k.startswith(("PASSGUARD_", "CI"))}
    env.update({k: str(v) for k, v in declared.items() if "${{" not in str(v)})
    # The manifests directory: where the recipe says, inside the work tree;
    # an absolute one (a container's mount) becomes a directory of the test.
    manifests = str(declared.get("MANIFESTS", "manifests"))
    directory = work / manifests.lstrip("/")
    directory.mkdir(parents=True)
    for file, text in docs.items():
        (directory / file).write_text(text)
    env["MANIFESTS"] = str(directory) if manifests.startswith("/") or \
        "MANIFESTS" not in declared else manifests
    env.update(PASSGUARD_SERVER=server, PASSGUARD_TOKEN=token, NO_COLOR="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    return subprocess.run(["sh", "-c", script], cwd=work, env=env, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


async def test_each_recipe_gates_a_real_daemon(
        envoy_factory: EnvoyFactory, echo_upstream: EchoUpstream, tmp_path: Path) -> None:
    require_binary("curl")
    require_binary("jq")
    busy = await envoy_factory("legacy")
    idle = await envoy_factory("unified")
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(yaml.safe_dump({"tokens": [
        {"name": "ci-deploy", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest()}]}))
    cfg = passguard_config(tmp_path, [envoy_target(busy.admin_url, "busy", "busy-1"),
                                      envoy_target(idle.admin_url, "idle", "idle-1")],
                           interval="1s", window="1m", auth={"tokens_file": str(tokens)})
    pg = Passguard(cfg, tmp_path)
    runs = tmp_path / "runs"
    runs.mkdir()
    try:
        await asyncio.to_thread(pg.start)
        await send_traffic(busy, echo_upstream, 3)
        await asyncio.to_thread(wait_until, lambda: {
            m["mesh"]: m["verdict_if_disabled"] for m in pg.get("/v1/meshes")["meshes"]
        } == {"busy": "deny", "idle": "allow"}, WAIT, "busy refused and idle allowed",
            details=pg.log_tail)
        for name in RECIPES:
            allowed = await asyncio.to_thread(run_gate, name, runs, pg.url, TOKEN,
                                              {"mesh.yaml": mesh_doc("idle"), "app.yaml": APP})
            assert allowed.returncode == 0, (name, allowed.stdout, allowed.stderr)
            assert "ALLOW" in allowed.stdout and "Mesh idle" in allowed.stdout, \
                (name, allowed.stdout)
            refused = await asyncio.to_thread(run_gate, name, runs, pg.url, TOKEN,
                                              {"mesh.yaml": mesh_doc("busy"), "app.yaml": APP})
            assert refused.returncode == 1, (name, refused.stdout, refused.stderr)
            assert "DENY" in refused.stdout and "busy-1" in refused.stdout, \
                (name, refused.stdout)
            # A gate that cannot ask fails closed, and not as a refusal.
            broken = await asyncio.to_thread(run_gate, name, runs, pg.url, "not-the-token",
                                             {"mesh.yaml": mesh_doc("idle")})
            assert broken.returncode not in (0, 1), (name, broken.returncode, broken.stderr)
            assert "token" in (broken.stdout + broken.stderr).lower(), (name, broken.stderr)
    finally:
        await asyncio.to_thread(pg.close)
