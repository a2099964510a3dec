"""Shadow policies, pure part: names, documents, increments, classification."""

from __future__ import annotations

import subprocess
import sys
from collections import deque
from typing import Any

import pytest

from passguard.errors import InputError
from passguard.gate.shadow import (
    PlanCache,
    Shadow,
    after_states,
    check_name,
    evaluate,
    increments,
    parse_shadow,
)
from passguard.store.destinations import Destination
from passguard.targets import Target

T0 = 1_800_000_000.0
TARGETS = [Target("http://a", "m", "web-1", "web"), Target("http://b", "m", "api-1", "api"),
           Target("http://c", "other", "x-1", "x")]


def matched(*entries: tuple[str, int, str], mesh: str = "m") -> dict[str, Any]:
    return {"type": "MeshPassthrough", "name": "lock", "mesh": mesh, "spec": {
        "targetRef": {"kind": "Mesh"}, "default": {"passthroughMode": "Matched", "appendMatch": [
            {"type": "IP", "value": ip, "port": port, "protocol": proto}
            for ip, port, proto in entries]}}}


def shadow(*docs: Any, created: float = T0, until: float = T0) -> Shadow:
    changes, _ = parse_shadow(list(docs))
    return Shadow("s", created, "test", tuple(docs), changes, until)


def dest(dp: str, address: str, *events: tuple[float, int], mesh: str = "m",
         routes: tuple[str, ...] = ()) -> Destination:
    return Destination(mesh, dp, "svc", address, "ipv4", T0, T0, sum(n for _, n in events),
                       0, 0, deque(events), routes)


def key(dp: str, mesh: str = "m") -> str:
    return next(t.key for t in TARGETS if t.dataplane == dp and t.mesh == mesh)


def book(*dests: Destination) -> list[tuple[str, Destination]]:
    return [(key(d.dataplane, d.mesh), d) for d in dests]


@pytest.mark.parametrize("name", ["a", "lockdown-2026", "x" * 63, "0a"])
def test_good_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "A", "-a", "a-", "a_b", "a.b", "x" * 64, "a/b", 5])
def test_bad_names_name_the_field(name: object) -> None:
    with pytest.raises(InputError, match=r"^name: "):
        check_name(name)


def test_documents_are_validated_like_check() -> None:
    with pytest.raises(InputError, match="no Mesh or MeshPassthrough"):
        parse_shadow([{"type": "TrafficRoute", "name": "x", "mesh": "m"}])
    with pytest.raises(InputError, match="passthroughMode"):
        parse_shadow([{"type": "MeshPassthrough", "name": "x", "mesh": "m",
                       "spec": {"default": {"passthroughMode": "Sometimes"}}}])
    with pytest.raises(InputError, match="oldObject"):
        parse_shadow([{"object": matched(), "oldObject": matched()}])
    with pytest.raises(InputError, match="appendMatch"):
        parse_shadow([matched(*[("10.0.0.1", p, "tcp") for p in range(1, 4)])], max_matches=2)


def test_increments_after_the_cursor_only() -> None:
    d = dest("web-1", "10.0.0.1:443", (T0 - 5, 1), (T0 + 1, 2), (T0 + 2, 3))
    got = increments(book(d), T0)
    assert sorted((i.t, i.n) for i in got) == [(T0 + 1, 2), (T0 + 2, 3)]
    assert increments(book(d), T0 + 2) == []


def test_classification_cut_kept_unproven() -> None:
    s = shadow(matched(("10.0.0.1", 443, "tcp"), ("10.0.0.1", 443, "tls"),
                       ("10.0.0.2", 80, "tcp")))
    after = after_states(s, "m", None, TARGETS)
    assert set(after) == {key("web-1"), key("api-1")}  # the other mesh is untouched
    incs = increments(book(
        dest("web-1", "10.0.0.1:443", (T0 + 1, 4)),          # tcp and tls entries: kept
        dest("web-1", "10.0.0.9:443", (T0 + 2, 3), (T0 + 3, 1)),  # no entry: cut
        dest("api-1", "10.0.0.2:80", (T0 + 4, 2)),            # tcp only, transport unknown
        dest("x-1", "10.0.0.9:443", (T0 + 5, 7), mesh="other"),  # not this shadow's mesh
    ), T0)
    tally = evaluate(s, after, incs, T0 + 10)
    kept = tally.destinations[("m", "web-1", "10.0.0.1:443")]
    assert (kept.refused, kept.unproven, kept.allowed) == (0, 0, 4)
    cut = tally.destinations[("m", "web-1", "10.0.0.9:443")]
    assert (cut.refused, cut.first_refused, cut.last_refused) == (4, T0 + 2, T0 + 3)
    unproven = tally.destinations[("m", "api-1", "10.0.0.2:80")]
    assert (unproven.refused, unproven.unproven, unproven.allowed) == (0, 2, 0)
    assert ("other", "x-1", "10.0.0.9:443") not in tally.destinations
    assert tally.dataplanes() == {("m", "web-1"): (4, 0, 4), ("m", "api-1"): (0, 2, 0)}
    assert sum(r for r, _ in tally.hours.values()) == 4


def test_transport_known_from_a_meshpassthrough_cluster() -> None:
    s = shadow(matched(("10.0.0.2", 80, "tcp")))
    incs = increments(book(dest("api-1", "10.0.0.2:80", (T0 + 1, 2),
                                routes=("meshpassthrough_tcp_10.0.0.2_80",))), T0)
    d = evaluate(s, after_states(s, "m", None, TARGETS), incs, T0 + 5).destinations[
        ("m", "api-1", "10.0.0.2:80")]
    assert (d.allowed, d.transport) == (2, "tcp")


def test_mesh_off_cuts_everything_and_respects_the_cursor() -> None:
    s = shadow({"type": "Mesh", "name": "m", "networking": {"outbound": {"passthrough": False}}},
               until=T0 + 2)
    incs = increments(book(dest("web-1", "1.1.1.1:53", (T0 + 1, 1), (T0 + 3, 2),
                                (T0 + 20, 9))), T0)
    tally = evaluate(s, after_states(s, "m", None, TARGETS), incs, T0 + 10)
    # Before the cursor: already counted; after the pass's end: the next pass's.
    assert tally.dataplanes() == {("m", "web-1"): (2, 0, 0)}


def test_a_shadow_that_opens_passthrough_judges_nothing() -> None:
    s = shadow({"type": "Mesh", "name": "m", "networking": {"outbound": {"passthrough": True}}})
    assert after_states(s, "m", None, TARGETS) == {}


def test_plan_cache_recomputes_when_targets_change() -> None:
    s = shadow(matched(("10.0.0.1", 443, "tcp")))
    cache = PlanCache()
    first = cache.get(s, "m", None, TARGETS[:1])
    assert cache.get(s, "m", None, TARGETS[:1]) is first
    assert set(cache.get(s, "m", None, TARGETS[:2])) == {key("web-1"), key("api-1")}


def test_importable_without_aiohttp_or_sqlite() -> None:
    code = ("import sys; sys.modules['aiohttp'] = None; sys.modules['sqlite3'] = None; "
            "import passguard.gate.shadow")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
