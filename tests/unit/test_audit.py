"""The audit group commit: many requests, one transaction, each answered only
once its own entries are on disk; a failure fails exactly the requests it hit."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from passguard import audit
from passguard.audit import AuditEntry, AuditLog, audit_path


def entry(n: int, evidence: dict[str, Any] | None = None) -> AuditEntry:
    return AuditEntry(source="check", requester="ci", mesh=f"m{n}", mode="enforce",
                      verdict="allow", reasons=[f"r{n}"], documents=[], evidence=evidence)


def rows(path: Path) -> list[tuple[int, str]]:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT id, mesh FROM audit ORDER BY id").fetchall()
    finally:
        db.close()


def test_requests_waiting_together_share_one_transaction(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    log = AuditLog(tmp_path / "a.db")
    batches: list[int] = []
    first_started, release = threading.Event(), threading.Event()
    real = AuditLog._write

    def write(self: AuditLog, batch: Any) -> None:
        batches.append(len(batch))
        if len(batches) == 1:  # hold the first commit while 50 more requests queue up
            first_started.set()
            release.wait(10)
        real(self, batch)

    monkeypatch.setattr(AuditLog, "_write", write)

    async def main() -> list[AuditEntry]:
        first = entry(0)
        t0 = asyncio.ensure_future(log.record([first]))
        assert await asyncio.to_thread(first_started.wait, 10)
        rest = [entry(n) for n in range(1, 51)]
        waiting = [asyncio.ensure_future(log.record([e])) for e in rest]
        await asyncio.sleep(0.05)
        assert not any(w.done() for w in waiting)  # nothing answered before its commit
        release.set()
        await asyncio.gather(t0, *waiting)
        return [first, *rest]

    entries = asyncio.run(main())
    log.close()
    assert batches == [1, 50]
    assert [e.id for e in entries] == list(range(1, 52))
    assert rows(tmp_path / "a.db") == [(n + 1, f"m{n}") for n in range(51)]


def test_a_failed_commit_fails_its_batch_and_the_next_one_writes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = AuditLog(tmp_path / "a.db")
    real = AuditLog._write
    calls = 0

    def write(self: AuditLog, batch: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise sqlite3.OperationalError("database or disk is full")
        real(self, batch)

    monkeypatch.setattr(AuditLog, "_write", write)

    async def main() -> None:
        with pytest.raises(sqlite3.OperationalError, match="disk is full"):
            await log.record([entry(1)])
        await log.record([entry(2)])

    asyncio.run(main())
    log.close()
    assert rows(tmp_path / "a.db") == [(1, "m2")]


def test_an_entry_that_cannot_be_serialised_fails_only_its_request(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.db")

    async def main() -> list[BaseException | None]:
        results = await asyncio.gather(
            log.record([entry(1)]), log.record([entry(2, {"bad": {1, 2}})]),
            log.record([entry(3)]), return_exceptions=True)
        return list(results)

    ok1, bad, ok3 = asyncio.run(main())
    log.close()
    assert ok1 is None and ok3 is None
    assert isinstance(bad, TypeError) and "set" in str(bad)
    assert [m for _, m in rows(tmp_path / "a.db")] == ["m1", "m3"]


def test_close_finishes_queued_writes_and_refuses_new_ones(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "MAX_BATCH", 3)
    log = AuditLog(tmp_path / "a.db")

    async def main() -> None:
        await asyncio.gather(*(log.record([entry(n)]) for n in range(10)))
        await asyncio.to_thread(log.close)
        with pytest.raises(sqlite3.ProgrammingError, match="closed"):
            await log.record([entry(99)])

    asyncio.run(main())
    assert len(rows(tmp_path / "a.db")) == 10


def _write(path: Path, *meshes: int) -> None:
    log = AuditLog(path)
    for n in meshes:
        asyncio.run(log.record([entry(n)]))
    log.close()


def _old_layout(state: Path, *meshes: int) -> None:
    _write(state, *meshes)  # before: the audit table inside the state file


def _tables(path: Path) -> list[str]:
    db = sqlite3.connect(path)
    try:
        return [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    finally:
        db.close()


def test_an_audit_table_in_the_state_database_is_moved_to_its_own_file(
        tmp_path: Path) -> None:
    state = tmp_path / "state.db"
    assert audit_path(state) == tmp_path / "state-audit.db"
    _old_layout(state, 1, 2)
    log = AuditLog(audit_path(state), legacy=state)
    asyncio.run(log.record([entry(3)]))
    log.close()
    assert rows(audit_path(state)) == [(1, "m1"), (2, "m2"), (3, "m3")]
    assert "audit" not in _tables(state)
    AuditLog(audit_path(state), legacy=state).close()  # nothing left: no change
    assert rows(audit_path(state)) == [(1, "m1"), (2, "m2"), (3, "m3")]


def test_a_move_repeated_after_a_crash_duplicates_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state.db"
    _old_layout(state, 1, 2)
    AuditLog(audit_path(state)).close()
    db = sqlite3.connect(audit_path(state))  # the copy committed, the drop not
    db.execute("ATTACH DATABASE ? AS legacy", (str(state),))
    db.execute("INSERT INTO main.audit SELECT * FROM legacy.audit")
    db.commit()
    db.close()
    AuditLog(audit_path(state), legacy=state).close()
    assert rows(audit_path(state)) == [(1, "m1"), (2, "m2")]
    assert "audit" not in _tables(state)


def test_entries_an_old_version_wrote_after_the_move_are_kept(tmp_path: Path) -> None:
    """A downgrade writes to the old table again; the next upgrade keeps both
    sets, although their ids collide."""
    state = tmp_path / "state.db"
    _write(audit_path(state), 1, 2)
    _old_layout(state, 7, 8)  # ids 1 and 2 as well
    AuditLog(audit_path(state), legacy=state).close()
    assert rows(audit_path(state)) == [(1, "m1"), (2, "m2"), (3, "m7"), (4, "m8")]


def test_retention_deletes_in_chunks_and_lets_answers_through(tmp_path: Path) -> None:
    """Exactly the entries older than the cut go, oldest first, a chunk per
    transaction; a decision recorded while a long prune runs is written
    between its chunks instead of waiting for the whole prune."""
    log = AuditLog(tmp_path / "a.db")
    old = [entry(n) for n in range(3000)]
    for n, e in enumerate(old):
        e.time = 1000.0 + n
    keep = entry(9999)
    keep.time = 5000.0

    async def fill() -> None:
        await log.record([*old, keep])

    asyncio.run(fill())
    done = threading.Event()
    removed: list[int] = []

    def prune() -> None:
        # 3000 chunks of one with 2 ms rests: seconds, against one record.
        removed.append(log.prune(4000.0 - 1000.0, chunk=1, pause=0.002))
        done.set()

    pruner = threading.Thread(target=prune)
    pruner.start()

    async def during() -> bool:
        await asyncio.sleep(0.05)
        late = entry(10_000)
        await log.record([late])
        return done.is_set()

    prune_was_over = asyncio.run(during())
    pruner.join(60)
    assert not prune_was_over  # the record did not wait for the prune
    assert removed == [2000]
    left = rows(tmp_path / "a.db")
    assert [m for _, m in left][:2] == ["m2000", "m2001"] and len(left) == 1000 + 2
    assert {"m9999", "m10000"} <= {m for _, m in left}
    assert log.prune(4000.0 - 1000.0) == 0
    log.close()


def test_evidence_already_encoded_is_stored_as_it_is(tmp_path: Path) -> None:
    """The decision's evidence text (encoded once per snapshot) is what the
    row holds, and reads back as the evidence; without it the dict is encoded."""
    log = AuditLog(tmp_path / "a.db")
    given = entry(1, {"dataplanes": {"total": 2}})
    given.evidence_json = '{"dataplanes": {"total": 2}}'
    plain = entry(2, {"dataplanes": {"total": 3}})
    asyncio.run(log.record([given, plain]))
    db = sqlite3.connect(tmp_path / "a.db")
    try:
        stored = db.execute("SELECT evidence FROM audit ORDER BY id").fetchall()
    finally:
        db.close()
    assert stored == [('{"dataplanes": {"total": 2}}',), ('{"dataplanes": {"total": 3}}',)]
    newest, _ = log.query()
    assert [e.evidence for e in newest] == [{"dataplanes": {"total": 3}},
                                          {"dataplanes": {"total": 2}}]
    log.close()


# -- bounded fields, size, pages (issue 13, finding 2) --------------------------------------


def _big(char: str, size: int = 256 * 1024) -> str:
    return char * size


def test_request_fields_are_capped_with_the_digest_of_the_whole_value(tmp_path: Path) -> None:
    """User name, object name, mesh name and break-glass reason of 256 KiB
    each were stored whole; now each is capped (253 / 256 / 1 KiB bytes)
    and ends with the SHA-256 of what was sent."""
    import hashlib

    log = AuditLog(tmp_path / "a.db")
    user, name, mesh, reason = _big("u"), _big("n"), _big("m"), _big("r")
    e = AuditEntry(source="admission", requester=user, mesh=mesh, mode="enforce",
                   verdict="allow", reasons=[_big("x")] * 500,
                   documents=[{"kind": "Mesh", "name": name, "digest": "d"}],
                   break_glass=reason, peer="127.0.0.1")
    asyncio.run(log.record([e]))
    [got], _ = log.query()
    log.close()
    assert e.id == got.id is not None
    assert len(got.requester.encode()) <= 512  # the user name, and who vouched for it
    assert got.mesh is not None and len(got.mesh.encode()) <= 253
    assert len(got.documents[0]["name"].encode()) <= 253
    assert got.break_glass is not None and len(got.break_glass.encode()) <= 1024
    assert got.requester.endswith(f"[sha256:{hashlib.sha256(user.encode()).hexdigest()}]")
    assert got.documents[0]["name"].endswith(
        f"[sha256:{hashlib.sha256(name.encode()).hexdigest()}]")
    assert len(got.reasons) == audit.MAX_REASONS + 1
    assert all(len(r.encode()) <= 1024 for r in got.reasons)
    assert got.peer == "127.0.0.1" and got.to_json()["peer"] == "127.0.0.1"
    # The whole entry is now a few tens of KB, where it was over a megabyte.
    assert len(str(got.to_json())) < 100_000


def test_size_pruning_deletes_the_oldest_until_under_max_bytes(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.db")
    evidence = {"pad": "e" * 4000}
    asyncio.run(log.record([entry(n, evidence) for n in range(2000)]))
    used = log.used_bytes()
    assert used > 8 * 1024 * 1024
    assert log.prune_to_size(used) == 0  # within the budget: nothing goes
    removed = log.prune_to_size(4 * 1024 * 1024, pause=0)
    assert log.used_bytes() <= 4 * 1024 * 1024
    left = rows(tmp_path / "a.db")
    log.close()
    assert removed == 2000 - len(left) and 0 < len(left) < 1200
    # Oldest first: what is left is the newest, without a gap.
    assert [m for _, m in left] == [f"m{n}" for n in range(2000 - len(left), 2000)]


def test_audit_pages_are_bounded_in_bytes(tmp_path: Path) -> None:
    """limit=1000 of 100 KB entries was a 100 MB page; now a page stops past
    max_bytes and says where the next one starts, and every entry comes on
    exactly one page."""
    log = AuditLog(tmp_path / "a.db")
    asyncio.run(log.record([entry(n, {"pad": "e" * 100_000}) for n in range(30)]))
    seen: list[str | None] = []
    cursor = None
    pages = 0
    while True:
        page, cursor = log.query(limit=1000, before_id=cursor, max_bytes=500_000)
        pages += 1
        assert 1 <= len(page) <= 5
        seen += [e.mesh for e in page]
        if cursor is None:
            break
    log.close()
    assert seen == [f"m{n}" for n in reversed(range(30))] and pages >= 6


def test_an_audit_from_before_the_peer_gets_the_column(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    db = sqlite3.connect(path)
    db.executescript(audit._SCHEMA.replace(",\n    peer TEXT", ""))
    db.execute("INSERT INTO audit (time, source, requester, mode, verdict, dry_run, reasons, "
               "documents) VALUES (1, 'check', 'ci', 'enforce', 'allow', 0, '[]', '[]')")
    db.commit()
    db.close()
    log = AuditLog(path)
    asyncio.run(log.record([AuditEntry(source="check", requester="ci", mesh="m", mode="enforce",
                                       verdict="allow", reasons=[], documents=[],
                                       peer="192.0.2.1")]))
    page, _ = log.query()
    log.close()
    assert [e.peer for e in page] == ["192.0.2.1", None]


def test_enforce_applies_the_retention_then_the_size_budget(tmp_path: Path) -> None:
    """The daemon's retention job (AuditLog.enforce): entries older than
    ``audit.retention`` go first, then the oldest until ``audit.max_bytes``;
    it says how many each removed (the passguard_audit_pruned_total labels)
    as each step ends."""
    log = AuditLog(tmp_path / "a.db")
    evidence = {"pad": "e" * 4000}
    now = time.time()
    batch = [entry(n, evidence) for n in range(1500)]
    for n, e in enumerate(batch):
        e.time = now - (7200.0 if n < 500 else 10.0)  # 500 past a one-hour retention
    asyncio.run(log.record(batch))
    told: list[tuple[str, int]] = []
    log.enforce(3600.0, 2 * 1024 * 1024, lambda reason, n: told.append((reason, n)))
    assert [reason for reason, _ in told] == ["age", "size"]
    (_, aged), (_, sized) = told
    left = rows(tmp_path / "a.db")
    assert log.used_bytes() <= 2 * 1024 * 1024
    log.close()
    assert aged == 500 and sized == 1000 - len(left) and 0 < len(left) < 1000
    assert [m for _, m in left] == [f"m{n}" for n in range(1500 - len(left), 1500)]
