"""The daemon's log lines are written by a thread of their own, never by the event loop.

``passguard run`` logs a line per gate decision. Written by the event loop, a
log line is a ``write()`` to stderr: under systemd a stream socket to
journald, which blocks when journald falls behind (rotation, a slow disk),
and every gate request would wait with it. Here the loop only formats the
message and puts it on a bounded queue; a writer thread does the writing. If
the writer stays blocked until the queue is full, further lines are dropped
and counted, and the next line that gets through says how many: the audit
log, not the text log, is the record of decisions.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import queue
import threading
import time
from logging.handlers import QueueHandler
from typing import Any

from passguard.fields import LOG_LINE_BYTES, cap, log_safe

#: Lines waiting for the writer at most (~1.5 MB of decision lines).
MAX_QUEUED = 10_000
#: How long the exit waits for the writer to write what is queued.
STOP_SECONDS = 5.0


class OneLine(logging.Filter):
    """Each record's message made safe for a line of its own: control
    characters escaped, length bounded (passguard.fields.log_safe). A newline
    in a user name forged a whole log line; a 256 KiB name made a 600 KB one.
    A traceback (``exc_info``) is the daemon's own text and keeps its lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: let the handler report it as usual
            return True
        record.msg = log_safe(message)
        record.args = None
        return True


#: Record attributes (``extra=`` of a logging call) a JSON line carries when set.
JSON_EXTRAS = ("request_id", "decision_id", "decision_ids")
LOG_FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """``log.format: json``: one JSON object per line, for Loki, Elasticsearch
    or ``journalctl -o cat | jq``: ``time`` (RFC 3339, UTC, milliseconds),
    ``level``, ``logger``, ``message``, and ``request_id`` / ``decision_id``
    (``decision_ids`` for a request decided several changes) where the line
    has one. The message was escaped and bounded by :class:`OneLine` already;
    a traceback, the daemon's own text, is bounded here and goes under
    ``exception`` (JSON escapes its newlines: the object stays one line)."""

    def __init__(self, prefix: Any = None) -> None:
        super().__init__()
        self._prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in JSON_EXTRAS:
            value = getattr(record, key, None)
            if value is not None:
                line[key] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exception"] = cap(record.exc_text, 4 * LOG_LINE_BYTES)
        text = json.dumps(line, ensure_ascii=False, default=str)
        return f"{self._prefix(record)}{text}" if self._prefix else text


class DroppingQueueHandler(QueueHandler):
    """A QueueHandler that drops (and counts) instead of blocking or raising
    when the queue is full."""

    def __init__(self, q: queue.Queue[logging.LogRecord]) -> None:
        super().__init__(q)
        self.dropped = 0

    def note(self) -> logging.LogRecord:
        return logging.makeLogRecord({
            "name": __name__, "levelno": logging.WARNING, "levelname": "WARNING",
            "msg": f"{self.dropped} log lines dropped: the log was not being read"})

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        """The message merged with its arguments, as the base class does, but
        a traceback kept apart in ``exc_text`` (formatted here, in the caller,
        while ``exc_info`` is alive): the writer's text formatter appends it
        as before, the JSON one puts it under ``exception``."""
        record = copy.copy(record)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.msg = record.message = record.getMessage()
        record.args = None
        record.exc_info = None
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            if self.dropped:
                self.queue.put_nowait(self.note())
                self.dropped = 0
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1


class Writer:
    """The thread that writes the queued lines with the original handlers.

    Not ``logging.handlers.QueueListener``: its ``stop()`` raises when the
    queue is full and waits forever for a writer stuck in a ``write()``; an
    exit must do neither."""

    _STOP = object()

    def __init__(self, q: queue.Queue[logging.LogRecord], handlers: list[logging.Handler],
                 front: DroppingQueueHandler) -> None:
        self._queue: queue.Queue[object] = q  # type: ignore[assignment]
        self._handlers = handlers
        self._front = front
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def pending(self) -> int:
        return self._queue.qsize()

    def _run(self) -> None:
        while (record := self._queue.get()) is not self._STOP:
            assert isinstance(record, logging.LogRecord)
            for handler in self._handlers:
                if record.levelno >= handler.level:
                    handler.handle(record)

    def stop(self, timeout: float = STOP_SECONDS) -> bool:
        """Write what is queued, waiting ``timeout`` at most; False if the
        writer is stuck (the daemon thread ends with the process)."""
        try:
            if self._front.dropped:  # said now, or nobody would say it
                self._queue.put(self._front.note(), timeout=timeout)
                self._front.dropped = 0
            self._queue.put(self._STOP, timeout=timeout)
        except queue.Full:
            return False
        self._thread.join(timeout)
        return not self._thread.is_alive()


def log_off_the_loop(root: logging.Logger | None = None,
                     max_queued: int = MAX_QUEUED) -> Writer:
    """Move ``root``'s handlers behind a queue and a writer thread. The caller
    stops the returned writer at exit (that writes what is still queued)."""
    root = root or logging.getLogger()
    q: queue.Queue[logging.LogRecord] = queue.Queue(max_queued)
    front = DroppingQueueHandler(q)
    front.addFilter(OneLine())
    writer = Writer(q, list(root.handlers), front)
    root.handlers = [front]
    writer.start()
    return writer


class JournalFormatter(logging.Formatter):
    """Under systemd (``$JOURNAL_STREAM``): a ``<N>`` syslog priority prefix so
    ``journalctl -p warning`` works, and no timestamp (the journal has one)."""

    @staticmethod
    def priority(record: logging.LogRecord) -> int:
        return 3 if record.levelno >= logging.ERROR else 4 if record.levelno >= logging.WARNING \
            else 6 if record.levelno >= logging.INFO else 7

    def format(self, record: logging.LogRecord) -> str:
        return f"<{self.priority(record)}>{record.name}: {super().format(record)}"


def journal_prefix(record: logging.LogRecord) -> str:
    return f"<{JournalFormatter.priority(record)}>"


#: The format ``use_format`` set last: the scrape worker is started with it.
current_format = "text"


def use_format(name: str) -> None:
    """The root handlers' lines: text or one JSON object each; under systemd
    with the ``<N>`` priority prefix journald strips (the message is then
    the bare JSON object)."""
    global current_format
    journal = bool(os.environ.get("JOURNAL_STREAM"))
    formatter: logging.Formatter
    if name == "json":
        formatter = JsonFormatter(journal_prefix if journal else None)
    elif journal:
        formatter = JournalFormatter()
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)
    current_format = name


__all__ = ["JSON_EXTRAS", "LOG_FORMATS", "MAX_QUEUED", "DroppingQueueHandler", "JournalFormatter",
           "JsonFormatter", "OneLine", "Writer", "journal_prefix", "log_off_the_loop",
           "use_format"]
