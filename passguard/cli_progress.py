"""One rewritten status line for a long CLI read (the one-shot ``check``), on a
terminal only: in a pipeline stderr is a file or a pipe, and stays quiet."""

from __future__ import annotations

import sys
import time
from typing import TextIO

# Redraws at most this often: tens of thousands of dataplanes, one line.
MIN_REDRAW = 0.1


class Progress:
    """``dataplanes read: stats 12/40, destinations 0/40``, rewritten in place."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.on = self.stream.isatty()
        self.counts: dict[str, int] = {}
        self.total = 0
        self._drawn = 0.0
        self._shown = False

    def say(self, text: str) -> None:
        if self.on:
            self._draw(text)

    def start(self, total: int, *phases: str) -> None:
        self.total = total
        self.counts = dict.fromkeys(phases, 0)
        self._update(force=True)

    def done(self, phase: str) -> None:
        self.counts[phase] = self.counts.get(phase, 0) + 1
        self._update(force=self.counts[phase] == self.total)

    def clear(self) -> None:
        if self.on and self._shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._shown = False

    def _update(self, force: bool = False) -> None:
        if not self.on:
            return
        now = time.monotonic()
        if not force and now - self._drawn < MIN_REDRAW:
            return
        self._drawn = now
        self._draw("dataplanes read: " + ", ".join(f"{phase} {n}/{self.total}"
                                                     for phase, n in self.counts.items()))

    def _draw(self, text: str) -> None:
        self.stream.write(f"\r\033[K{text}")
        self.stream.flush()
        self._shown = True
