"""The one-shot ``check -c`` shows dataplanes read / total on a terminal
(stderr) and writes nothing of it when stderr is not one (pipelines)."""

from __future__ import annotations

import asyncio
import io
import sys
from pathlib import Path

import pytest

from passguard import cli
from passguard.cli_progress import Progress
from tests.kuma_cp import FakeKumaCP

MESH_OFF = "type: Mesh\nname: default\nnetworking:\n  outbound:\n    passthrough: false\n"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_counts_each_phase_on_a_terminal() -> None:
    out = Terminal()
    p = Progress(out)
    p.start(2, "stats", "destinations")
    p.done("stats")
    p.done("stats")
    p.done("destinations")
    p.done("destinations")
    p.clear()
    text = out.getvalue()
    assert "dataplanes read: stats 0/2, destinations 0/2" in text
    assert "dataplanes read: stats 2/2, destinations 2/2" in text
    assert text.endswith("\r\033[K")  # the line is gone before the verdict is printed


def test_progress_is_silent_off_a_terminal() -> None:
    out = io.StringIO()
    p = Progress(out)
    p.say("listing dataplanes…")
    p.start(3, "stats")
    p.done("stats")
    p.clear()
    assert out.getvalue() == ""


@pytest.mark.parametrize("tty", [True, False])
async def test_standalone_check_shows_progress_only_on_a_terminal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tty: bool) -> None:
    async with FakeKumaCP() as cp:
        cp.add_mesh("default")
        for i in range(3):
            cp.add_dataplane("default", f"web-{i}")  # no Envoy behind: reads fail, still counted
        cfg = tmp_path / "pg.yaml"
        cfg.write_text(f"sources:\n  - kind: kuma\n    url: {cp.url}\n")
        doc = tmp_path / "mesh.yaml"
        doc.write_text(MESH_OFF)
        err = Terminal() if tty else io.StringIO()
        monkeypatch.setattr(sys, "stderr", err)
        monkeypatch.setattr(sys, "stdout", io.StringIO())
        code = await asyncio.to_thread(cli.main, ["check", "-c", str(cfg), "-f", str(doc)])
    assert code in (0, 1)
    shown = err.getvalue()
    if tty:
        assert "dataplanes read: stats 3/3, destinations 3/3" in shown
    else:
        assert "dataplanes read" not in shown and "\r" not in shown
