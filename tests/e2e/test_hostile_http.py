"""Hostile HTTP against a real ``passguard run`` process: bodies and connections.

The daemon runs as a child process (so its memory can be read from
``/proc/<pid>/status``) and scrapes two simulated sidecars (bench/fleet.py):
mesh ``busy`` has passthrough traffic, mesh ``idle`` has none.

Bodies: a corpus of hostile documents (alias bombs, huge scalars, deep
nesting, 10,000 documents, UTF-16 and Latin-1, duplicate keys, NaN and
Infinity, numbers and booleans as strings, YAML tags that would run code)
is posted to ``/v1/check`` and ``/v1/admission``. Each gets a clear 4xx
(or, for an AdmissionReview whose envelope is fine but whose object is not,
the 200 refusal the API server expects) in bounded time, and the daemon's
peak memory stays bounded.

Connections: oversized request lines and headers get a 4xx; slow clients
(headers or body trickled byte by byte) and hundreds of idle connections do
not stop the daemon from answering and scraping. What they *can* hold, and
for how long, is measured and reported in docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bench.fleet import Destination, Fleet, TargetSpec, start_fleet
from passguard.web.connections import PROBE_DEADLINE

from .procs import Passguard, envoy_target, passguard_config

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

MESH = "type: Mesh\nname: {}\nnetworking:\n  outbound:\n    passthrough: false\n"
BOUND_SECONDS = 3.0  # every hostile body is answered within this
# Peak RSS growth allowed over the whole corpus: a 1 MiB body may expand to
# ~100,000 nodes (max_nodes) of Python objects, a few tens of MiB at most.
RSS_BOUND_MB = 120.0


@dataclass
class Env:
    pg: Passguard
    fleet: Fleet

    @property
    def port(self) -> int:
        return int(self.pg.address.rsplit(":", 1)[1])

    def status(self) -> dict[str, float]:
        out = {}
        for line in Path(f"/proc/{self.pg.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
        out["fds"] = float(len(list(Path(f"/proc/{self.pg.pid}/fd").iterdir())))
        return out

    async def post(self, path: str, body: bytes, ctype: str | None = "application/yaml",
                   timeout: float = 30) -> tuple[int, Any, float]:
        headers = {"Content-Type": ctype} if ctype else {}
        start = time.monotonic()
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s,
            s.post(self.pg.url + path, data=body, headers=headers,
                   skip_auto_headers=["Content-Type"] if ctype is None else ()) as r,
        ):
            text = await r.text()
            elapsed = time.monotonic() - start
            try:
                return r.status, json.loads(text), elapsed
            except ValueError:
                return r.status, text, elapsed

    async def get(self, path: str, timeout: float = 10) -> tuple[int, Any]:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s,
            s.get(self.pg.url + path) as r,
        ):
            text = await r.text()
            return r.status, json.loads(text) if r.content_type == "application/json" else text

    async def verdict(self, mesh: str) -> str:
        status, body, _ = await self.post("/v1/check", MESH.format(mesh).encode())
        assert status == 200, body
        return str(body["verdict"])


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    now = time.time()
    fleet = await start_fleet(2, 2, overrides={
        # Busy: started 10 s ago, 5 passthrough connections a second since.
        0: TargetSpec("steady", now - 10, destinations=(Destination(0, "93.184.216.34", 443,
                                                                    5.0),)),
        1: TargetSpec("idle", now - 3600),
    })
    cfg = passguard_config(tmp_path, [envoy_target(fleet.base_url(0), "busy", "busy-1"),
                                      envoy_target(fleet.base_url(1), "idle", "idle-1")],
                           interval="1s", timeout="800ms", window="1m",
                           limits={"body_timeout": "2s"})
    pg = Passguard(cfg, tmp_path)
    try:
        await asyncio.to_thread(pg.start)
        e = Env(pg, fleet)
        assert await e.verdict("busy") == "deny" and await e.verdict("idle") == "allow"
        yield e
    finally:
        await asyncio.to_thread(pg.close)
        await fleet.stop()


# --------------------------------------------------------------------------- bodies


def _alias_bomb(levels: int = 9) -> bytes:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        refs = ", ".join([f"*a{i - 1}"] * 10)
        lines.append(f"a{i}: &a{i} [{refs}]")
    return ("\n".join(lines) + "\n").encode()


def _deep_json(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def _many_docs(n: int) -> bytes:
    return "".join(f"---\n{MESH.format(f'm{i}')}" for i in range(n)).encode()


UNIVERSAL_MP = ("type: MeshPassthrough\nname: mp\nmesh: busy\nspec:\n  default:\n"
                "    passthroughMode: Matched\n    appendMatch:\n"
                "    - {{type: IP, value: 93.184.216.34, port: {port}}}\n")

# name → (body, content type, expected status, fragment of the error message)
CORPUS: dict[str, tuple[bytes, str | None, int, str]] = {
    "alias-bomb": (_alias_bomb(), "application/yaml", 400, "max_nodes"),
    "alias-bomb-in-a-mesh": (MESH.format("busy").encode() + _alias_bomb() + b"labels: *a8\n",
                             "application/yaml", 400, "max_nodes"),
    "recursive-alias": (b"type: Mesh\nname: busy\nx: &x [*x]\n", "application/yaml", 400,
                        "refers to itself"),
    "huge-scalar": (b"type: Mesh\nname: " + b"a" * 900_000 + b"\n", "application/yaml", 400,
                    "max_scalar_bytes"),
    "over-the-body-limit": (b"#" * (2 * 1024 * 1024), "application/yaml", 413,
                            "over the limit"),
    "deep-json": (_deep_json(400_000), "application/json", 400, "nests deeper"),
    "deep-yaml-flow": (b"x: " + b"[" * 300_000 + b"]" * 300_000, "application/yaml", 400,
                       "nests deeper"),
    "deep-yaml-block": ("".join("  " * i + "- \n" for i in range(200)).encode(),
                        "application/yaml", 400, "nests deeper"),
    "10000-documents": (_many_docs(10_000), "application/yaml", 400, "max_documents"),
    "100000-keys": (("{" + ",".join(f'"{i:x}":0' for i in range(100_001)) + "}").encode(),
                    "application/json", 400, "max_nodes"),
    "utf16-bom": (MESH.format("busy").encode("utf-16"), "application/yaml", 400, "UTF-16"),
    "utf16-no-bom": (MESH.format("busy").encode("utf-16-le"), "application/yaml", 400, "NUL"),
    "utf32": (MESH.format("busy").encode("utf-32"), "application/yaml", 400, "UTF-32"),
    "latin1": ("type: Mesh\nname: café\n".encode("latin-1"), "application/yaml", 400,
               "not valid UTF-8"),
    "duplicate-key-yaml": (b"type: Mesh\nname: busy\nname: idle\n", "application/yaml", 400,
                           "duplicate key"),
    "duplicate-key-json": (b'{"type": "Mesh", "name": "busy", "name": "idle"}',
                           "application/json", 400, "duplicate key"),
    "duplicate-anchor": (b"a: &x 1\nb: &x 2\n", "application/yaml", 400, "duplicate anchor"),
    "nan-json": (b'{"type": "Mesh", "name": "busy", "x": NaN}', "application/json", 400, "NaN"),
    "infinity-json": (b'{"type": "Mesh", "name": "busy", "x": -Infinity}', "application/json",
                      400, "Infinity"),
    "1e400-json": (b'{"type": "Mesh", "name": "busy", "x": 1e400}', "application/json", 400,
                   "out of range"),
    "nan-yaml": (b"type: Mesh\nname: busy\nx: .nan\n", "application/yaml", 400, "not allowed"),
    "5000-digit-number": (b'{"type": "Mesh", "name": "busy", "x": ' + b"9" * 5000 + b"}",
                          "application/json", 400, "longer than"),
    "passthrough-string-false": (MESH.format("busy").replace("false", '"false"').encode(),
                                 "application/yaml", 400, "passthrough must be true or false"),
    "passthrough-string-false-json": (json.dumps(
        {"type": "Mesh", "name": "busy",
         "networking": {"outbound": {"passthrough": "false"}}}).encode(),
        "application/json", 400, "passthrough must be true or false"),
    "passthrough-number": (MESH.format("busy").replace("false", "0").encode(),
                           "application/yaml", 400, "passthrough must be true or false"),
    "port-as-string": (UNIVERSAL_MP.format(port='"443"').encode(), "application/yaml", 400,
                       "port must be a whole number"),
    "port-out-of-range": (UNIVERSAL_MP.format(port="70000").encode(), "application/yaml", 400,
                          "between 1 and 65535"),
    "python-tag": (b'!!python/object/apply:os.system ["touch /tmp/pwned"]\n',
                   "application/yaml", 400, "unsupported YAML tag"),
    "binary-tag": (b"type: Mesh\nname: !!binary aGk=\n", "application/yaml", 400,
                   "unsupported YAML tag"),
    "empty": (b"", "application/yaml", 400, "no documents"),
    "only-comments": (b"# nothing\n---\n# here\n", "application/yaml", 400, "no documents"),
    "garbage": (bytes(range(1, 256)) * 64, None, 400, "not valid UTF-8"),
    "nul": (b"type: Mesh\x00\nname: x\n", "application/yaml", 400, "NUL"),
    "lone-surrogate": (b'{"type": "Mesh", "name": "\\ud800"}', "application/json", 400,
                       "surrogate"),
    "a-string": (b'"just a string"', "application/json", 400, "expected a resource"),
    "a-list-of-numbers": (b"[1, 2, 3]", "application/json", 400, "expected a resource"),
    "not-a-kuma-resource": (b"apiVersion: v1\nkind: Secret\n", "application/yaml", 200, ""),
    "object-and-junk": (b'{"object": {}, "rm": "-rf"}', "application/json", 400,
                        "unexpected keys"),
}

ADMISSION: dict[str, tuple[bytes, int, str]] = {
    "yaml-instead-of-json": (MESH.format("busy").encode(), 400, "invalid JSON"),
    "not-a-review": (b'{"kind": "Mesh"}', 400, "kind must be AdmissionReview"),
    "old-api-version": (b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1beta1"}',
                        400, "apiVersion must be"),
    "no-uid": (json.dumps({"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1",
                           "request": {"operation": "CREATE"}}).encode(), 400, "uid"),
    "deep-object": (b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", '
                    b'"request": {"uid": "u", "operation": "CREATE", "object": '
                    + _deep_json(100_000) + b"}}", 400, "nests deeper"),
    "utf16": (json.dumps({"kind": "AdmissionReview"}).encode("utf-16"), 400, "UTF-16"),
    "over-the-body-limit": (b" " * (2 * 1024 * 1024), 413, "over the limit"),
}


def _review(obj: Any) -> bytes:
    return json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                       "request": {"uid": "u-1", "operation": "CREATE",
                                   "kind": {"group": "kuma.io", "version": "v1alpha1",
                                            "kind": "Mesh"},
                                   "userInfo": {"username": "mallory"}, "object": obj,
                                   "oldObject": None}}).encode()


async def test_hostile_bodies_get_a_clear_4xx_in_bounded_time_and_memory(env: Env) -> None:
    before = env.status()
    problems, timings = [], {}
    for name, (body, ctype, want, fragment) in CORPUS.items():
        status, answer, elapsed = await env.post("/v1/check", body, ctype)
        timings[name] = elapsed
        message = answer.get("error", "") if isinstance(answer, dict) else str(answer)
        if want == 200 and status == 200:
            assert answer["warnings"], answer  # ignored, and said so
        elif status != want or fragment not in message or elapsed > BOUND_SECONDS:
            problems.append(f"{name}: {status} in {elapsed:.2f}s: {message[:200]!r}")
    for name, (body, want, fragment) in ADMISSION.items():
        status, answer, elapsed = await env.post("/v1/admission", body, "application/json")
        timings[f"admission:{name}"] = elapsed
        message = answer.get("error", "") if isinstance(answer, dict) else str(answer)
        if status != want or fragment not in message or elapsed > BOUND_SECONDS:
            problems.append(f"admission {name}: {status} in {elapsed:.2f}s: {message[:200]!r}")
    # An envelope that is fine around an object that is not: the API server needs
    # a 200 AdmissionReview that refuses, with the reason.
    for obj in ({"type": "Mesh", "name": "busy",
                 "networking": {"outbound": {"passthrough": "false"}}},
                {"apiVersion": "kuma.io/v1alpha1", "kind": "Mesh", "metadata": {"name": 5}}):
        status, answer, elapsed = await env.post("/v1/admission", _review(obj),
                                                 "application/json")
        assert status == 200 and answer["response"]["allowed"] is False, answer
        assert "cannot evaluate" in answer["response"]["status"]["message"]
        assert elapsed < BOUND_SECONDS
    after = env.status()
    assert not problems, "\n".join(problems)
    growth = after["VmHWM"] - before["VmRSS"]
    print(f"\nhostile corpus: {len(timings)} bodies, slowest "
          f"{max(timings, key=timings.__getitem__)} {max(timings.values()):.3f}s; "
          f"RSS {before['VmRSS']:.1f} -> {after['VmRSS']:.1f} MiB, peak {after['VmHWM']:.1f} "
          f"MiB (+{growth:.1f})")
    assert growth < RSS_BOUND_MB, (before, after)
    # Still itself afterwards.
    assert (await env.get("/-/healthy"))[0] == 200
    assert await env.verdict("busy") == "deny" and await env.verdict("idle") == "allow"


async def test_a_thousand_documents_at_the_limit(env: Env) -> None:
    """max_documents (1000) valid documents: answered (200, 1000 decisions, all
    audited in one transaction) in bounded time."""
    status, answer, elapsed = await env.post("/v1/check", _many_docs(1000))
    assert status == 200 and len(answer["decisions"]) == 1000, answer
    print(f"\n1000 documents: {elapsed:.2f}s")
    assert elapsed < 10
    status, audit = await env.get("/v1/audit?limit=1000")
    assert status == 200 and len(audit["entries"]) >= 1000


async def test_mixed_key_types_get_a_4xx(env: Env) -> None:
    status, answer, _ = await env.post("/v1/check", b"type: Mesh\nname: busy\n1: one\n")
    assert 400 <= status < 500, (status, answer)


async def test_mixed_key_types_next_to_object_get_a_4xx(env: Env) -> None:
    status, answer, _ = await env.post("/v1/check", b"object: null\nextra: 1\n0: x\n")
    assert 400 <= status < 500, (status, answer)


async def test_a_declared_non_utf8_charset_is_refused(env: Env) -> None:
    status, answer, _ = await env.post("/v1/check", MESH.format("idle").encode(),
                                       "application/yaml; charset=iso-8859-1")
    assert status == 400 and "charset" in answer["error"], (status, answer)


# --------------------------------------------------------------------------- connections


async def _raw(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data`` on a fresh connection; everything the server answers until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout):
            return await reader.read(65536)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.") else 0


async def test_oversized_request_lines_and_headers_get_a_4xx(env: Env) -> None:
    cases = {
        "long-url": b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        "long-header-value": b"GET /-/healthy HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 10_000
        + b"\r\n\r\n",
        "long-header-name": b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n" + b"X" * 10_000
        + b": 1\r\n\r\n",
        "200-headers": b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n",
        "bad-content-length": b"POST /v1/check HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        "two-content-lengths": b"POST /v1/check HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
        b"Content-Length: 2\r\n\r\nab",
        "not-http": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 100,
    }
    got = {name: _status(await _raw(env.port, data)) for name, data in cases.items()}
    print(f"\nstatus per abuse: {got}")
    assert all(400 <= s < 500 for s in got.values()), got
    assert (await env.get("/-/healthy"))[0] == 200


async def _trickle(port: int, head: bytes, drip: bytes, seconds: float) -> bool:
    """Send ``head``, then ``drip`` one byte per 0.2 s for ``seconds``; True when the
    server was still holding the connection open at the end."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            writer.write(drip[i % len(drip):i % len(drip) + 1])
            await writer.drain()
            i += 1
            await asyncio.sleep(0.2)
            if reader.at_eof():
                return False
        # Still open: nothing answered, no EOF.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.2):
                data = await reader.read(1)
                return data != b""
        return True
    except ConnectionError:
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def test_slow_clients_do_not_block_others(env: Env) -> None:
    """Slowloris: 50 connections trickling headers and 50 trickling a body, for
    4 s. The daemon answers everyone else meanwhile and keeps scraping. A body
    not received within limits.body_timeout (2 s here) gets 408 and the
    connection is closed; a head still being trickled is held until
    limits.keepalive_timeout (75 s by default, armed at connect)."""
    head = b"POST /v1/check HTTP/1.1\r\nHost: x\r\n"
    body_head = (b"POST /v1/check HTTP/1.1\r\nHost: x\r\nContent-Type: application/yaml\r\n"
                 b"Content-Length: 100000\r\n\r\n")
    slow = [asyncio.create_task(_trickle(env.port, head, b"X-Slow: aaaaaaaa\r\n", 4.0))
            for _ in range(50)]
    slow += [asyncio.create_task(_trickle(env.port, body_head, MESH.format("x").encode(), 4.0))
             for _ in range(50)]
    await asyncio.sleep(0.5)
    latencies = []
    for _ in range(10):
        start = time.monotonic()
        assert (await env.get("/-/healthy"))[0] == 200
        assert await env.verdict("busy") == "deny"
        latencies.append(time.monotonic() - start)
        await asyncio.sleep(0.2)
    held = await asyncio.gather(*slow)
    print(f"\nslow clients: {sum(held[:50])}/50 header trickles and {sum(held[50:])}/50 body "
          f"trickles still held after 4 s; others answered in <= {max(latencies):.3f}s")
    assert max(latencies) < 1.0, latencies
    status, view = await env.get("/v1/meshes/idle")
    assert status == 200 and view["dataplanes"][0]["state"] == "fresh"
    assert all(held[:50]), held[:50]  # heads: within keepalive_timeout
    assert not any(held[50:]), held[50:]  # bodies: cut at body_timeout


async def test_a_body_sent_too_slowly_gets_408(env: Env) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
    try:
        writer.write(b"POST /v1/check HTTP/1.1\r\nHost: x\r\nContent-Type: application/yaml"
                     b"\r\nContent-Length: 1000\r\n\r\ntype: Mesh\n")
        await writer.drain()
        start = time.monotonic()
        async with asyncio.timeout(10):
            answer = await reader.read()  # until the server closes
        waited = time.monotonic() - start
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"limits.body_timeout" in answer and waited >= 1.5, (waited, answer[-200:])


async def test_many_idle_connections(env: Env) -> None:
    """500 idle TCP connections (connected, nothing sent): the daemon keeps
    answering and scraping; they cost one file descriptor each."""
    before = env.status()
    conns = []
    try:
        for _ in range(500):
            conns.append(await asyncio.open_connection("127.0.0.1", env.port))
        await asyncio.sleep(1.5)  # a scrape cycle or so
        during = env.status()
        start = time.monotonic()
        assert (await env.get("/-/healthy"))[0] == 200
        assert await env.verdict("busy") == "deny" and await env.verdict("idle") == "allow"
        took = time.monotonic() - start
        status, view = await env.get("/v1/meshes/idle")
        assert status == 200 and view["dataplanes"][0]["state"] == "fresh"
        print(f"\n500 idle connections: fds {before['fds']:.0f} -> {during['fds']:.0f}, RSS "
              f"{before['VmRSS']:.1f} -> {during['VmRSS']:.1f} MiB; 3 requests in {took:.3f}s")
        assert during["fds"] >= before["fds"] + 450  # each one held
        assert took < 2.0
    finally:
        for _, w in conns:
            w.close()
    await asyncio.sleep(0.5)
    assert env.status()["fds"] < before["fds"] + 50  # given back when they close


async def _flood_env(tmp_path: Path, max_connections: int, nofile: int
                     ) -> tuple[Passguard, Fleet, Env]:
    """passguard under a small RLIMIT_NOFILE (systemd/passguard.service sets
    65536, which only moves the numbers), scraping every 500 ms."""
    now = time.time()
    fleet = await start_fleet(2, 2, overrides={
        0: TargetSpec("steady", now - 10, destinations=(Destination(0, "93.184.216.34", 443,
                                                                    5.0),)),
        1: TargetSpec("idle", now - 3600)})
    cfg = passguard_config(tmp_path, [envoy_target(fleet.base_url(0), "busy", "busy-1"),
                                      envoy_target(fleet.base_url(1), "idle", "idle-1")],
                           interval="500ms", timeout="400ms", window="1m",
                           limits={"max_connections": max_connections})
    cfg["scrape"]["concurrency"] = 8
    pg = Passguard(cfg, tmp_path)
    try:
        pg.spawn(["sh", "-c", f'ulimit -n {nofile} && exec "$0" -m passguard run -c "$1"',
                  sys.executable, str(pg.path)])
        await asyncio.to_thread(pg.wait_ready, 30)
    except BaseException:
        await asyncio.to_thread(pg.close)
        await fleet.stop()
        raise
    return pg, fleet, Env(pg, fleet)


async def _flood(port: int, count: int, patience: float = 1.0
                 ) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """Up to ``count`` connections, one after the other, until one is not
    taken within ``patience`` (a full listen backlog drops SYNs, and the
    kernel sends the next one a second later)."""
    conns = []
    for _ in range(count):
        try:
            async with asyncio.timeout(patience):
                conns.append(await asyncio.open_connection("127.0.0.1", port))
        except (TimeoutError, OSError):
            break
    return conns


def _last_success(state: Path, key_part: str) -> float:
    """Read from the state database beside the daemon (WAL: readers never block it)."""
    with contextlib.closing(sqlite3.connect(f"file:{state}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT key, last_success FROM targets").fetchall()
    return max(t or 0.0 for k, t in rows if key_part in k)


async def test_connection_flood_is_capped_and_scraping_goes_on(tmp_path: Path) -> None:
    """limits.max_connections (64) with the fd limit at exactly the budget
    passguard asks for (136: 64 + 8 scrapes + 64 spare): 300 idle connections
    get the cap's 503 past the 64th; the daemon never runs out of file
    descriptors, its scrapes go on during the flood, and it answers as soon
    as connections are free again. (Refused connections must be closed as
    they are accepted: with asyncio's create_server they were closed turns of
    the loop later, a burst held up to 300 descriptors, and in one CI run
    accept hit EMFILE and stopped for a second.) The patience of 3 s per
    connection lets a loaded machine's stall pass; the daemon stays within
    its descriptors either way."""
    pg, fleet, e = await _flood_env(tmp_path, 64, 136)
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        flood_start = time.time()
        conns = await _flood(e.port, 300, patience=3.0)
        # The ones past the cap were answered and closed without a word from us:
        # at once, or, for the few that took a probe's reserved place while
        # the cap was full, when that place's PROBE_DEADLINE (2 s) passed.
        refused = []
        for reader, _ in conns[64:]:
            with contextlib.suppress(TimeoutError, OSError):
                async with asyncio.timeout(PROBE_DEADLINE + 3):
                    refused.append(await reader.read())
        assert len(conns) == 300 and len(refused) == 236
        assert all(r.startswith(b"HTTP/1.1 503") and b"limits.max_connections" in r
                   for r in refused), refused[:3]
        await asyncio.sleep(1.5)  # three cycles with the cap full
        assert _last_success(tmp_path / "state.db", "busy-1") > flood_start + 0.5
        pg.assert_running()
        fds = e.status()["fds"]
        assert fds < 64 + 8 + 64, fds
        for _, w in conns:
            w.close()
        conns.clear()
        await asyncio.sleep(0.3)
        assert (await e.get("/-/healthy", timeout=3))[0] == 200
        assert await e.verdict("busy") == "deny"
        status, text = await e.get("/metrics")
        assert status == 200
        refused_total = [float(line.split()[-1]) for line in str(text).splitlines()
                         if line.startswith("passguard_http_connections_refused_total")]
        assert refused_total and refused_total[0] >= 236, refused_total
        log = pg.log.read_text(errors="replace")
        assert "Too many open files" not in log and "can starve the scrapes" not in log, [
            line for line in log.splitlines() if " WARNING " in line or " ERROR " in line]
        print(f"\nflood capped at 64: 236 of 300 refused with 503, fds {fds:.0f} of 136, "
              "scrapes went on")
    finally:
        for _, w in conns:
            w.close()
        await asyncio.to_thread(pg.close)
        await fleet.stop()


async def test_connection_flood_past_the_fd_limit_recovers(tmp_path: Path) -> None:
    """A cap set above the fd limit protects nothing: idle connections past
    RLIMIT_NOFILE (128) starve the daemon. While starved it cannot accept a
    probe; the evidence in memory is not harmed, and it recovers as soon as
    the connections go. Measured, not wished away: see docs/reliability.md."""
    pg, fleet, e = await _flood_env(tmp_path, 100_000, 128)
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        conns = await _flood(e.port, 300)
        opened = len(conns)
        await asyncio.sleep(1.5)
        starved = None
        try:
            status, _ = await e.get("/-/healthy", timeout=3)
            starved = status != 200
        except (TimeoutError, aiohttp.ClientError):
            starved = True
        pg.assert_running()
        fds = e.status()["fds"]
        for _, w in conns:
            w.close()
        conns.clear()
        start = time.monotonic()
        while True:  # bounded: recovered within 10 s or fail
            with contextlib.suppress(TimeoutError, aiohttp.ClientError):
                if (await e.get("/-/healthy", timeout=2))[0] == 200:
                    break
            assert time.monotonic() - start < 10, "no recovery after the flood"
            await asyncio.sleep(0.2)
        recovered = time.monotonic() - start
        await asyncio.sleep(1.2)  # a couple of cycles
        assert await e.verdict("busy") == "deny"
        print(f"\nfd flood: {opened} idle connections vs RLIMIT_NOFILE 128: fds {fds:.0f}, probe "
              f"{'starved' if starved else 'answered'}; answering again "
              f"{recovered:.2f}s after they closed")
        # Log of what the daemon went through while starved.
        log = pg.log.read_text(errors="replace")
        assert "Too many open files" in log or not starved, pg.log_tail()
        # ... and it had said so at start.
        assert "exceed the open-file limit (128): a connection flood can starve" in log
    finally:
        for _, w in conns:
            w.close()
        await asyncio.to_thread(pg.close)
        await fleet.stop()
