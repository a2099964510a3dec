"""SQLite persistence of the evidence window, so a restart resumes instead of starting blind.

Each scrape cycle is one transaction (WAL journal): after a crash the database
holds the state of the last completed cycle, never half of one. Only what
cannot be recomputed is stored: each dataplane's segments and last sample.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from passguard.envoy.names import FAMILIES, Family
from passguard.envoy.stats import Counters
from passguard.store.destinations import Destination, DestinationBook
from passguard.store.window import History, Sample, Segment

# 2: destinations.routes (the meshpassthrough_* clusters that carried each one).
SCHEMA_VERSION = 2
_SCHEMA = """
CREATE TABLE IF NOT EXISTS targets (
    key TEXT PRIMARY KEY,
    last_t REAL, last_uptime REAL, last_families TEXT,
    last_success REAL, last_attempt REAL, last_error TEXT, last_duration REAL,
    pruned_until REAL
);
CREATE TABLE IF NOT EXISTS segments (
    key TEXT NOT NULL, start REAL, "end" REAL NOT NULL,
    complete INTEGER NOT NULL, increase TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS segments_by_key ON segments (key, "end");
CREATE TABLE IF NOT EXISTS destinations (
    key TEXT NOT NULL, address TEXT NOT NULL,
    mesh TEXT NOT NULL, dataplane TEXT NOT NULL, service TEXT NOT NULL, family TEXT NOT NULL,
    first_seen REAL NOT NULL, last_seen REAL NOT NULL, connections INTEGER NOT NULL,
    last_cx_total INTEGER NOT NULL, last_active INTEGER NOT NULL, events TEXT NOT NULL,
    routes TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (key, address)
);
"""
# Columns added after a release: a database made before gets them at open.
_ADDED_COLUMNS = (("destinations", "routes", "TEXT NOT NULL DEFAULT ''"),)


# One encoder for every row: json.dumps() with options builds a new one per call.
_COMPACT = json.JSONEncoder(separators=(",", ":"))


def _encode(families: dict[Family, Counters]) -> str:
    return _COMPACT.encode({f: list(c) for f, c in families.items()})


def _decode(text: str | None) -> dict[Family, Counters]:
    if not text:
        return {}
    raw: dict[str, list[int]] = json.loads(text)
    return {f: Counters(*raw[f]) for f in FAMILIES if f in raw}


def _real(x: float | None) -> float | None:
    # SQLite has no -inf literal worth trusting across versions: store NULL.
    return None if x is None or math.isinf(x) else x


#: Targets per piece of a state write between two ``pause()`` calls (~5 ms).
SAVE_SLICE = 500
_UPSERT_TARGET = (
    "INSERT INTO targets VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT(key) DO UPDATE SET "
    "last_t=excluded.last_t, last_uptime=excluded.last_uptime, "
    "last_families=excluded.last_families, last_success=excluded.last_success, "
    "last_attempt=excluded.last_attempt, last_error=excluded.last_error, "
    "last_duration=excluded.last_duration, pruned_until=excluded.pruned_until")


#: Rests inside one write's transaction stop after this long in all: it holds
#: the database's write lock, which the shadow store (the same file) waits
#: for at most its busy_timeout (5 s). The rows are built before it begins.
TXN_REST_SECONDS = 1.0


class _Rests:
    """A write's ``pause()`` inside its transaction, until TXN_REST_SECONDS of rests."""

    def __init__(self, pause: Callable[[], None] | None) -> None:
        self._pause, self._left = pause, TXN_REST_SECONDS

    def __call__(self) -> None:
        if self._pause is not None and self._left > 0:
            start = time.monotonic()
            self._pause()
            self._left -= time.monotonic() - start


def _insert_sliced(db: sqlite3.Connection, sql: str, rows: list[tuple[Any, ...]],
                   rest: _Rests) -> None:
    """``executemany`` SAVE_SLICE rows at a time, ``rest()`` between slices."""
    for i in range(0, len(rows), SAVE_SLICE):
        if i:
            rest()
        db.executemany(sql, rows[i:i + SAVE_SLICE])


class StateDB:
    """One connection, used from worker threads one at a time (guarded by a lock)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a cycle reported as written survives power loss, not only a crash.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"{path} was written by a newer passguard (schema {version})")
        self._db.executescript(_SCHEMA)
        for table, column, decl in _ADDED_COLUMNS:
            have = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def save(self, histories: Iterable[tuple[str, History, list[Segment]]],
             prune_before: float, removed: Iterable[str] = (),
             pause: Callable[[], None] | None = None) -> None:
        """Write one cycle atomically: new segments, each target's last sample, pruning.

        ``pause()`` is called every SAVE_SLICE targets while the rows are
        built, and between their inserts for at most TXN_REST_SECONDS: the
        daemon's rests while the gate is busy (``Foreground.pace_thread``).
        Building and binding the rows is Python holding the GIL, ~150 ms of
        it for 10,000 targets."""
        seg_rows: list[tuple[Any, ...]] = []
        target_rows: list[tuple[Any, ...]] = []
        for n, (key, h, new) in enumerate(histories):
            if pause is not None and n and not n % SAVE_SLICE:
                pause()
            for s in new:
                seg_rows.append((key, _real(s.start), s.end, int(s.complete), _encode(s.increase)))
            last = h.last
            target_rows.append((
                key, last.t if last else None, last.uptime if last else None,
                _encode(last.families) if last else None, h.last_success, h.last_attempt,
                h.last_error, h.last_duration, _real(h.pruned_until),
            ))
        if pause is not None:
            pause()
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                rest = _Rests(pause)
                _insert_sliced(db, "INSERT INTO segments VALUES (?,?,?,?,?)", seg_rows, rest)
                rest()
                _insert_sliced(db, _UPSERT_TARGET, target_rows, rest)
                db.execute('DELETE FROM segments WHERE "end" <= ?', (prune_before,))
                for key in removed:
                    db.execute("DELETE FROM segments WHERE key = ?", (key,))
                    db.execute("DELETE FROM targets WHERE key = ?", (key,))
                    db.execute("DELETE FROM destinations WHERE key = ?", (key,))
                db.execute("COMMIT")
            except BaseException:
                # A failed COMMIT (disk full) has already rolled back: a second
                # ROLLBACK would raise and hide the real cause.
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def load(self) -> dict[str, History]:
        out: dict[str, History] = {}
        with self._lock:
            for row in self._db.execute("SELECT * FROM targets"):
                key, t, uptime, fams, success, attempt, error, duration, pruned = row
                h = History()
                if t is not None:
                    h.last = Sample(t, uptime, _decode(fams))
                h.last_success, h.last_attempt = success, attempt
                h.last_error, h.last_duration = error, duration
                h.pruned_until = -math.inf if pruned is None else pruned
                out[key] = h
            for key, start, end, complete, inc in self._db.execute(
                    'SELECT key, start, "end", complete, increase FROM segments '
                    'ORDER BY key, "end", rowid'):
                if key in out:
                    out[key].segments.append(Segment(
                        -math.inf if start is None else start, end, _decode(inc), bool(complete)))
        return out

    def save_destinations(self, changed: Iterable[tuple[str, Destination]],
                          removed: Iterable[str] = (),
                          pause: Callable[[], None] | None = None) -> None:
        """Write changed destinations atomically; ``pause()`` as in ``save``
        (a /clusters pass's changes: a 60 ms stretch of the loop's GIL once
        a minute, with 10,000 sidecars)."""
        rows: list[tuple[Any, ...]] = []
        for n, (key, d) in enumerate(changed):
            if pause is not None and n and not n % SAVE_SLICE:
                pause()
            rows.append((key, d.address, d.mesh, d.dataplane, d.service, d.family, d.first_seen,
                         d.last_seen, d.connections, d.last_cx_total, d.last_active,
                         json.dumps(list(d.events)), "\n".join(d.routes)))
        if pause is not None:
            pause()
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                _insert_sliced(db, "INSERT OR REPLACE INTO destinations VALUES "
                               "(?,?,?,?,?,?,?,?,?,?,?,?,?)", rows, _Rests(pause))
                for key in removed:
                    db.execute("DELETE FROM destinations WHERE key = ?", (key,))
                db.execute("COMMIT")
            except BaseException:
                # A failed COMMIT (disk full) has already rolled back: a second
                # ROLLBACK would raise and hide the real cause.
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def load_destinations(self, book: DestinationBook) -> int:
        n = 0
        with self._lock:
            for row in self._db.execute(
                    "SELECT key, address, mesh, dataplane, service, family, first_seen, "
                    "last_seen, connections, last_cx_total, last_active, events, routes "
                    "FROM destinations"):
                (key, address, mesh, dp, service, family, first, last, conns, last_cx,
                 last_active, events, routes) = row
                d = Destination(mesh, dp, service, address, family, first, last, conns, last_cx,
                                last_active, deque((t, n) for t, n in json.loads(events)),
                                tuple(r for r in routes.split("\n") if r))
                book.add(key, address, d)
                n += 1
        return n

    def integrity_check(self) -> str:
        with self._lock:
            return str(self._db.execute("PRAGMA integrity_check").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
