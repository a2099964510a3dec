"""The audit log: every gate decision, written before the answer is sent.

SQLite in WAL mode with ``synchronous=FULL``: once ``record`` returns, the
entry survives a SIGKILL of the daemon and a power cut. It has a database file
of its own next to the state database (``audit_path``): SQLite allows one
writer per file, WAL or not, so in the same file every decision waited for a
scrape cycle's write (and its checkpoint) to finish, tens of milliseconds
under load and up to the 5 s busy timeout on a slow disk. An audit table left
in the state database by an older passguard is moved over at start.

Requests record through ``record()``: a group commit. One writer thread takes
every request waiting at that moment and writes them in one transaction, so
one fsync (~1.2 ms on the development disk) serves many decisions instead of
capping the gate at ~850 a second, and the event loop wakes once per batch
instead of once per request. Each request still gets its answer only after
its own entries are on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from passguard.fields import NAME_BYTES, REASON_BYTES, REQUESTER_BYTES, cap, cap_optional

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    source TEXT NOT NULL,
    requester TEXT NOT NULL,
    mesh TEXT,
    mode TEXT NOT NULL,
    verdict TEXT NOT NULL,
    dry_run INTEGER NOT NULL,
    break_glass TEXT,
    reasons TEXT NOT NULL,
    documents TEXT NOT NULL,
    evidence TEXT,
    peer TEXT
);
CREATE INDEX IF NOT EXISTS audit_by_time ON audit (time);
"""
# Constant SQL. The columns in the order of ``_rows``.
_INSERT = ("INSERT INTO audit (time, source, requester, mesh, mode, verdict, dry_run, "
           "break_glass, reasons, documents, evidence, peer) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)")
_SELECT = ("SELECT id, time, source, requester, mesh, mode, verdict, dry_run, break_glass, "
           "reasons, documents, evidence, peer FROM audit")
# An audit table from before the peer was recorded has one column less.
_MOVE = ("INSERT INTO main.audit (id, time, source, requester, mesh, mode, verdict, dry_run, "
         "break_glass, reasons, documents, evidence) SELECT id, time, source, requester, mesh, "
         "mode, verdict, dry_run, break_glass, reasons, documents, evidence FROM legacy.audit")


@dataclass
class AuditEntry:
    source: str  # "check" | "admission"
    requester: str
    mesh: str | None
    mode: str
    verdict: str
    reasons: list[str]
    documents: list[dict[str, str]]
    evidence: dict[str, Any] | None = None
    dry_run: bool = False
    break_glass: str | None = None
    time: float = field(default_factory=time.time)
    id: int | None = None
    #: ``evidence`` already encoded (the decision's), so the writer thread
    #: does not encode it again while holding the GIL.
    evidence_json: str | None = None
    #: The address the request came from (``request.remote``): who really
    #: asked, when ``requester`` is only what the body claims.
    peer: str | None = None

    def bounded(self) -> AuditEntry:
        """This entry with every request-derived field capped (passguard.fields).
        Applied by ``record``, so no caller can store a field whole."""
        docs = [{k: cap(v, NAME_BYTES) if isinstance(v, str) else v for k, v in d.items()}
                for d in self.documents]
        reasons = [cap(r, REASON_BYTES) for r in self.reasons[:MAX_REASONS]]
        if len(self.reasons) > MAX_REASONS:
            reasons.append(f"{len(self.reasons) - MAX_REASONS} more reasons not recorded")
        return replace(self, requester=cap(self.requester, REQUESTER_BYTES),
                       mesh=cap_optional(self.mesh, NAME_BYTES),
                       break_glass=cap_optional(self.break_glass, REASON_BYTES),
                       reasons=reasons, documents=docs,
                       peer=cap_optional(self.peer, NAME_BYTES))

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.time))
            + f".{int(self.time % 1 * 1000):03d}Z",
            "source": self.source,
            "requester": self.requester,
            "mesh": self.mesh,
            "mode": self.mode,
            "verdict": self.verdict,
            "dry_run": self.dry_run,
            "break_glass": self.break_glass,
            "reasons": self.reasons,
            "documents": self.documents,
            "evidence": self.evidence,
            "peer": self.peer,
        }


# Rows of the old table not already here, by content (constant SQL).
_MERGE = (
    "INSERT INTO main.audit (time, source, requester, mesh, mode, verdict, dry_run, "
    "break_glass, reasons, documents, evidence) SELECT time, source, requester, mesh, mode, "
    "verdict, dry_run, break_glass, reasons, documents, evidence FROM legacy.audit AS l "
    "WHERE NOT EXISTS (SELECT 1 FROM main.audit AS m WHERE m.time = l.time AND "
    "m.source = l.source AND m.requester = l.requester AND m.verdict = l.verdict AND "
    "m.reasons = l.reasons AND m.documents = l.documents) ORDER BY l.id"
)

#: Requests written in one transaction at most (bounds a transaction's size).
MAX_BATCH = 256
#: Retention deletes this many entries per transaction (~1.3 MB of pages at
#: the ~2.6 KB an entry takes under load: milliseconds), then rests.
PRUNE_CHUNK = 500
PRUNE_PAUSE = 0.02
#: Reasons kept per entry: a decision about a large mesh may list many.
MAX_REASONS = 64
#: ``GET /v1/audit`` pages stop adding entries past this many bytes of
#: stored text (at least one entry, so a page always moves on).
PAGE_BYTES = 4 * 1024 * 1024
#: The WAL is truncated to this after a checkpoint (see ``AuditLog``).
WAL_LIMIT = 16 * 1024 * 1024

_Row = tuple[Any, ...]
_Waiter = tuple[list["AuditEntry"], asyncio.Future[None], asyncio.AbstractEventLoop]


def _evidence_json(e: AuditEntry) -> str | None:
    if e.evidence is None:
        return None
    return e.evidence_json if e.evidence_json is not None else json.dumps(e.evidence)


def _rows(entries: Iterable[AuditEntry]) -> list[_Row]:
    return [(e.time, e.source, e.requester, e.mesh, e.mode, e.verdict, int(e.dry_run),
             e.break_glass, json.dumps(e.reasons), json.dumps(e.documents),
             _evidence_json(e), e.peer)
            for e in entries]


_Outcome = tuple[asyncio.Future[None], BaseException | None]


def _settle(outcomes: list[_Outcome]) -> None:
    for fut, error in outcomes:
        if fut.done():  # its request went away meanwhile
            continue
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)


def audit_path(state_path: Path) -> Path:
    """``/var/lib/passguard/state.db`` → ``/var/lib/passguard/state-audit.db``."""
    return state_path.with_name(f"{state_path.stem}-audit{state_path.suffix}")


class AuditLog:
    def __init__(self, path: Path, legacy: Path | None = None) -> None:
        """``legacy``: a database that may hold an ``audit`` table from before
        the audit had its own file; its entries are moved here."""
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Waiter | None] = queue.SimpleQueue()
        # Guards only the writer's start and stop: record() takes it on the
        # event loop, so it is never held across a disk write.
        self._state = threading.Lock()
        self._writer: threading.Thread | None = None
        self._closed = False
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                                   timeout=5.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(audit)")}
        if "peer" not in columns:  # an audit written before the peer was recorded
            self._db.execute("ALTER TABLE audit ADD COLUMN peer TEXT")
        # A checkpointed WAL is cut back to this size: otherwise the file
        # keeps its largest size, outside what audit.max_bytes counts.
        self._db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
        if legacy is not None and legacy.exists():
            self._migrate(legacy)

    def _migrate(self, legacy: Path) -> None:
        """Copy, then drop, each its own transaction. Into an empty audit the
        rows go with their ids; otherwise (a crash between copy and drop, or a
        downgrade that wrote to the old table again) only rows not already
        here, compared by content, are added, with new ids. So a repeated move
        duplicates nothing and an entry is never lost."""
        db = self._db
        db.execute("ATTACH DATABASE ? AS legacy", (str(legacy),))
        try:
            found = db.execute("SELECT 1 FROM legacy.sqlite_master WHERE type = 'table' "
                               "AND name = 'audit'").fetchone()
            if found is None:
                return
            db.execute("BEGIN IMMEDIATE")
            try:
                if db.execute("SELECT 1 FROM main.audit LIMIT 1").fetchone() is None:
                    db.execute(_MOVE)
                else:
                    db.execute(_MERGE)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            db.execute("DROP TABLE legacy.audit")
        finally:
            db.execute("DETACH DATABASE legacy")

    def _write(self, batch: Sequence[tuple[list[AuditEntry], list[_Row]]]) -> None:
        """One transaction for every request of the batch: all are written or none."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                for entries, rows in batch:
                    for row, entry in zip(rows, entries, strict=True):
                        cur = db.execute(_INSERT, row)
                        entry.id = cur.lastrowid
                db.execute("COMMIT")
            except BaseException:
                # A failed COMMIT (disk full) has already rolled back: a second
                # ROLLBACK would raise and hide the real cause.
                if db.in_transaction:
                    db.execute("ROLLBACK")
                for entries, _ in batch:
                    for entry in entries:
                        entry.id = None
                raise

    async def record(self, entries: list[AuditEntry]) -> None:
        """Write the entries through the group commit; returns once they are on disk
        (one transaction for them, shared with the requests waiting alongside)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        bounded = [e.bounded() for e in entries]
        with self._state:
            if self._closed:
                raise sqlite3.ProgrammingError("the audit log is closed")
            if self._writer is None:
                self._writer = threading.Thread(target=self._run, name="audit-writer",
                                                daemon=True)
                self._writer.start()
        self._queue.put((bounded, fut, loop))
        await fut
        for e, b in zip(entries, bounded, strict=True):
            e.id = b.id

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            waiters = [first]
            stop = False
            while len(waiters) < MAX_BATCH:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                waiters.append(more)
            self._commit(waiters)
            if stop:
                return

    def _commit(self, waiters: list[_Waiter]) -> None:
        outcome: dict[int, BaseException | None] = {}
        batch = []
        for i, (entries, _, _) in enumerate(waiters):
            try:
                batch.append((entries, _rows(entries)))
            except Exception as exc:  # one request's entries cannot be written: only it fails
                outcome[i] = exc
        try:
            if batch:
                self._write(batch)
        except Exception as exc:
            error: BaseException | None = exc
        else:
            error = None
        # One wake-up of each waiting loop for the whole batch.
        by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
        for i, (_, fut, loop) in enumerate(waiters):
            by_loop.setdefault(loop, []).append((fut, outcome.get(i, error)))
        for loop, outcomes in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                loop.call_soon_threadsafe(_settle, outcomes)

    def query(self, since: float | None = None, mesh: str | None = None,
              verdict: str | None = None, limit: int = 100, before_id: int | None = None,
              max_bytes: int = PAGE_BYTES) -> tuple[list[AuditEntry], int | None]:
        """Newest first; the id to pass as ``before_id`` for the next page, or None.

        At most ``limit`` entries, and no more once their stored text passes
        ``max_bytes`` (the first entry always comes): a page of a thousand
        large entries was megabytes, held in memory twice while encoded."""
        where: list[str] = []
        args: list[object] = []
        if since is not None:
            where.append("time >= ?")
            args.append(since)
        if mesh is not None:
            where.append("mesh = ?")
            args.append(mesh)
        if verdict is not None:
            where.append("verdict = ?")
            args.append(verdict)
        if before_id is not None:
            where.append("id < ?")
            args.append(before_id)
        sql = _SELECT
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(limit + 1)
        rows: list[_Row] = []
        used = 0
        more = False
        with self._lock:
            # Row by row, so rows past the budget are never read.
            for r in self._db.execute(sql, args):
                if len(rows) == limit or (rows and used >= max_bytes):
                    more = True
                    break
                rows.append(r)
                used += sum(len(v) for v in r if isinstance(v, str))
        entries = [AuditEntry(id=r[0], time=r[1], source=r[2], requester=r[3], mesh=r[4],
                              mode=r[5], verdict=r[6], dry_run=bool(r[7]), break_glass=r[8],
                              reasons=json.loads(r[9]), documents=json.loads(r[10]),
                              evidence=json.loads(r[11]) if r[11] else None, peer=r[12])
                   for r in rows]
        nxt = entries[-1].id if more and entries else None
        return entries, nxt

    def prune(self, before: float, chunk: int = PRUNE_CHUNK,
              pause: float = PRUNE_PAUSE) -> int:
        """Delete the entries older than ``before``, ``chunk`` at a time, each
        its own transaction, resting ``pause`` between them. The gate's
        answers wait for the writer, and the writer for any delete: one
        ``DELETE`` of an hour at 500 decisions a second (1.8 million rows)
        held every answer for seconds."""
        removed = 0
        while True:
            with self._lock:
                n: int = self._db.execute(
                    "DELETE FROM audit WHERE id IN (SELECT id FROM audit WHERE time < ? "
                    "ORDER BY time LIMIT ?)", (before, chunk)).rowcount
            removed += n
            if n < chunk:
                return removed
            time.sleep(pause)  # the writer takes the lock meanwhile (it is not fair)

    def used_bytes(self) -> int:
        """Bytes of the database file in use (free pages left by deletes are
        reused by later writes, so they do not count)."""
        with self._lock:
            pages = self._db.execute("PRAGMA page_count").fetchone()[0]
            free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
            size = self._db.execute("PRAGMA page_size").fetchone()[0]
        return int((pages - free) * size)

    def prune_to_size(self, max_bytes: int, chunk: int = PRUNE_CHUNK,
                      pause: float = PRUNE_PAUSE) -> int:
        """Delete the oldest entries until the database uses at most
        ``max_bytes`` (``audit.max_bytes``); the number deleted.

        Age alone bounded nothing: a client sending large requests fills any
        disk within the retention, and a full disk stops the audit, which in
        enforce mode refuses every change. The number of entries to delete is
        estimated from the average entry, a chunk at a time, each chunk its
        own transaction (as ``prune``), and measured again after each."""
        removed = 0
        while (used := self.used_bytes()) > max_bytes:
            with self._lock:
                count: int = self._db.execute("SELECT count(*) FROM audit").fetchone()[0]
                if count == 0:
                    return removed
                want = -(-(used - max_bytes) * count // used)  # ceil: at least one
                n: int = self._db.execute(
                    "DELETE FROM audit WHERE id IN (SELECT id FROM audit ORDER BY id "
                    "LIMIT ?)", (min(max(want, 1), chunk),)).rowcount
            removed += n
            if n == 0:
                return removed
            time.sleep(pause)
        return removed

    def enforce(self, retention: float, max_bytes: int,
                removed: Callable[[str, int], None]) -> None:
        """``audit.retention``, then ``audit.max_bytes`` (a flood must not fill
        the disk within the retention: a full disk stops the audit, and the
        gate). ``removed("age" | "size", n)`` is told after each step, so a
        failure of the second loses no count of the first."""
        removed("age", self.prune(time.time() - retention))
        removed("size", self.prune_to_size(max_bytes))

    def close(self) -> None:
        """Finish the writes already queued, then close the database."""
        with self._state:
            writer, self._closed = self._writer, True
        if writer is not None:
            self._queue.put(None)
            writer.join()
        with self._lock:
            self._db.close()
