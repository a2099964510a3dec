"""SQLite persistence of shadow policies and what they would have done.

Tables of their own in the state database (``state.path``), on a connection of
their own (WAL: the evidence writer and this one take turns; readers never
wait). Each evaluation of every shadow is one transaction — counters,
destinations, hourly buckets and each shadow's cursor together — so after a
crash the cursor and the counters agree: increments after the cursor are
evaluated again, none twice. The would-block counters only ever grow here;
removing a shadow removes its rows.

Additive tables, so the evidence schema's ``user_version`` is untouched: an
older passguard opening this database ignores them.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS shadows (
    name TEXT PRIMARY KEY, created REAL NOT NULL, requester TEXT NOT NULL,
    documents TEXT NOT NULL, evaluated_until REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS shadow_dataplanes (
    shadow TEXT NOT NULL, mesh TEXT NOT NULL, dataplane TEXT NOT NULL,
    refused INTEGER NOT NULL, unproven INTEGER NOT NULL, allowed INTEGER NOT NULL,
    PRIMARY KEY (shadow, mesh, dataplane)
);
CREATE TABLE IF NOT EXISTS shadow_destinations (
    shadow TEXT NOT NULL, mesh TEXT NOT NULL, dataplane TEXT NOT NULL, address TEXT NOT NULL,
    transport TEXT, refused INTEGER NOT NULL, unproven INTEGER NOT NULL,
    allowed INTEGER NOT NULL, first_refused REAL, last_refused REAL,
    first_unproven REAL, last_unproven REAL,
    PRIMARY KEY (shadow, mesh, dataplane, address)
);
CREATE TABLE IF NOT EXISTS shadow_hours (
    shadow TEXT NOT NULL, mesh TEXT NOT NULL, dataplane TEXT NOT NULL, address TEXT NOT NULL,
    hour INTEGER NOT NULL, refused INTEGER NOT NULL, unproven INTEGER NOT NULL,
    PRIMARY KEY (shadow, mesh, dataplane, address, hour)
);
"""
_TABLES = ("shadow_hours", "shadow_destinations", "shadow_dataplanes")


class ShadowExists(Exception):
    pass


class TooManyShadows(Exception):
    pass


@dataclass(frozen=True)
class ShadowRow:
    name: str
    created: float
    requester: str
    documents: list[Any]
    evaluated_until: float


@dataclass(frozen=True)
class DestRow:
    mesh: str
    dataplane: str
    address: str
    transport: str | None
    refused: int
    unproven: int
    allowed: int
    first_refused: float | None
    last_refused: float | None
    first_unproven: float | None
    last_unproven: float | None


#: (shadow, mesh, dataplane, address, transport, refused, unproven, allowed,
#: first_refused, last_refused, first_unproven, last_unproven): one row to add.
DestDelta = tuple[str, str, str, str, str | None, int, int, int,
                  float | None, float | None, float | None, float | None]


class ShadowDB:
    """One connection, used from worker threads one at a time (a lock)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a would-block count reported survives power loss, not only a crash.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)

    def _tx(self, work: Any) -> Any:
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                out = work(db)
                db.execute("COMMIT")
                return out
            except BaseException:
                # A failed COMMIT has already rolled back: a second would hide it.
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def add(self, row: ShadowRow, limit: int) -> None:
        """Insert; ShadowExists or TooManyShadows, checked in the same
        transaction as the insert (two clients cannot both take the last place)."""
        def work(db: sqlite3.Connection) -> None:
            if db.execute("SELECT 1 FROM shadows WHERE name = ?", (row.name,)).fetchone():
                raise ShadowExists(row.name)
            if db.execute("SELECT COUNT(*) FROM shadows").fetchone()[0] >= limit:
                raise TooManyShadows(limit)
            for table in _TABLES:  # leftovers of an interrupted removal
                db.execute(f"DELETE FROM {table} WHERE shadow = ?", (row.name,))  # noqa: S608
            db.execute("INSERT INTO shadows VALUES (?,?,?,?,?)",
                       (row.name, row.created, row.requester, json.dumps(row.documents),
                        row.evaluated_until))
        self._tx(work)

    def remove(self, name: str) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            gone = db.execute("DELETE FROM shadows WHERE name = ?", (name,)).rowcount > 0
            for table in _TABLES:
                db.execute(f"DELETE FROM {table} WHERE shadow = ?", (name,))  # noqa: S608
            return gone
        return bool(self._tx(work))

    def shadows(self) -> list[ShadowRow]:
        with self._lock:
            return [ShadowRow(n, c, r, json.loads(d), u) for n, c, r, d, u in self._db.execute(
                "SELECT name, created, requester, documents, evaluated_until FROM shadows "
                "ORDER BY name")]

    def dataplanes(self) -> list[tuple[str, str, str, int, int, int]]:
        """(shadow, mesh, dataplane, refused, unproven, allowed) for every shadow."""
        with self._lock:
            return [tuple(r) for r in self._db.execute(
                "SELECT shadow, mesh, dataplane, refused, unproven, allowed "
                "FROM shadow_dataplanes")]

    def destinations(self, shadow: str | None = None) -> list[tuple[str, DestRow]]:
        q = ("SELECT shadow, mesh, dataplane, address, transport, refused, unproven, allowed, "
             "first_refused, last_refused, first_unproven, last_unproven "
             "FROM shadow_destinations")
        with self._lock:
            rows = self._db.execute(q + " WHERE shadow = ?", (shadow,)) if shadow is not None \
                else self._db.execute(q)
            return [(r[0], DestRow(*r[1:])) for r in rows]

    def hours(self, shadow: str, since_hour: int) -> dict[tuple[str, str, str], tuple[int, int]]:
        """(mesh, dataplane, address) → (refused, unproven) from ``since_hour`` on."""
        with self._lock:
            return {(m, dp, a): (r, u) for m, dp, a, r, u in self._db.execute(
                "SELECT mesh, dataplane, address, SUM(refused), SUM(unproven) FROM shadow_hours "
                "WHERE shadow = ? AND hour >= ? GROUP BY mesh, dataplane, address",
                (shadow, since_hour))}

    def apply(self, cursors: Sequence[tuple[str, float]],
              dataplanes: Iterable[tuple[str, str, str, int, int, int]],
              destinations: Iterable[DestDelta],
              hours: Iterable[tuple[str, str, str, str, int, int, int]],
              prune_before_hour: int) -> None:
        """One evaluation of every shadow, atomically: counts are *added*, each
        shadow's cursor moves. Rows of a shadow removed meanwhile are not
        written (``WHERE EXISTS``)."""
        exists = "WHERE EXISTS (SELECT 1 FROM shadows WHERE name = ?)"

        def work(db: sqlite3.Connection) -> None:
            db.executemany(
                "INSERT INTO shadow_dataplanes SELECT ?,?,?,?,?,? " + exists +
                " ON CONFLICT(shadow, mesh, dataplane) DO UPDATE SET "
                "refused = refused + excluded.refused, unproven = unproven + excluded.unproven, "
                "allowed = allowed + excluded.allowed",
                [(*row, row[0]) for row in dataplanes])
            db.executemany(
                "INSERT INTO shadow_destinations SELECT ?,?,?,?,?,?,?,?,?,?,?,? " + exists +
                " ON CONFLICT(shadow, mesh, dataplane, address) DO UPDATE SET "
                "transport = COALESCE(excluded.transport, transport), "
                "refused = refused + excluded.refused, unproven = unproven + excluded.unproven, "
                "allowed = allowed + excluded.allowed, "
                "first_refused = COALESCE(first_refused, excluded.first_refused), "
                "last_refused = COALESCE(excluded.last_refused, last_refused), "
                "first_unproven = COALESCE(first_unproven, excluded.first_unproven), "
                "last_unproven = COALESCE(excluded.last_unproven, last_unproven)",
                [(*row, row[0]) for row in destinations])
            db.executemany(
                "INSERT INTO shadow_hours SELECT ?,?,?,?,?,?,? " + exists +
                " ON CONFLICT(shadow, mesh, dataplane, address, hour) DO UPDATE SET "
                "refused = refused + excluded.refused, unproven = unproven + excluded.unproven",
                [(*row, row[0]) for row in hours])
            db.executemany("UPDATE shadows SET evaluated_until = ? WHERE name = ?",
                           [(until, name) for name, until in cursors])
            db.execute("DELETE FROM shadow_hours WHERE hour < ?", (prune_before_hour,))
        self._tx(work)

    def close(self) -> None:
        with self._lock:
            self._db.close()
