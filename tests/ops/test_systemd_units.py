"""systemd/: the unit files, proven with the real systemd-analyze.

`systemd-analyze verify` refuses a unit whose ExecStart= binary does not
exist, and /usr/bin/passguard is not installed where the tests run. So each
test verifies a copy of the unit in a temporary directory in which only that
path is replaced by an executable that exists (this Python interpreter);
every other line is the shipped file, byte for byte. The template unit is
copied under an instance name (passguard-agent@web-1.service) so that %i is
expanded as systemd would.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ops.promql import REPO, require_tool, run

SYSTEMD = REPO / "systemd"
MAIN = SYSTEMD / "passguard.service"
AGENT = SYSTEMD / "passguard-agent@.service"
SHIPPED_BINARY = "/usr/bin/passguard"
MAX_EXPOSURE = 2.0

HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "SystemCallArchitectures": "native",
    "CapabilityBoundingSet": "",
    "LockPersonality": "yes",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "ProtectProc": "invisible",
    "MemoryDenyWriteExecute": "yes",
    "UMask": "0077",
    "DynamicUser": "yes",
}


def directives(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, in order (keys may repeat)."""
    section = ""
    found: list[tuple[str, str, str]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        found.append((section, key.strip(), value.strip()))
    return found


def service(path: Path) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for section, key, value in directives(path):
        if section == "Service":
            values.setdefault(key, []).append(value)
    return values


@pytest.fixture
def unit_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "units"
    directory.mkdir()
    yield directory


def analyzable_copy(unit: Path, directory: Path, name: str) -> Path:
    text = unit.read_text(encoding="utf-8")
    assert f"ExecStart={SHIPPED_BINARY} " in text
    copy = directory / name
    copy.write_text(
        text.replace(f"ExecStart={SHIPPED_BINARY} ", f"ExecStart={sys.executable} "),
        encoding="utf-8",
    )
    return copy


def verify(unit: Path) -> None:
    analyze = require_tool("systemd-analyze")
    result = run([analyze, "verify", "--man=no", str(unit)])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # verify exits 0 on warnings such as "Unknown key": none may concern our unit.
    ours = [line for line in output.splitlines() if unit.name in line or str(unit) in line]
    assert ours == [], "\n".join(ours)


def exposure(unit: Path) -> float:
    analyze = require_tool("systemd-analyze")
    result = run([analyze, "security", "--offline=true", "--no-pager", str(unit)])
    output = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", output)
    assert match, f"no exposure figure in:\n{output}"
    return float(match.group(1))


def test_main_unit_verifies(unit_dir: Path) -> None:
    verify(analyzable_copy(MAIN, unit_dir, "passguard.service"))


def test_agent_unit_verifies(unit_dir: Path) -> None:
    verify(analyzable_copy(AGENT, unit_dir, "passguard-agent@web-1.service"))


def test_verify_catches_a_broken_unit(unit_dir: Path) -> None:
    # The check above would be worthless if verify accepted anything.
    broken = analyzable_copy(MAIN, unit_dir, "passguard.service")
    broken.write_text(broken.read_text() + "ProtectSytem=strict\n")
    with pytest.raises(AssertionError, match="Unknown key"):
        verify(broken)


def test_main_unit_exposure_is_at_most_2() -> None:
    assert exposure(MAIN) <= MAX_EXPOSURE


def test_agent_unit_exposure_is_at_most_2(unit_dir: Path) -> None:
    assert (
        exposure(analyzable_copy(AGENT, unit_dir, "passguard-agent@web-1.service")) <= MAX_EXPOSURE
    )


@pytest.mark.parametrize("unit", [MAIN, AGENT], ids=lambda p: p.name)
def test_notify_reload_watchdog_contract(unit: Path) -> None:
    values = service(unit)
    assert values["Type"] == ["notify"]
    assert values["NotifyAccess"] == ["main"]
    assert values["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert values["WatchdogSec"] == ["30s"]
    assert values["Restart"] == ["on-failure"]
    assert values["ConfigurationDirectory"] == ["passguard"]
    assert values["StateDirectory"]


def test_exec_start_lines() -> None:
    assert service(MAIN)["ExecStart"] == ["/usr/bin/passguard run -c /etc/passguard/passguard.yaml"]
    assert service(AGENT)["ExecStart"] == ["/usr/bin/passguard run -c /etc/passguard/agent-%i.yaml"]
    assert service(MAIN)["StateDirectory"] == ["passguard"]


@pytest.mark.parametrize("unit", [MAIN, AGENT], ids=lambda p: p.name)
def test_hardening(unit: Path) -> None:
    values = service(unit)
    for key, expected in HARDENING.items():
        assert values.get(key) == [expected], f"{unit.name}: {key}={values.get(key)}"
    assert "@system-service" in values["SystemCallFilter"]
    # Deliberately absent: ProcSubset=pid hides /proc/stat, and prometheus_client's
    # ProcessCollector then drops every process_* metric (see the unit's comment).
    assert "ProcSubset" not in values


def test_agent_can_reach_the_admin_socket_group() -> None:
    values = service(AGENT)
    assert values["SupplementaryGroups"] == ["kuma-dp"]
    # Two agents must not share a state directory.
    assert "%i" in values["StateDirectory"][0]


# MemoryDenyWriteExecute=yes kills (or, with SystemCallErrorNumber=, fails) any
# attempt to map memory writable and executable, or to make memory executable
# later. CPython without a JIT never does; this proves it for passguard's whole
# stack (event loop, aiohttp server and client, TLS, SQLite, YAML, the
# Prometheus client) with the kernel's own enforcement of the same rule
# (prctl PR_SET_MDWE, Linux 6.3+), which, like systemd's flag, survives execve.
_MDWE_WORKLOAD = r"""
import asyncio, ctypes, mmap, os, sqlite3, ssl, tempfile
assert ctypes.CDLL(None).prctl(66, 0, 0, 0, 0) == 1, "MDWE not inherited"
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except PermissionError:
    pass
else:
    raise SystemExit("a writable+executable mapping was allowed: MDWE is not in force")

import aiohttp, apscheduler, yaml
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, generate_latest
import passguard, passguard.sdnotify

async def main():
    async def hello(request):
        return web.Response(text="ok")
    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/") as response:
            assert await response.text() == "ok"
    await runner.cleanup()

asyncio.run(main())
ssl.create_default_context()
with tempfile.TemporaryDirectory() as tmp:
    db = sqlite3.connect(os.path.join(tmp, "state.db"))
    db.execute("create table t (x)")
    db.execute("insert into t values (1)")
    db.commit()
    db.close()
yaml.safe_load("a: 1")
registry = CollectorRegistry()
Counter("x", "x", registry=registry).inc()
generate_latest(registry)
print("MDWE-OK")
"""

_MDWE_LAUNCHER = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    print("NO-MDWE", ctypes.get_errno())
    sys.exit(0)
os.execv(sys.executable, [sys.executable, "-c", sys.argv[1]])
"""


def test_python_stack_runs_under_memory_deny_write_execute() -> None:
    assert service(MAIN)["MemoryDenyWriteExecute"] == ["yes"]
    result = run([sys.executable, "-c", _MDWE_LAUNCHER, _MDWE_WORKLOAD], cwd=REPO, timeout=60)
    if result.stdout.startswith("NO-MDWE"):
        pytest.skip(f"this kernel has no PR_SET_MDWE (Linux 6.3+): {result.stdout.strip()}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("MDWE-OK"), result.stdout + result.stderr
