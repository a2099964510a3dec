"""Kuma 3.0 readiness (passguard/gate/readiness.py): both readings of "no
policy", both directions (traffic cut, lockdown lifted), the documents offered
and Kuma's appendMatch validator rules."""

from __future__ import annotations

from typing import Any

import pytest

from passguard.envoy.stats import Counters
from passguard.gate import fixes
from passguard.gate import readiness as rd
from passguard.policy.effective import effective
from passguard.policy.model import Match, MeshFlag, MeshState, Policy, Proxy, TargetRef, Version
from passguard.store.destinations import DestinationView
from passguard.store.snapshot import DataplaneEvidence
from passguard.targets import Target

V214 = Version(2, 14)


def ev(name: str, conns: int = 0, covered: bool = True) -> DataplaneEvidence:
    return DataplaneEvidence(
        target=Target(f"http://{name}", "m", name, "web"), state="fresh", covered=covered,
        gap_reason=None if covered else "watched 1m of 15m",
        window={"ipv4": Counters(cx_total=conns)} if conns else {}, active_connections=0,
        latest={"ipv4": Counters(cx_total=conns)}, uptime=100.0, last_success=1.0,
        last_attempt=1.0, error=None, scrape_duration=0.01)


def dest(name: str, address: str, conns: int, routes: tuple[str, ...] = ()) -> DestinationView:
    return DestinationView("m", name, "web", address, "ipv4", 1.0, 1.0, conns, conns, 0, routes)


def proxy(name: str, **tags: str) -> Proxy:
    return Proxy("m", name, ({"kuma.io/service": "web", **tags},), {}, ("",), (80,), True)


def state(flag: bool | None, policies: tuple[Policy, ...], *names: str,
          version: Version = V214) -> MeshState:
    return MeshState("m", MeshFlag("m", flag), policies, tuple(proxy(n) for n in names),
                     version, "http://cp", 0.0, 1e9)


def run(st: MeshState | None, evidence: tuple[DataplaneEvidence, ...] = (),
        dests: tuple[DestinationView, ...] = ()) -> rd.MeshReadiness:
    return rd.readiness("m", "3.0", st, False, evidence, dests, 900.0)


def names(r: rd.MeshReadiness, outcome: str, what: str) -> list[str]:
    body: dict[str, Any] = r.as_json()["outcomes"][outcome]
    return list(body[what])


DISPLAY = "kuma.io/display-name"
DP_A = Policy("only-a", "m", "Matched", (Match("IP", "10.0.0.1", 443, "tls"),),
              TargetRef("Dataplane", labels={DISPLAY: "a"}))


def test_flag_on_no_policy_is_ready_as_if_true_but_cut_under_none() -> None:
    r = run(state(None, (), "a", "b"), (ev("a", 5), ev("b")),
            (dest("a", "10.0.0.9:443", 5),))
    assert names(r, "as_if_true", "traffic_cut") == []
    # #18801: no policy means None: the busy one loses its traffic, the idle one nothing.
    assert names(r, "none", "traffic_cut") == ["a"]
    assert r.status == "not_ready"
    [keep] = r.keep_traffic
    # 3.0 selects Dataplanes by labels only.
    assert keep["spec"]["targetRef"] == {"kind": "Dataplane", "labels": {DISPLAY: "a"}}
    # A generic passthrough cluster does not show TLS vs TCP: both entries.
    assert keep["spec"]["default"]["appendMatch"] == [
        {"type": "IP", "value": "10.0.0.9", "port": 443, "protocol": "tcp"},
        {"type": "IP", "value": "10.0.0.9", "port": 443, "protocol": "tls"}]
    assert r.notes == []  # the model confirmed the document keeps it


def test_flag_off_lockdown_is_lifted_as_if_true_and_kept_under_none() -> None:
    r = run(state(False, (), "a", "b"), (ev("a"), ev("b")))
    assert names(r, "as_if_true", "lockdown_lifted") == ["a", "b"]
    assert names(r, "none", "lockdown_lifted") == []
    assert r.status == "not_ready"
    assert r.keep_lockdown == [{"type": "MeshPassthrough", "name": "passguard-keep-lockdown",
                                "mesh": "m", "spec": {"targetRef": {"kind": "Mesh"},
                                                      "default": {"passthroughMode": "None"}}}]


def test_lockdown_document_does_not_override_another_policy() -> None:
    # b has a Mesh-wide Matched policy that sorts after passguard-keep-lockdown:
    # a mesh-wide None would outrank it, so one per dataplane is offered.
    matched_b = Policy("zz-b", "m", "Matched", (Match("IP", "10.0.0.1", 443),))
    st = state(False, (matched_b,), "a", "b")
    r = run(st, (ev("a"), ev("b")))
    assert names(r, "as_if_true", "lockdown_lifted") == []  # zz-b selects both
    st = state(False, (Policy("zz-b", "m", "Matched", (Match("IP", "10.0.0.1", 443),),
                              TargetRef("Dataplane", labels={DISPLAY: "b"})),
                       Policy("all-c", "m", "All", (), TargetRef("Dataplane",
                                                                 labels={DISPLAY: "c"}))),
               "a", "b", "c")
    r = run(st, (ev("a"), ev("b"), ev("c")))
    assert names(r, "as_if_true", "lockdown_lifted") == ["a"]
    assert r.notes == []
    policies = [*st.policies, *(fixes.policy(d) for d in r.keep_lockdown)]
    for v in (V214, Version(3, 0)):
        assert effective(st.flag, policies, proxy("a"), v).mode == "off"
        for other in ("b", "c"):
            assert effective(st.flag, policies, proxy(other), v).same_as(
                effective(st.flag, st.policies, proxy(other), v))


def test_a_mesh_wide_none_that_would_outrank_a_policy_is_split_per_dataplane() -> None:
    # Among equals the smallest name wins: a Mesh-wide None named
    # passguard-keep-lockdown would outrank the gateways' Mesh-wide Matched
    # "zz-gateways" and cut them. The model sees it and offers one per dataplane.
    gw = Proxy("m", "gw", ({"kuma.io/service": "edge"},), {}, ("",), (80,), True,
               gateway="delegated")
    zz = Policy("zz-gateways", "m", "Matched", (Match("IP", "10.0.0.2", 443),),
                TargetRef("Mesh", proxy_types=("Gateway",)))
    st = MeshState("m", MeshFlag("m", False), (zz,), (proxy("a"), gw), V214, "http://cp",
                   0.0, 1e9)
    r = run(st, (ev("a"), ev("gw")))
    assert names(r, "as_if_true", "lockdown_lifted") == ["a"]
    assert [d["spec"]["targetRef"] for d in r.keep_lockdown] == [
        {"kind": "Dataplane", "labels": {DISPLAY: "a"}}]
    policies = [*st.policies, *(fixes.policy(d) for d in r.keep_lockdown)]
    for v in (V214, Version(3, 0)):
        assert effective(st.flag, policies, gw, v).mode == "matched"
        assert effective(st.flag, policies, proxy("a"), v).mode == "off"


def test_a_policy_selecting_by_name_selects_nothing_on_3_0() -> None:
    by_name = Policy("lock-a", "m", "None", (), TargetRef("Dataplane", name="a"))
    r = run(state(None, (by_name,), "a"), (ev("a"),))
    assert names(r, "as_if_true", "lockdown_lifted") == ["a"]
    assert any("by labels only" in n for n in r.notes)


def test_matched_policy_survives_and_the_unselected_busy_one_is_named() -> None:
    st = state(None, (DP_A,), "a", "b", "c")
    r = run(st, (ev("a", 3), ev("b", 4), ev("c")),
            (dest("a", "10.0.0.1:443", 3, ("meshpassthrough_tls_10.0.0.1_443",)),
             dest("b", "10.0.0.2:80", 4)))
    # Only b has traffic and no policy: exactly it is cut under None.
    assert names(r, "none", "traffic_cut") == ["b"]
    assert names(r, "as_if_true", "traffic_cut") == []
    assert [d["name"] for d in r.keep_traffic] == ["passguard-keep-b"]


def test_meshsubset_policy_is_dropped_by_3_0() -> None:
    subset_none = Policy("lock-web", "m", "None", (), TargetRef("MeshSubset",
                                                                  tags={"kuma.io/service": "web"}))
    r = run(state(None, (subset_none,), "a"), (ev("a"),))
    # Locked by the MeshSubset policy today; 3.0 refuses the kind, so it opens.
    assert names(r, "as_if_true", "lockdown_lifted") == ["a"]
    assert any("MeshSubset" in n for n in r.notes)
    assert [(x.policy, x.path, x.versions) for x in r.rejected] == [
        ("lock-web", "spec.targetRef.kind", ("3.0",))]


def test_unknown_evidence_on_a_dataplane_that_loses_passthrough_is_not_ready() -> None:
    r = run(state(None, (), "a"), (ev("a", covered=False),))
    assert names(r, "none", "unknown") == ["a"]
    assert r.status == "not_ready"


def test_ready_when_nothing_changes() -> None:
    none_all = Policy("lock", "m", "None", ())
    r = run(state(True, (none_all,), "a"), (ev("a"),))
    assert r.status == "ready" and r.ready is True
    assert r.keep_traffic == r.keep_lockdown == []


def test_without_a_control_plane_readiness_is_unknown() -> None:
    r = run(None, (ev("a", 3),))
    assert r.status == "unknown" and r.ready is None
    assert "no control plane lists mesh 'm'" in r.reasons[0]
    body = r.as_json()
    assert body["outcomes"]["none"]["ready"] is None


@pytest.mark.parametrize(("match", "message"), [
    (Match("Domain", "example.com", 443, "tcp"), "protocol tcp is not supported for a domain"),
    (Match("Domain", "example.com", 443), "protocol tcp is not supported for a domain"),
    (Match("Domain", "*w.example.com", 443, "tls"), "partial wildcard"),
    (Match("Domain", "*.example.com", None, "http"), "wildcard domains doesn't work"),
    (Match("Domain", "10.0.0.1", 443, "tls"), "provided DNS has incorrect value"),
    (Match("IP", "10.0.0.300", 443), "provided IP has incorrect value"),
    (Match("CIDR", "10.0.0.0/33", 443), "provided CIDR has incorrect value"),
    (Match("IP", "10.0.0.1", 0), "port must be a valid (1-65535)"),
    (Match("IP", "10.0.0.1", None, "mysql"), "port must be defined for Mysql protocol"),
])
def test_validator_rules(match: Match, message: str) -> None:
    errors = rd.match_errors([match])
    assert any(message in m for _, m in errors), errors


def test_valid_entries_pass_and_same_port_rule_is_order_dependent() -> None:
    ok = [Match("IP", "10.0.0.1", 443, "tls"), Match("Domain", "api.example.com", 443, "tls"),
          Match("CIDR", "10.0.0.0/24", None, "tcp"), Match("Domain", "*.example.com", 443,
                                                           "tls")]
    assert rd.match_errors(ok) == []
    # tcp then http on port 80 is refused; http then tcp is not (Kuma's order).
    assert rd.match_errors([Match("IP", "10.0.0.1", 80, "tcp"),
                            Match("IP", "10.0.0.2", 80, "http")])
    assert rd.match_errors([Match("IP", "10.0.0.1", 80, "http"),
                            Match("IP", "10.0.0.2", 80, "tcp")]) == []
    dup = rd.match_errors([Match("IP", "10.0.0.1", 80), Match("IP", "10.0.0.1", 80)])
    assert dup == [("spec.default.appendMatch[1].value",
                    "value 10.0.0.1 is already defiend for this port and protocol")]


def test_rejected_entries_name_the_policy_and_path() -> None:
    bad = Policy("ext", "m", "Matched", (Match("IP", "10.0.0.1", 443, "tls"),
                                          Match("Domain", "example.com", 443, "tcp")))
    [r] = rd.rejected([bad], Version(3, 0))
    assert (r.policy, r.path, r.versions) == ("ext", "spec.default.appendMatch[1].protocol",
                                              ("2.14", "3.0"))
