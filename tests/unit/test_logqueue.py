"""The daemon's log writer: a blocked stderr never blocks the caller, lines
keep their order, and when the queue is full lines are dropped and counted."""

from __future__ import annotations

import logging
import threading
import time

from passguard.logqueue import log_off_the_loop


class Blocked(logging.Handler):
    """A stream that nobody reads until ``unblock`` is set (journald behind)."""

    def __init__(self) -> None:
        super().__init__()
        self.unblock = threading.Event()
        self.entered = threading.Event()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.entered.set()
        assert self.unblock.wait(30), "never unblocked"
        self.lines.append(self.format(record))


def _logger(name: str, sink: logging.Handler) -> logging.Logger:
    log = logging.getLogger(name)
    log.propagate = False
    log.setLevel(logging.INFO)
    sink.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log.handlers = [sink]
    return log


def test_a_blocked_writer_blocks_no_caller_and_drops_past_the_queue() -> None:
    sink = Blocked()
    log = _logger("passguard-test-logqueue", sink)
    writer = log_off_the_loop(log, max_queued=5)
    try:
        log.info("decision 0")
        assert sink.entered.wait(10)  # the writer is stuck in its write()
        # Synchronous, this would wait for `unblock` (30 s, then fail).
        for i in range(1, 20):
            log.info("decision %d", i)
        sink.unblock.set()
        deadline = time.monotonic() + 10
        while writer.pending() and time.monotonic() < deadline:  # bounded
            time.sleep(0.01)
        log.info("after")
    finally:
        assert writer.stop()
    # Line 0 was being written, 1-5 fit in the queue, 6-19 were dropped.
    assert sink.lines == [*(f"INFO decision {i}" for i in range(6)),
                          "WARNING 14 log lines dropped: the log was not being read",
                          "INFO after"]


def test_dropped_lines_are_reported_at_stop() -> None:
    sink = Blocked()
    log = _logger("passguard-test-logqueue-stop", sink)
    writer = log_off_the_loop(log, max_queued=2)
    log.info("a")
    assert sink.entered.wait(10)
    for _ in range(4):
        log.info("b")
    sink.unblock.set()
    assert writer.stop()
    assert sink.lines == ["INFO a", "INFO b", "INFO b",
                          "WARNING 2 log lines dropped: the log was not being read"]


def test_tracebacks_are_formatted_where_they_happen() -> None:
    sink = Blocked()
    sink.unblock.set()
    log = _logger("passguard-test-logqueue-tb", sink)
    writer = log_off_the_loop(log)
    try:
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    finally:
        writer.stop()
    [line] = sink.lines
    assert line.startswith("ERROR failed\nTraceback") and "ValueError: boom" in line


def test_stop_gives_up_on_a_writer_that_never_returns() -> None:
    sink = Blocked()
    log = _logger("passguard-test-logqueue-stuck", sink)
    writer = log_off_the_loop(log, max_queued=2)
    for i in range(5):
        log.warning("line %d", i)
    assert writer.stop(timeout=0.2) is False  # the queue stays full: no hang, no raise
    sink.unblock.set()


def test_a_newline_in_a_value_cannot_forge_a_log_line() -> None:
    """Issue 13, finding 3: a user name with a newline made a second, forged
    line; a 256 KiB one a 600 KB line. Each record is one bounded line now
    (the control characters escaped), and a traceback keeps its lines."""
    import io

    from passguard.fields import LOG_LINE_BYTES

    stream = io.StringIO()
    log = _logger("passguard-test-logqueue-forge", logging.StreamHandler(stream))
    writer = log_off_the_loop(log)
    try:
        forged = "alice\n2026-01-01 00:00:00 INFO passguard: admission by admin: allow\x1b[2K"
        log.info("admission by %s: deny", forged)
        log.info("user %s", "u" * 300_000)
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed for %s", "bob\r\nINFO forged")
    finally:
        assert writer.stop()
    lines = stream.getvalue().splitlines()
    assert lines[0] == ("INFO admission by alice\\n2026-01-01 00:00:00 INFO passguard: "
                        "admission by admin: allow\\x1b[2K: deny")
    assert lines[1].startswith("INFO user uuu") and "[sha256:" in lines[1]
    assert len(lines[1].encode()) <= LOG_LINE_BYTES + len("INFO ")
    assert lines[2] == "ERROR failed for bob\\r\\nINFO forged"
    assert lines[3] == "Traceback (most recent call last):"
    assert not any(line.startswith("INFO forged") or line.startswith("2026-") for line in lines)


def test_json_lines_are_one_object_each_with_ids_and_bounds() -> None:
    """log.format: json: one JSON object per line, the same escaping and
    bound as the text lines, the decision and request ids where given, and a
    traceback under ``exception`` (formatted in the caller, as for text)."""
    import io
    import json

    from passguard.fields import LOG_LINE_BYTES
    from passguard.logqueue import JsonFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    log = _logger("passguard-test-logqueue-json", handler)
    handler.setFormatter(JsonFormatter())
    writer = log_off_the_loop(log)
    try:
        log.info("check by %s: deny", "alice\n{\"level\": \"info\"}\x1b[2K",
                 extra={"decision_id": 42, "request_id": "req-1"})
        log.warning("user %s", "u" * 300_000)
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    finally:
        assert writer.stop()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    first, long, failed = (json.loads(line) for line in lines)
    assert first["message"] == 'check by alice\\n{"level": "info"}\\x1b[2K: deny'
    assert (first["level"], first["logger"]) == ("info", "passguard-test-logqueue-json")
    assert (first["decision_id"], first["request_id"]) == (42, "req-1")
    assert first["time"].endswith("Z") and first["time"][10] == "T"
    assert long["level"] == "warning" and "decision_id" not in long
    assert len(long["message"].encode()) <= LOG_LINE_BYTES
    assert failed["message"] == "failed"
    assert failed["exception"].startswith("Traceback") and "ValueError: boom" in failed["exception"]


def test_the_journal_prefix_comes_before_the_json_object() -> None:
    import json

    from passguard.logqueue import JsonFormatter
    from passguard.logqueue import journal_prefix as _journal_prefix

    record = logging.makeLogRecord({"name": "passguard.app", "levelno": logging.ERROR,
                                    "levelname": "ERROR", "msg": "x"})
    line = JsonFormatter(_journal_prefix).format(record)
    assert line.startswith("<3>{")
    assert json.loads(line[3:])["message"] == "x"
