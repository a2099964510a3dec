"""Messages between the daemon and its scrape worker: pickled, length-prefixed.

The channel is one end of a ``socketpair`` the daemon made and handed to the
worker it started (``pass_fds``): no other process can connect to it, so the
frames are pickles (``Target``, ``StatsReading``, ``Destination`` are frozen
dataclasses; pickle is the cheapest codec for them, ~10 µs a result). Each
frame is a 4-byte big-endian length, then the pickle. A frame longer than
``MAX_FRAME`` is refused: it can only be a bug on the other side, and the
reader fails with that instead of buffering it.
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from typing import Any

#: A frame holds a batch of results or a cycle's target list: 10,000 targets
#: with their requests pickle to ~2 MB; a bound well above that.
MAX_FRAME = 256 * 1024 * 1024
_HEADER = struct.Struct(">I")


class FrameError(Exception):
    """The other side sent something that is not a frame of this protocol."""


def encode(message: Any) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    if len(body) > MAX_FRAME:
        raise FrameError(f"a message of {len(body)} bytes is over the {MAX_FRAME}-byte limit")
    return _HEADER.pack(len(body)) + body


async def read(reader: asyncio.StreamReader) -> Any:
    """The next message; raises ``asyncio.IncompleteReadError`` at the end of
    the stream (the other side exited) and FrameError for a bad frame."""
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if size > MAX_FRAME:
        raise FrameError(f"a frame of {size} bytes announced, over the {MAX_FRAME}-byte limit")
    body = await reader.readexactly(size)
    try:
        return pickle.loads(body)  # noqa: S301  (our own worker, over a private socketpair)
    except Exception as exc:  # a truncated or foreign pickle
        raise FrameError(f"a frame that does not unpickle ({type(exc).__name__})") from exc


__all__ = ["MAX_FRAME", "FrameError", "encode", "read"]
