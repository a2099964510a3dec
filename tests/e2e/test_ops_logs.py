"""A real daemon with ``log.format: json``: every line it writes is one JSON
object, a decision's line carries its audit id and the caller's request id,
and ``passguard audit`` finds that decision."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.e2e.procs import REPO, Passguard, envoy_target, free_port, http, passguard_config

MESH_OFF = b"type: Mesh\nname: default\nnetworking:\n  outbound:\n    passthrough: false\n"


def test_json_logs_and_the_audit_cli(tmp_path: Path) -> None:
    # An admin port nobody listens on: the target fails, the gate refuses for
    # insufficient data, and the decision is audited all the same.
    target = envoy_target(f"http://127.0.0.1:{free_port()}", "default", "web-1")
    cfg = passguard_config(tmp_path, [target], log={"format": "json"})
    pg = Passguard(cfg, tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "PASSGUARD_TOKEN")}
    pg.start(env=env)
    try:
        status, _, text = http(pg.url + "/v1/check", method="POST", body=MESH_OFF,
                               headers={"Content-Type": "application/yaml",
                                        "X-Request-Id": "deploy-42"})
        assert status == 200, text
        deadline = time.monotonic() + 10
        lines: list[dict[str, object]] = []
        while time.monotonic() < deadline:  # the writer thread writes soon after
            raw = pg.log.read_text(encoding="utf-8").splitlines()
            lines = [json.loads(line) for line in raw if line.strip()]
            if any("decision_id" in x for x in lines):
                break
            time.sleep(0.05)
        [decision] = [x for x in lines if "decision_id" in x]
        assert decision["request_id"] == "deploy-42"
        assert decision["level"] == "info" and decision["logger"] == "passguard.web.routes"
        assert str(decision["message"]).startswith("check by ")
        assert all({"time", "level", "logger", "message"} <= x.keys() for x in lines)

        done = subprocess.run([sys.executable, "-m", "passguard", "audit", "--server", pg.url,
                               "--since", "1h", "--mesh", "default", "-o", "json"],
                              capture_output=True, text=True, timeout=30, cwd=REPO, env=env,
                              check=False)
        assert done.returncode == 0, done.stderr
        ids = [e["id"] for e in json.loads(done.stdout)["entries"]]
        assert ids == [decision["decision_id"]]
    finally:
        pg.stop()
