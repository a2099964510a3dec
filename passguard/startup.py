"""What the daemon opens at start, and the descriptors it may hold.

Each failure names the config key and the file, never a traceback: a path
under a file, a read-only disk, a database written by a newer passguard.
"""

from __future__ import annotations

import resource
import sqlite3
from pathlib import Path

from passguard.audit import AuditLog, audit_path
from passguard.config import Config
from passguard.errors import PassguardError
from passguard.shadows import Shadows
from passguard.store.persistence import StateDB
from passguard.store.shadows import ShadowDB

#: Descriptors besides connections: the two databases and their WAL files,
#: the log, target files, the event loop's own.
FD_SPARE = 64

def fd_budget_warning(config: Config) -> str | None:
    """The connection cap protects the scrapes only if both fit in the file
    descriptors the process may open."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = config.limits.max_connections + config.scrape.concurrency + FD_SPARE
    if soft == resource.RLIM_INFINITY or need <= soft:
        return None
    return (f"limits.max_connections ({config.limits.max_connections}) + scrape.concurrency "
            f"({config.scrape.concurrency}) + {FD_SPARE} spare exceed the open-file limit "
            f"({soft}): a connection flood can starve the scrapes. Raise LimitNOFILE or "
            "lower limits.max_connections")


def open_state(path: Path) -> tuple[StateDB, AuditLog]:
    """The state database and the audit log beside it, or an error naming
    the key and the file (a path under a file, a read-only disk, a database
    from a newer passguard) instead of a traceback."""
    db: StateDB | None = None
    try:
        db = StateDB(path)
        return db, AuditLog(audit_path(path), legacy=path)
    except (OSError, sqlite3.Error, RuntimeError) as exc:
        if db is not None:
            db.close()
        raise PassguardError(f"state.path: cannot open {path} or the audit log beside it: "
                             f"{exc}") from None


def open_shadows(path: Path, db: StateDB, audit: AuditLog) -> Shadows:
    try:
        return Shadows(ShadowDB(path))
    except (OSError, sqlite3.Error) as exc:
        db.close()
        audit.close()
        raise PassguardError(f"state.path: cannot open the shadow tables in {path}: "
                             f"{exc}") from None


def now_for_scheduler() -> object:
    """A job's first run, now: APScheduler 3 wants a timezone-aware datetime."""
    from datetime import datetime, timezone

    return datetime.now(timezone.utc)  # noqa: UP017
