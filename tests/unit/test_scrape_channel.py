"""The daemon–worker channel: the frame codec against hostile bytes, and the
two sides' bookkeeping of what the worker knows agreeing over any passes."""

from __future__ import annotations

import asyncio
import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from passguard import frames
from passguard.scrape_process import _changes
from passguard.scrape_worker import Known, take
from passguard.scraper import Request
from passguard.targets import Target


def reader_of(data: bytes) -> asyncio.StreamReader:
    r = asyncio.StreamReader()
    r.feed_data(data)
    r.feed_eof()
    return r


async def test_a_message_crosses_whole() -> None:
    msg = ("results", 7, [(0, 1.5, 0.01, None, "boom")])
    assert await frames.read(reader_of(frames.encode(msg) * 2)) == msg


async def test_an_announced_length_over_the_limit_is_refused_before_reading() -> None:
    with pytest.raises(frames.FrameError, match="over the"):
        await frames.read(reader_of(struct.pack(">I", frames.MAX_FRAME + 1)))


async def test_a_cut_frame_is_the_end_of_the_stream() -> None:
    whole = frames.encode(("done", 1))
    for cut in (1, 3, len(whole) - 1):
        with pytest.raises(asyncio.IncompleteReadError):
            await frames.read(reader_of(whole[:cut]))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_garbage_is_a_frame_error_or_the_end_never_anything_else(body: bytes) -> None:
    data = struct.pack(">I", len(body)) + body

    async def go() -> None:
        with contextlib.suppress(frames.FrameError, asyncio.IncompleteReadError):
            await frames.read(reader_of(data))

    asyncio.run(go())


# --------------------------------------------------------------------------- what the worker knows

KEYS = [f"m/dp-{i}" for i in range(6)]
URLS = ["http://127.0.0.1:1", "http://127.0.0.1:2"]
REQS = [None, Request("http://cp:5681", "/stats", {"a": "b"}, "envoy", None)]

pass_ = st.tuples(
    st.sampled_from(["stats", "clusters"]),
    st.lists(st.tuples(st.sampled_from(KEYS), st.sampled_from(URLS),
                       st.sampled_from(range(len(REQS)))),
             unique_by=lambda x: x[0], max_size=len(KEYS)))


@settings(max_examples=300, deadline=None)
@given(st.lists(pass_, max_size=12))
def test_the_worker_resolves_every_pass_to_what_the_daemon_sent(
        passes: list[tuple[str, list[tuple[str, str, int]]]]) -> None:
    """Whatever the passes (stats ones forget what they leave out, clusters
    ones do not; a target may change its URL or request between passes), the
    worker's targets and requests are exactly the daemon's, in order."""
    mine: dict[str, tuple[Target, Request | None]] = {}
    theirs: Known = {}
    objects: dict[tuple[str, str], Target] = {}

    async def go() -> None:
        for job, (kind, chosen) in enumerate(passes):
            items = []
            for key, url, r in chosen:
                mesh, name = key.split("/")
                # The same object while unchanged, as the daemon's store keeps them.
                t = objects.setdefault((key, url), Target(url, mesh, name))
                items.append((t, REQS[r]))
            keys, updates = await _changes(mine, items, full=kind == "stats")
            _, _, _, targets, reqs = take(theirs, (kind, job, 0.0, keys, updates))
            assert [(t.key, t.url) for t in targets] == [(t.key, t.url) for t, _ in items]
            assert reqs == [r for _, r in items]
            assert set(theirs) == set(mine)

    asyncio.run(go())


async def test_an_unchanged_target_is_not_sent_again() -> None:
    t = Target("http://127.0.0.1:1", "m", "a")
    known: dict[str, tuple[Target, Request | None]] = {}
    assert (await _changes(known, [(t, None)], full=True))[1] == [("m/a", t, None)]
    assert (await _changes(known, [(t, None)], full=True))[1] == []
    moved = Target("http://127.0.0.1:2", "m", "a")
    assert (await _changes(known, [(moved, None)], full=True))[1] == [("m/a", moved, None)]


def test_the_worker_loads_neither_aiohttp_nor_the_config_schema() -> None:
    """The scrape worker's program imports what it reads with, not the daemon's
    whole stack: aiohttp (loaded at a first TLS read only) and the pydantic
    schema were ~35 MB of every worker's memory (docs/performance.md)."""
    import subprocess
    import sys

    probe = ("import sys, passguard.scrape_worker; "
             "print(sorted(m for m in ('aiohttp', 'pydantic', 'passguard.config') "
             "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
