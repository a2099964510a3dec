"""The state directory fails under a running daemon: full, read-only, locked.

``state.path`` lives on a tiny tmpfs (full disk) or a loop-mounted ext4 that
a simulated disk error turns read-only (root is needed to mount; ``chmod``
does not stop root; where mounting is not allowed those tests skip).
Meanwhile the daemon must stay healthy, keep
scraping and answering from the evidence in memory, count every failed write
(``passguard_state_write_failures_total``), refuse enforce-mode decisions it
cannot audit (they are ``deny`` with the reason), and write again once it can.
The database must pass ``PRAGMA integrity_check`` and restore on a restart.

A database locked by another process (a backup, an open ``sqlite3`` shell)
needs no mount: that test runs everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from passguard.app import Daemon
from passguard.audit import audit_path

from .conftest import DaemonFactory
from .harness import api, check, dataplanes, healthy, metrics, new_daemon, target
from .hostile import HostileProxies

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]


@contextlib.contextmanager
def tiny_fs(path: Path, size: str = "1m") -> Iterator[Path]:
    """A tmpfs of ``size`` at ``path``; skipped where mounting is not allowed."""
    path.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here ({exc}); test_locked_database covers "
                    "failing writes without a mount")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True,
                       timeout=10)


def fill(directory: Path) -> Path:
    """Write until the filesystem is full (ENOSPC); return the filler file."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as f:
        try:
            for _ in range(100_000):  # bounded: a tmpfs of 1 MiB fills after 256
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        else:
            raise AssertionError(f"{directory} did not fill up")
    return filler


async def _failures(d: Daemon) -> tuple[float, float]:
    m = await metrics(d)
    return (m[("passguard_state_write_failures_total", frozenset())],
            m[("passguard_audit_write_failures_total", frozenset())])


def _sources(hostile: HostileProxies) -> list[dict[str, object]]:
    return [{"kind": "envoy", "targets": [
        target(hostile.ctl_url("busy-1"), "busy", "busy-1"),
        target(hostile.ctl_url("idle-1"), "idle", "idle-1")]}]


async def _audit_count(d: Daemon) -> int:
    status, body = await api(d, "GET", "/v1/audit?limit=1000")
    assert status == 200, body
    return len(body["entries"])


async def test_full_disk_then_space_back(tmp_path: Path, hostile: HostileProxies) -> None:
    with tiny_fs(tmp_path / "state") as state:
        d = await new_daemon(tmp_path, _sources(hostile),
                             state={"path": str(state / "state.db")})
        try:
            await d.cycle()
            hostile.control("busy-1", cx_total=3)
            await d.cycle()
            assert (await check(d, "idle"))["verdict"] == "allow"
            assert await _failures(d) == (0.0, 0.0)

            filler = fill(state)
            for _ in range(3):  # a WAL with room left may absorb a cycle or two
                hostile.control("busy-1").cx_total += 2
                await d.cycle()
            failed = await _failures(d)
            assert failed[0] >= 1, failed
            assert await healthy(d)
            # Evidence keeps flowing in memory: the gate still sees the traffic.
            assert (await dataplanes(d, "busy"))["busy-1"]["connections"] == 9
            assert (await check(d, "busy"))["verdict"] == "deny"
            assert (await dataplanes(d, "idle"))["idle-1"]["state"] == "fresh"
            # Enforce mode must not decide unrecorded: the idle mesh is refused, saying why.
            idle = await check(d, "idle")
            assert idle["verdict"] == "deny", idle
            assert any("audit log cannot be written" in w for w in idle["warnings"]), idle
            assert (await _failures(d))[1] > failed[1]

            filler.unlink()  # space is back: writes and audited allows again
            await d.cycle()
            again = await _failures(d)
            await d.cycle()
            await d.cycle()
            assert (await _failures(d))[0] == again[0], "writes still fail"
            audited = await _audit_count(d)
            assert (await check(d, "idle"))["verdict"] == "allow"
            assert await _audit_count(d) == audited + 1
        finally:
            await d.stop()
        _assert_intact(state / "state.db")
        d2 = await new_daemon(tmp_path, _sources(hostile), state={"path": str(state / "state.db")})
        try:
            status, _ = await api(d2, "GET", "/-/ready")
            assert status == 200  # restored, before any cycle
            assert (await check(d2, "busy"))["verdict"] == "deny"
        finally:
            await d2.stop()


@contextlib.contextmanager
def ext4_fs(tmp: Path, size_mb: int = 16) -> Iterator[tuple[Path, str]]:
    """A loop-mounted ext4 with ``errors=remount-ro``: (mount point, loop device name)."""
    image, mnt = tmp / "disk.img", tmp / "disk"
    mnt.mkdir()
    with image.open("wb") as f:
        f.truncate(size_mb * 1024 * 1024)
    try:
        subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True,
                       timeout=30)
        subprocess.run(["mount", "-o", "loop,errors=remount-ro", str(image), str(mnt)],
                       check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot loop-mount an ext4 image here ({exc})")
    try:
        source = subprocess.run(["findmnt", "-n", "-o", "SOURCE", str(mnt)], check=True,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        yield mnt, Path(source).name
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True, timeout=10)


def _repair(image: Path, mnt: Path) -> None:
    """What an operator does after a disk error: unmount, fsck, mount again."""
    subprocess.run(["umount", str(mnt)], check=True, capture_output=True, timeout=10)
    subprocess.run(["e2fsck", "-fy", str(image)], check=False, capture_output=True, timeout=60)
    subprocess.run(["mount", "-o", "loop,errors=remount-ro", str(image), str(mnt)],
                   check=True, capture_output=True, timeout=10)


def _assert_intact(path: Path) -> None:
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        db.close()


async def test_disk_turns_read_only(tmp_path: Path, hostile: HostileProxies) -> None:
    """A disk error remounts the filesystem read-only (ext4 ``errors=remount-ro``,
    triggered through ``/sys/fs/ext4/<dev>/trigger_fs_error``): the daemon goes
    on from memory; after a repair (fsck) and a restart it restores the last
    good state."""
    with ext4_fs(tmp_path) as (mnt, dev):
        trigger = Path(f"/sys/fs/ext4/{dev}/trigger_fs_error")
        if not await asyncio.to_thread(trigger.exists):
            pytest.skip(f"{trigger} does not exist (kernel without it)")
        path = mnt / "state.db"
        d = await new_daemon(tmp_path, _sources(hostile), state={"path": str(path)})
        try:
            await d.cycle()
            hostile.control("busy-1", cx_total=3)
            await d.cycle()
            await asyncio.to_thread(trigger.write_text, "passguard reliability test\n")
            hostile.control("busy-1", cx_total=5)
            await d.cycle()
            assert (await _failures(d))[0] >= 1
            assert await healthy(d)
            assert (await dataplanes(d, "busy"))["busy-1"]["connections"] == 5
            idle = await check(d, "idle")
            assert idle["verdict"] == "deny" and any(
                "audit log cannot be written" in w for w in idle["warnings"]), idle
        finally:
            await d.stop()
        await asyncio.to_thread(_repair, tmp_path / "disk.img", mnt)
        _assert_intact(path)
        d2 = await new_daemon(tmp_path, _sources(hostile), state={"path": str(path)})
        try:
            assert (await check(d2, "busy"))["verdict"] == "deny"
            await d2.cycle()
            assert (await check(d2, "idle"))["verdict"] == "allow"
        finally:
            await d2.stop()


async def test_evidence_of_a_failed_write_survives_a_restart(
        tmp_path: Path, hostile: HostileProxies) -> None:
    with tiny_fs(tmp_path / "state") as state:
        path = state / "state.db"
        d = await new_daemon(tmp_path, _sources(hostile), state={"path": str(path)})
        try:
            await d.cycle()  # busy-1 reads zero: covered, idle so far
            filler = fill(state)
            hostile.control("busy-1", cx_total=7)  # 7 connections while the disk is full
            for _ in range(3):  # 3 tries: a WAL with room left may take a cycle or two
                await d.cycle()
            assert (await _failures(d))[0] >= 1
            assert (await check(d, "busy"))["verdict"] == "deny"
            filler.unlink()
            await d.cycle()  # writes work again; no new traffic
            assert (await check(d, "busy"))["verdict"] == "deny"
        finally:
            await d.stop()
        d2 = await new_daemon(tmp_path, _sources(hostile), state={"path": str(path)})
        try:
            await d2.cycle()
            body = await check(d2, "busy")
            assert body["verdict"] == "deny", body["decisions"][0]["reasons"]
        finally:
            await d2.stop()


async def test_locked_database(make_daemon: DaemonFactory, hostile: HostileProxies,
                               tmp_path: Path) -> None:
    """Another process holds the write lock (``BEGIN EXCLUSIVE``) of the state
    database: the cycle's write waits SQLite's busy timeout (5 s), then fails
    and is counted; scraping, /-/healthy and the gate keep going meanwhile, and
    decisions are audited at once (the audit has a file of its own). Then the
    audit file is locked: a decision waits the busy timeout and, unrecorded,
    becomes a deny that says why."""
    d = await make_daemon(_sources(hostile))
    await d.cycle()
    holder = sqlite3.connect(tmp_path / "state.db", isolation_level=None, timeout=1)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        hostile.control("busy-1", cx_total=4)
        start = time.monotonic()
        cycle = asyncio.create_task(d.cycle())
        await asyncio.sleep(0.5)
        # Still answering, and deciding, while the cycle's write waits.
        assert await healthy(d)
        status, _ = await api(d, "GET", "/v1/meshes")
        assert status == 200
        body = await check(d, "idle")
        # The only warning: no control plane, so the document was judged alone.
        assert body["verdict"] == "allow", body
        assert all("no control plane lists this mesh" in w for w in body["warnings"]), body
        assert time.monotonic() - start < 4.0
        await cycle
        waited = time.monotonic() - start
        assert 4.0 < waited < 9.0, waited
        assert await _failures(d) == (1.0, 0.0)
        # The scrape itself was recorded in memory.
        assert (await dataplanes(d, "busy"))["busy-1"]["connections"] == 4
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    holder = sqlite3.connect(audit_path(tmp_path / "state.db"), isolation_level=None, timeout=1)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        start = time.monotonic()
        body = await check(d, "idle")
        assert 4.0 < time.monotonic() - start < 9.0
        assert body["verdict"] == "deny"
        assert any("database is locked" in w for w in body["warnings"]), body["warnings"]
        assert await _failures(d) == (1.0, 1.0)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    await d.cycle()
    assert (await _failures(d))[0] == 1.0
    assert (await check(d, "idle"))["verdict"] == "allow"


async def test_a_failed_write_names_its_cause(tmp_path: Path, hostile: HostileProxies) -> None:
    with tiny_fs(tmp_path / "state") as state:
        d = await new_daemon(tmp_path, _sources(hostile), state={"path": str(state / "state.db")})
        try:
            await d.cycle()
            fill(state)
            body: dict[str, object] = {}
            for _ in range(20):  # the audit WAL fills up within a few entries
                body = await check(d, "idle")
                if body["verdict"] == "deny":
                    break
            warnings = " ".join(body["warnings"])  # type: ignore[arg-type]
            assert "cannot be written" in warnings, body
            assert "full" in warnings, warnings
        finally:
            await d.stop()
