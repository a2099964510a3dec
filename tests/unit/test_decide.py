"""decide() over every mode × evidence × change kind, and the exact JSON shape."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from passguard.documents import Change, Match, Resource, TargetRef
from passguard.envoy.stats import Counters
from passguard.gate.decide import Evidence, decide, overall
from passguard.store.destinations import DestinationView
from passguard.store.snapshot import DataplaneEvidence, State
from passguard.targets import Target
from passguard.verdicts import GatePolicy


def dp(name: str, *, conns: int = 0, active: int = 0, state: State = "fresh",
       covered: bool = True, fam: str = "ipv4", service: str = "web",
       tags: dict[str, str] | None = None) -> DataplaneEvidence:
    window = {fam: Counters(cx_total=conns)} if conns else {}
    latest = {fam: Counters(cx_total=conns, cx_active=active)}
    return DataplaneEvidence(
        target=Target(f"http://{name}", "default", name, service, tags or {}),
        state=state, covered=covered, gap_reason=None if covered else "watched 1m of 15m",
        window=window, active_connections=active, latest=latest, uptime=100.0,
        last_success=1.0, last_attempt=1.0, error="refused" if state == "failed" else None,
        scrape_duration=0.01)


MESH_OFF = Change(Resource("Mesh", "default", "default", "universal", "None"), None, "assumed")
MESH_ON = Change(Resource("Mesh", "default", "default", "universal", "All"), None, "assumed")
MP_NONE = Change(Resource("MeshPassthrough", "mp", "default", "universal", "None"), None,
                 "assumed")
MP_MATCHED = Change(Resource("MeshPassthrough", "mp", "default", "universal", "Matched",
                             (Match("IP", "10.0.0.1", 443),)), None, "assumed")
MP_ALL = Change(Resource("MeshPassthrough", "mp", "default", "universal", "All"), None,
                "assumed")

EVIDENCE = {
    "traffic": (dp("web-1", conns=40), dp("api-3", conns=7), dp("db-1")),
    "active": (dp("web-1", active=1), dp("db-1")),
    "none": (dp("web-1"), dp("db-1")),
    "unknown": (dp("web-1"), dp("db-1", state="stale")),
    "uncovered": (dp("web-1"), dp("db-1", covered=False)),
    "failed": (dp("web-1"), dp("db-1", state="failed")),
    "empty": (),
    "offline_only": (dp("web-1", state="offline"),),
}
REDUCING = {"mesh-off": MESH_OFF, "mp-none": MP_NONE, "mp-matched": MP_MATCHED}
NOT_REDUCING = {"mesh-on": MESH_ON, "mp-all": MP_ALL}
CAP = {"enforce": "deny", "warn": "warn", "audit": "allow"}
ORDER = ["allow", "warn", "deny"]


def expected(mode: str, fallback: str, evidence: str, change: str) -> str:
    if change in NOT_REDUCING:
        return "allow"
    base = {"traffic": "deny", "active": "deny", "none": "allow"}.get(evidence, fallback)
    return min(base, CAP[mode], key=ORDER.index)


@pytest.mark.parametrize(
    ("mode", "fallback", "evidence", "change"),
    list(itertools.product(["enforce", "warn", "audit"], ["deny", "warn", "allow"],
                           list(EVIDENCE), [*REDUCING, *NOT_REDUCING])),
)
def test_verdict_table(mode: str, fallback: str, evidence: str, change: str) -> None:
    ch = {**REDUCING, **NOT_REDUCING}[change]
    d = decide(ch, Evidence("default", 900.0, EVIDENCE[evidence]),
               GatePolicy(mode, fallback))  # type: ignore[arg-type]
    assert d.verdict == expected(mode, fallback, evidence, change)
    assert d.reasons, "every decision says why"
    if change in REDUCING and d.verdict != expected("enforce", fallback, evidence, change):
        assert any("would" in w for w in d.warnings), "a capped verdict says what it would be"


def test_decision_json_shape_matches_design() -> None:
    ev = Evidence("default", 900.0, (dp("web-1", conns=40, active=1), dp("api-3", conns=7),
                                     *(dp(f"idle-{i}") for i in range(9)),
                                     dp("gone", state="offline")))
    d = decide(MESH_OFF, ev, GatePolicy("enforce", "deny"))
    body = overall([d], "enforce", [])
    assert json.loads(json.dumps(body)) == {
        "allowed": False,
        "verdict": "deny",
        "mode": "enforce",
        "decisions": [{
            "mesh": "default",
            "change": {"kind": "Mesh", "name": "default",
                       "effect": "disables passthrough for the whole mesh "
                                 "(previous state assumed enabled)"},
            "verdict": "deny",
            "mode": "enforce",
            "reasons": [
                "2 of 12 dataplanes opened 47 passthrough connections in the last 15m that "
                "the change would cut: web-1 (40), api-3 (7)",
                "1 passthrough connection is open now: web-1 (1)",
            ],
            "evidence": {
                "window_seconds": 900.0,
                "dataplanes": {"total": 12, "with_traffic": 2, "unknown": 0, "offline": 1},
                "connections": 47, "active_connections": 1, "destinations": [],
            },
            # DESIGN §6: per affected dataplane, before/after and what it loses.
            "dataplanes": [
                {"dataplane": "web-1", "before": "All", "after": "None", "unproven": [],
                 "lost": [{"address": "(destinations not observed)", "transport": None,
                           "connections": 40}]},
                {"dataplane": "api-3", "before": "All", "after": "None", "unproven": [],
                 "lost": [{"address": "(destinations not observed)", "transport": None,
                           "connections": 7}]},
            ],
        }],
        "warnings": [
            "Mesh default: no control plane lists this mesh: judged the document(s) alone as "
            "the after-state, every current passthrough connection as at stake, a dataplane a "
            "policy no longer selects as falling back to no passthrough, and no other "
            "MeshPassthrough as outranking these documents"],
    }


def test_unknown_dataplanes_are_named() -> None:
    d = decide(MESH_OFF, Evidence("default", 900.0, EVIDENCE["failed"]),
               GatePolicy("enforce", "deny"))
    assert d.verdict == "deny"
    assert "db-1 (failed: refused)" in d.reasons[0]


def test_break_glass_allows_with_warning() -> None:
    r = Resource("Mesh", "default", "default", "kubernetes", "None", break_glass="INC-42 ok")
    d = decide(Change(r, None, "assumed"), Evidence("default", 900.0, EVIDENCE["traffic"]),
               GatePolicy("enforce", "deny"))
    assert d.verdict == "warn" and d.break_glass == "INC-42 ok"
    assert any("passguard.io/acknowledge-traffic" in w for w in d.warnings)
    assert overall([d], "enforce", [])["allowed"] is True


def test_old_state_disabled_is_not_a_reduction() -> None:
    old = Resource("Mesh", "default", "default", "universal", "None")
    new = Resource("Mesh", "default", "default", "universal", "None")
    d = decide(Change(new, old, "document"), Evidence("default", 900.0, EVIDENCE["traffic"]),
               GatePolicy("enforce", "deny"))
    assert d.verdict == "allow"
    assert d.reasons == ["does not reduce any dataplane's effective passthrough"]


def test_traffic_on_matched_clusters_is_judged_too() -> None:
    """Regression (issue 12): only the generic clusters were read, so traffic
    on meshpassthrough_* clusters never stopped a change. Without the control
    plane the document alone is the after-state, against all current traffic."""
    ev = Evidence("default", 900.0, (dp("web-1", conns=5, fam="matched"),))
    d = decide(MP_MATCHED, ev, GatePolicy("enforce", "deny"))
    assert d.verdict == "deny"  # 5 connections no observed destination explains: unproven
    assert d.dataplanes and d.dataplanes[0]["unobserved_connections"] == 5
    assert decide(MP_MATCHED, ev, GatePolicy("enforce", "deny", "warn")).verdict == "warn"
    assert decide(MP_NONE, ev, GatePolicy("enforce", "deny")).verdict == "deny"
    # Without the control plane, the Mesh flag is taken as deciding.
    assert decide(MESH_OFF, ev, GatePolicy("enforce", "deny")).verdict == "deny"


def test_matched_removing_a_match_counts_matched_family() -> None:
    old = Resource("MeshPassthrough", "mp", "default", "universal", "Matched",
                   (Match("IP", "10.0.0.1", 443), Match("IP", "10.0.0.2", 443)))
    new = Resource("MeshPassthrough", "mp", "default", "universal", "Matched",
                   (Match("IP", "10.0.0.1", 443),))
    ev = Evidence("default", 900.0, (dp("web-1", conns=5, fam="matched"),))
    assert decide(Change(new, old, "document"), ev, GatePolicy("enforce", "deny")).verdict \
        == "deny"


@pytest.mark.parametrize(("ref", "selected"), [
    (TargetRef("Dataplane", name="web-1"), ["web-1"]),
    # web-1's labels are unknown (a static target): it may carry app=demo.
    (TargetRef("Dataplane", labels={"app": "demo"}), ["web-1", "api-3"]),
    (TargetRef("Dataplane", labels={"app": "other"}), ["web-1"]),
    (TargetRef("MeshSubset", tags={"kuma.io/service": "api"}), ["api-3"]),
    (TargetRef("Mesh"), ["web-1", "api-3"]),
])
def test_target_ref_selects_dataplanes(ref: TargetRef, selected: list[str]) -> None:
    dps = (dp("web-1", conns=1), dp("api-3", conns=2, service="api", tags={"app": "demo"}))
    r = Resource("MeshPassthrough", "mp", "default", "universal", "None", target_ref=ref)
    d = decide(Change(r, None, "assumed"), Evidence("default", 900.0, dps),
               GatePolicy("enforce", "deny"))
    ev: Any = d.evidence
    assert ev["dataplanes"]["total"] == len(selected)
    for name in selected:
        assert name in d.reasons[0]


def dest(dp_name: str, address: str, window: int, active: int = 0,
         family: str = "ipv4", routes: tuple[str, ...] = ()) -> DestinationView:
    return DestinationView("default", dp_name, "web", address, family,  # type: ignore[arg-type]
                           1.0, 2.0, window, window, active, routes)


def matched(*matches: Match) -> Change:
    return Change(Resource("MeshPassthrough", "mp", "default", "universal", "Matched", matches),
                  None, "assumed")


ENF = GatePolicy("enforce", "deny")


def test_matched_allows_when_every_observed_destination_is_covered() -> None:
    ev = Evidence("default", 900.0, (dp("web-1", conns=5),),
                  (dest("web-1", "10.0.0.1:443", 3), dest("web-1", "10.1.2.3:5432", 2)))
    # Transport unknown (generic passthrough clusters): tcp and tls entries both.
    d = decide(matched(Match("IP", "10.0.0.1", 443, "tcp"), Match("IP", "10.0.0.1", 443, "tls"),
                       Match("CIDR", "10.1.0.0/16", None, "tcp"),
                       Match("CIDR", "10.1.0.0/16", None, "tls")), ev, ENF)
    assert d.verdict == "allow", d.reasons


def test_matched_with_one_transport_is_unproven_for_ip_evidence() -> None:
    """Regression (issue 12): a tcp entry keeps raw TCP only; IP evidence on a
    generic cluster cannot tell TLS from raw TCP."""
    ev = Evidence("default", 900.0, (dp("web-1", conns=3),), (dest("web-1", "10.0.0.1:443", 3),))
    d = decide(matched(Match("IP", "10.0.0.1", 443)), ev, ENF)
    assert d.verdict == "deny"
    assert d.dataplanes and d.dataplanes[0]["unproven"][0]["address"] == "10.0.0.1:443"
    assert decide(matched(Match("IP", "10.0.0.1", 443)), ev,
                  GatePolicy("enforce", "deny", "warn")).verdict == "warn"
    # Seen on a meshpassthrough_tls_* cluster: the transport is known.
    tls = Evidence("default", 900.0, (dp("web-1", conns=3, fam="matched"),),
                   (dest("web-1", "10.0.0.1:443", 3, family="matched",
                         routes=("meshpassthrough_tls_10.0.0.1_443",)),))
    assert decide(matched(Match("IP", "10.0.0.1", 443, "tls")), tls, ENF).verdict == "allow"
    assert decide(matched(Match("IP", "10.0.0.1", 443, "tcp")), tls, ENF).verdict == "deny"


def test_matched_refuses_naming_the_uncovered_destination() -> None:
    ev = Evidence("default", 900.0, (dp("web-1", conns=5),),
                  (dest("web-1", "10.0.0.1:443", 3), dest("web-1", "10.9.9.9:443", 2)))
    d = decide(matched(Match("IP", "10.0.0.1", 443)), ev, ENF)
    assert d.verdict == "deny"
    ev_json: Any = d.evidence
    assert ev_json["destinations"] == [
        {"address": "10.9.9.9:443", "dataplanes": ["web-1"], "connections": 2}]
    assert any("destinations that would be cut: 10.9.9.9:443 (2)" in r for r in d.reasons)


def test_matched_port_must_match() -> None:
    ev = Evidence("default", 900.0, (dp("web-1", conns=1),), (dest("web-1", "10.0.0.1:80", 1),))
    assert decide(matched(Match("IP", "10.0.0.1", 443)), ev, ENF).verdict == "deny"


def test_matched_unexplained_connections_are_not_assumed_harmless() -> None:
    # 5 connections in the window, only 3 seen at a destination.
    ev = Evidence("default", 900.0, (dp("web-1", conns=5),), (dest("web-1", "10.0.0.1:443", 3),))
    d = decide(matched(Match("IP", "10.0.0.1", 443, "tcp"), Match("IP", "10.0.0.1", 443, "tls")),
               ev, ENF)
    assert d.verdict == "deny"
    assert any("did not observe" in r and "web-1 (2)" in r for r in d.reasons)


def test_matched_domain_cannot_be_proven() -> None:
    ev = Evidence("default", 900.0, (dp("web-1", conns=1),),
                  (dest("web-1", "93.184.216.34:443", 1),))
    d = decide(matched(Match("Domain", "example.com", 443, "tls")), ev, ENF)
    assert d.verdict == "deny"
    assert d.dataplanes and d.dataplanes[0]["unproven"][0]["address"] == "93.184.216.34:443"


def test_disable_lists_the_destinations_that_would_be_cut() -> None:
    ev = Evidence("default", 900.0, (dp("web-1", conns=4),), (dest("web-1", "[::1]:8443", 4),))
    d = decide(MESH_OFF, ev, ENF)
    ev_json: Any = d.evidence
    assert ev_json["destinations"][0]["address"] == "[::1]:8443"


def _as_json(d: Any) -> str:
    return json.dumps([d.to_json(), d.warnings, d.break_glass, d.digest], sort_keys=True)


def test_a_shared_memo_gives_exactly_the_decisions_without_it() -> None:
    """The gate keeps each mesh's evidence summary per snapshot. One memo for
    every evidence set, selector, change and policy of the table, asked twice
    (computed, then from the memo), must answer what decide() alone answers;
    and an Evidence built differently for the same mesh (no destinations)
    must not be given another one's summary."""
    memo: dict[Any, Any] = {}
    dests = (dest("web-1", "10.0.0.1:443", 30), dest("web-1", "10.9.9.9:443", 10))
    evidences = [Evidence("default", 900.0, dps, dests if name == "traffic" else ())
                 for name, dps in EVIDENCE.items()]
    evidences.append(Evidence("default", 900.0, EVIDENCE["traffic"]))  # same mesh, no dests
    evidences.append(Evidence("default", None, EVIDENCE["traffic"], dests, inventory=False))
    refs = [TargetRef(), TargetRef("Dataplane", name="web-1"),
            TargetRef("MeshSubset", tags={"kuma.io/service": "web"}), TargetRef("MeshGateway")]
    changes = [*REDUCING.values(), *NOT_REDUCING.values(),
               matched(Match("IP", "10.0.0.1", 443)), matched(Match("CIDR", "10.0.0.0/8"))]
    changes += [Change(Resource("MeshPassthrough", "mp", "default", "universal", "None",
                                target_ref=ref), None, "assumed") for ref in refs]
    policies = [GatePolicy(m, f) for m in ("enforce", "warn", "audit")  # type: ignore[arg-type]
                for f in ("deny", "allow")]
    compared = 0
    for _ in range(2):
        for ev, ch, pol in itertools.product(evidences, changes, policies):
            d = decide(ch, ev, pol, memo)
            assert _as_json(d) == _as_json(decide(ch, ev, pol)), (ev, ch, pol)
            # The evidence encoded once per summary says what the dict says.
            assert (d.evidence_json is None) == (d.evidence is None)
            assert d.evidence_json is None or json.loads(d.evidence_json) == d.evidence
            compared += 1
    assert compared == 2 * len(evidences) * len(changes) * len(policies)
    assert 0 < len(memo) < compared // 2  # shared, not one entry per question


def test_the_memo_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from passguard.gate import decide as decide_mod

    monkeypatch.setattr(decide_mod, "MEMO_ENTRIES", 3)
    memo: dict[Any, Any] = {}
    ev = Evidence("default", 900.0, EVIDENCE["traffic"])
    for i in range(10):
        d = decide(matched(Match("IP", f"10.0.0.{i}", 443)), ev, ENF, memo)
        assert d.verdict == "deny"
    assert len(memo) == 3


def test_responses_with_the_evidence_spliced_in_read_as_the_body() -> None:
    """service.encode() splices each decision's evidence in as the text its
    summary encoded; read back, it is the body, for every decision of the
    table alone and in pairs, after the route has changed the body (an audit
    failure turns it into a deny with a warning), and when the decisions do
    not line up with the body (encoded whole)."""
    from passguard.gate import service
    from passguard.gate.decide import overall

    memo: dict[Any, Any] = {}
    dests = (dest("web-1", "10.0.0.1:443", 30),)
    decisions = [decide(ch, Evidence("default", 900.0, dps, dests if n == "traffic" else ()),
                        pol, memo)
                 for n, dps in EVIDENCE.items()
                 for ch in [*REDUCING.values(), *NOT_REDUCING.values(),
                            matched(Match("CIDR", "10.0.0.0/8"))]
                 for pol in (ENF, GatePolicy("warn", "allow"))]
    assert any(d.evidence_json is not None for d in decisions)
    groups = [[d] for d in decisions] + [list(p) for p in itertools.pairwise(decisions)] + [[]]
    for group in groups:
        body = overall(group, "enforce", ["a warning"])
        assert json.loads(service.encode(body, group)) == body
        body["allowed"], body["verdict"] = False, "deny"
        body["warnings"].append("the audit log cannot be written")
        assert json.loads(service.encode(body, group)) == body
        if group:
            assert json.loads(service.encode(body, group[:-1])) == body
            body["decisions"][0]["evidence"] = {"replaced": True}
            assert json.loads(service.encode(body, group)) == body
            if group[0].dataplanes is not None:
                body["decisions"][0]["dataplanes"] = [{"replaced": True}]
                assert json.loads(service.encode(body, group)) == body
    assert json.loads(service.encode({"allowed": True}, [])) == {"allowed": True}


def test_the_dataplane_list_is_spliced_in_as_its_judgement_encoded_it() -> None:
    """The per-dataplane list is encoded once per judgement, not per answer:
    the text in the answer is the judgement's own (a stand-in shows it)."""
    from dataclasses import replace

    from passguard.gate import service
    from passguard.gate.decide import overall

    d = decide(REDUCING["mesh-off"], Evidence("default", 900.0, EVIDENCE["traffic"], ()), ENF,
               {})
    assert d.dataplanes and d.dataplanes_json == json.dumps(d.dataplanes)
    marked = replace(d, dataplanes_json='["spliced"]')
    body = overall([marked], "enforce", [])
    assert json.loads(service.encode(body, [marked]))["decisions"][0]["dataplanes"] == [
        "spliced"]
