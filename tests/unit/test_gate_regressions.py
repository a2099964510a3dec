"""Every false allow and needless refusal of issue 12, as a named regression.

Each test states the control plane's current policy set (a ``MeshState``,
what the ``kuma`` source lists), the traffic passguard saw, and the change
asked about; the gate must answer for the right reason.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest

from passguard.documents import parse_documents
from passguard.envoy.stats import Counters
from passguard.gate import service
from passguard.gate.decide import Evidence, decide_mesh
from passguard.policy.model import MeshFlag, MeshState, Policy, Proxy, Version
from passguard.store.destinations import DestinationView
from passguard.store.snapshot import DataplaneEvidence, Snapshot
from passguard.targets import Target
from passguard.verdicts import GateConfig, GatePolicy

MESH = "shop"
ENFORCE = GatePolicy("enforce", "deny")


def evidence(name: str, conns: int = 0, fam: str = "ipv4", state: str = "fresh",
             since: float | None = None) -> DataplaneEvidence:
    window = {fam: Counters(cx_total=conns)} if conns else {}
    return DataplaneEvidence(
        # The service is the name's first word, as the proxies of state() say.
        target=Target(f"http://{name}", MESH, name, name.split("-")[0], {}, state == "offline",
                      since),
        state=state, covered=True, gap_reason=None,  # type: ignore[arg-type]
        window=window, active_connections=0, latest={fam: Counters(cx_total=conns)},  # type: ignore[dict-item]
        uptime=100.0, last_success=1.0, last_attempt=1.0, error=None, scrape_duration=0.01)


def dest(dp: str, address: str, conns: int, route: str = "") -> DestinationView:
    fam = "matched" if route else "ipv4"
    return DestinationView(MESH, dp, "web", address, fam, 1.0, 2.0, conns, conns, 0,  # type: ignore[arg-type]
                           (route,) if route else ())


def proxy(name: str, *inbounds: dict[str, str], labels: dict[str, str] | None = None) -> Proxy:
    return Proxy(MESH, name, inbounds or ({"kuma.io/service": name.split("-")[0]},),
                 labels or {}, transparent=True)


def state(*policies: Policy, flag: bool | None = None, proxies: tuple[Proxy, ...] = (),
          version: str = "2.14.3", as_of: float = 1000.0) -> MeshState:
    return MeshState(MESH, MeshFlag(MESH, flag), policies, proxies, Version.parse(version),
                     "https://cp:5682", as_of, 90.0)


def mp(name: str, spec: dict[str, Any], k8s: bool = False) -> dict[str, Any]:
    if k8s:
        return {"apiVersion": "kuma.io/v1alpha1", "kind": "MeshPassthrough",
                "metadata": {"name": name, "namespace": "kuma-system",
                             "labels": {"kuma.io/mesh": MESH}}, "spec": spec}
    return {"type": "MeshPassthrough", "name": name, "mesh": MESH, "spec": spec}


def as_policy(doc: dict[str, Any]) -> Policy:
    [change] = parse_documents([doc]).changes
    assert change.new is not None
    return change.new.policy()


def check(docs: list[Any], st: MeshState | None, dps: tuple[DataplaneEvidence, ...],
          dests: tuple[DestinationView, ...] = (), old: list[Any] | None = None,
          gate: GateConfig | None = None, now: float = 1000.0) -> dict[str, Any]:
    snap = Snapshot(now, 900.0, 45.0, dps, destinations=dests)
    body, _ = service.check(docs, old, snap, gate or GateConfig(),
                            {MESH: st} if st else None, now)
    return body


MESH_OFF = {"type": "Mesh", "name": MESH, "networking": {"outbound": {"passthrough": False}}}
NONE_DP1 = mp("lock", {"targetRef": {"kind": "Dataplane", "name": "api-1"},
                       "default": {"passthroughMode": "None"}})
PROXIES = (proxy("api-1"), proxy("web-1"))


def test_target_ref_widened_from_one_dataplane_to_the_mesh_is_refused() -> None:
    st = state(as_policy(NONE_DP1), proxies=PROXIES)
    wider = mp("lock", {"targetRef": {"kind": "Mesh"}, "default": {"passthroughMode": "None"}})
    body = check([wider], st, (evidence("api-1"), evidence("web-1", conns=9)))
    assert body["verdict"] == "deny"
    [dec] = body["decisions"]
    assert [d["dataplane"] for d in dec["dataplanes"]] == ["web-1"]
    assert dec["dataplanes"][0]["before"] == "All" and dec["dataplanes"][0]["after"] == "None"


def test_matched_scope_widened_from_subset_to_mesh_is_refused() -> None:
    subset = mp("some", {"targetRef": {"kind": "MeshSubset", "tags": {"kuma.io/service": "api"}},
                         "default": {"passthroughMode": "Matched"}})
    st = state(as_policy(subset), proxies=(proxy("api-1", {"kuma.io/service": "api"}),
                                           proxy("web-1")))
    wider = mp("some", {"targetRef": {"kind": "Mesh"}, "default": {"passthroughMode": "Matched"}})
    body = check([wider], st, (evidence("api-1"), evidence("web-1", conns=3)),
                 (dest("web-1", "203.0.113.7:443", 3),))
    assert body["verdict"] == "deny"
    assert body["decisions"][0]["evidence"]["destinations"][0]["address"] == "203.0.113.7:443"


def test_reapplied_matched_policy_dropping_a_used_destination_is_refused() -> None:
    """Traffic on meshpassthrough_* clusters, the current policy read from the CP."""
    entries = [{"type": "IP", "value": "203.0.113.7", "port": 443, "protocol": "tls"},
               {"type": "IP", "value": "203.0.113.8", "port": 443, "protocol": "tls"}]
    current = mp("egress", {"default": {"passthroughMode": "Matched", "appendMatch": entries}})
    st = state(as_policy(current), proxies=PROXIES)
    dropped = mp("egress", {"default": {"passthroughMode": "Matched", "appendMatch": entries[:1]}})
    ev = (evidence("api-1", conns=4, fam="matched"), evidence("web-1"))
    dests = (dest("api-1", "203.0.113.7:443", 1, "meshpassthrough_tls_203.0.113.7_443"),
             dest("api-1", "203.0.113.8:443", 3, "meshpassthrough_tls_203.0.113.8_443"))
    body = check([dropped], st, ev, dests)
    assert body["verdict"] == "deny"
    [row] = body["decisions"][0]["dataplanes"]
    assert row["lost"] == [{"address": "203.0.113.8:443", "transport": "tls", "connections": 3}]
    # Re-applied unchanged: the same entries keep the same traffic.
    assert check([current], st, ev, dests)["verdict"] == "allow"


def test_mesh_already_off_on_the_control_plane_is_not_a_reduction() -> None:
    st = state(flag=False, proxies=PROXIES)
    body = check([MESH_OFF], st, (evidence("api-1", conns=5),))
    assert body["verdict"] == "allow", body


def test_deleting_a_matched_policy_falls_back_to_a_mesh_flag_that_is_off() -> None:
    matched = mp("egress", {"default": {"passthroughMode": "Matched", "appendMatch": [
        {"type": "IP", "value": "203.0.113.7", "port": 443, "protocol": "tls"}]}})
    st = state(as_policy(matched), flag=False, proxies=PROXIES)
    ev = (evidence("api-1", conns=2, fam="matched"), evidence("web-1"))
    dests = (dest("api-1", "203.0.113.7:443", 2, "meshpassthrough_tls_203.0.113.7_443"),)
    body = check([{"object": None, "oldObject": matched}], st, ev, dests)
    assert body["verdict"] == "deny"
    assert body["decisions"][0]["dataplanes"][0]["after"] == "None"


def test_deleting_an_all_policy_on_a_mesh_with_the_flag_on_is_allowed() -> None:
    open_all = mp("open", {"default": {"passthroughMode": "All"}})
    st = state(as_policy(open_all), flag=None, proxies=PROXIES)
    body = check([{"object": None, "oldObject": open_all}], st, (evidence("api-1", conns=7),))
    assert body["verdict"] == "allow", body


def test_mesh_flag_is_not_judged_where_a_policy_decides() -> None:
    open_all = mp("open", {"default": {"passthroughMode": "All"}})
    st = state(as_policy(open_all), proxies=PROXIES)
    body = check([MESH_OFF], st, (evidence("api-1", conns=7), evidence("web-1", conns=1)))
    assert body["verdict"] == "allow", body
    assert "does not reduce" in body["decisions"][0]["reasons"][0]


@pytest.mark.parametrize(("version", "verdict"), [("2.9.4", "deny"), ("2.14.3", "allow")])
def test_missing_mode_follows_the_control_plane_version(version: str, verdict: str) -> None:
    """Kubernetes, mode unset: the 2.8-2.9 CRD stored None; from 2.10 Matched."""
    doc = mp("egress", {"targetRef": {"kind": "Mesh"}, "default": {"appendMatch": [
        {"type": "IP", "value": "203.0.113.7", "port": 443, "protocol": "tls"}]}}, k8s=True)
    st = state(proxies=PROXIES, version=version)
    ev = (evidence("api-1", conns=2, fam="matched"), evidence("web-1"))
    dests = (dest("api-1", "203.0.113.7:443", 2, "meshpassthrough_tls_203.0.113.7_443"),)
    assert check([doc], st, ev, dests)["verdict"] == verdict


def test_meshsubset_selects_a_dataplane_by_any_inbound() -> None:
    doc = mp("lock", {"targetRef": {"kind": "MeshSubset", "tags": {"kuma.io/service": "admin"}},
                      "default": {"passthroughMode": "None"}})
    st = state(proxies=(proxy("web-1", {"kuma.io/service": "web"}, {"kuma.io/service": "admin"}),))
    body = check([doc], st, (evidence("web-1", conns=3),))
    assert body["verdict"] == "deny"
    assert body["decisions"][0]["dataplanes"][0]["dataplane"] == "web-1"


@pytest.mark.parametrize("wrap", [
    lambda d: {"apiVersion": "v1", "kind": "List", "items": [{"kind": "List", "items": [d]}]},
    lambda d: {"apiVersion": "kuma.io/v1alpha1", "kind": "MeshList", "items": [d]},
    lambda d: {"apiVersion": "kuma.io/v1alpha1", "kind": "MeshPassthroughList", "items": [d]},
    lambda d: {"items": [d], "total": 1, "next": None},  # kumactl get -o yaml
])
def test_typed_and_nested_lists_are_read_as_kubectl_does(wrap: Any) -> None:
    body = check([wrap(MESH_OFF)], None, (evidence("api-1", conns=3),))
    assert body["verdict"] == "deny" and body["decisions"][0]["change"]["kind"] == "Mesh"


def test_kubernetes_policy_meets_its_control_plane_counterpart() -> None:
    """`name.namespace` on both sides: an update replaces the CP's copy, it is
    not a second policy beside it."""
    lock = mp("lock", {"targetRef": {"kind": "Mesh"}, "default": {"passthroughMode": "None"}},
              k8s=True)
    current = as_policy(lock)
    assert current.name == "lock.kuma-system"
    opened = mp("lock", {"targetRef": {"kind": "Mesh"}, "default": {"passthroughMode": "All"}},
                k8s=True)
    st = state(current, proxies=PROXIES)
    body = check([opened], st, (evidence("api-1"),))
    assert body["verdict"] == "allow"
    assert body["decisions"][0]["change"]["name"] == "lock.kuma-system"


def test_protocol_of_a_match_is_judged() -> None:
    """A tcp entry does not keep TLS traffic to the same address."""
    doc = mp("egress", {"default": {"passthroughMode": "Matched", "appendMatch": [
        {"type": "IP", "value": "203.0.113.7", "port": 443, "protocol": "tcp"}]}})
    st = state(proxies=PROXIES)
    ev = (evidence("api-1", conns=2, fam="matched"), evidence("web-1"))
    dests = (dest("api-1", "203.0.113.7:443", 2, "meshpassthrough_tls_203.0.113.7_443"),)
    body = check([doc], st, ev, dests)
    assert body["verdict"] == "deny"
    assert body["decisions"][0]["dataplanes"][0]["lost"][0]["transport"] == "tls"


def test_offline_dataplane_with_traffic_counts() -> None:
    st = state(proxies=PROXIES)
    body = check([MESH_OFF], st, (evidence("api-1", conns=4, state="offline", since=900.0),
                                  evidence("web-1")))
    assert body["verdict"] == "deny"


def test_offline_recently_without_complete_evidence_is_insufficient_data() -> None:
    ev = evidence("api-1", state="offline", since=900.0)
    ev = DataplaneEvidence(**{**{f: getattr(ev, f) for f in ev.__dataclass_fields__
                                 if not f.startswith("_")}, "covered": False,
                              "gap_reason": "watched 1m of 15m"})
    body = check([MESH_OFF], state(proxies=PROXIES), (ev, evidence("web-1")))
    assert body["verdict"] == "deny"
    assert "offline for less than the window" in body["decisions"][0]["reasons"][0]


def test_stale_discovery_is_insufficient_data() -> None:
    st = state(proxies=PROXIES, as_of=100.0)  # listed 900 s ago, stale after 90 s
    body = check([MESH_OFF], st, (evidence("api-1"), evidence("web-1")), now=1000.0)
    assert body["verdict"] == "deny"
    assert "stale" in body["decisions"][0]["reasons"][0]
    relaxed = GateConfig(on_insufficient_data="allow")
    assert check([MESH_OFF], st, (evidence("api-1"),), gate=relaxed)["verdict"] == "allow"


def test_http_and_grpc_on_one_port_across_policies_is_refused() -> None:
    http = mp("a", {"default": {"passthroughMode": "Matched", "appendMatch": [
        {"type": "Domain", "value": "api.example.com", "port": 80, "protocol": "http"}]}})
    grpc = mp("b", {"targetRef": {"kind": "Dataplane", "name": "api-1"},
                    "default": {"passthroughMode": "Matched", "appendMatch": [
                        {"type": "Domain", "value": "rpc.example.com", "port": 80,
                         "protocol": "grpc"}]}})
    st = state(as_policy(http), proxies=PROXIES)
    body = check([grpc], st, (evidence("api-1"), evidence("web-1")))
    assert body["verdict"] == "deny"
    assert "http, http2, grpc on the same port 80" in " ".join(body["decisions"][0]["reasons"])


# --------------------------------------------------------------------------- conservative ⊇ exact


def _random_policy(rng: random.Random, i: int) -> Policy:
    kind = rng.choice(["Mesh", "MeshSubset", "Dataplane"])
    ref: dict[str, Any] = {"kind": kind}
    if kind == "MeshSubset":
        ref["tags"] = {"kuma.io/service": rng.choice(["web", "api"])}
    if kind == "Dataplane":
        ref["name"] = rng.choice(["web-1", "api-1"])
    mode = rng.choice(["All", "Matched", "None", None])
    entries = [{"type": "CIDR", "value": rng.choice(["203.0.113.0/24", "198.51.100.0/24"]),
                "protocol": rng.choice(["tcp", "tls"])} for _ in range(rng.randint(0, 2))]
    spec: dict[str, Any] = {"targetRef": ref, "default": {"appendMatch": entries}}
    if mode:
        spec["default"]["passthroughMode"] = mode
    return as_policy(mp(f"p{i}", spec))


def test_the_conservative_judgement_never_allows_what_the_exact_one_refuses() -> None:
    """For random policy sets and changes (docs/semantics.md, "Without the
    control plane"): judged with the document alone — its previous version
    given, as an admission review or `--old` gives it — the gate refuses
    whatever it refuses knowing every policy. The premise the conservative
    judgement states is kept: no other policy outranks the changed one."""
    rng = random.Random(12)
    proxies = (proxy("web-1"), proxy("api-1", {"kuma.io/service": "api"}))
    ev = (evidence("web-1", conns=3), evidence("api-1", conns=2, fam="matched"))
    dests = (dest("web-1", "203.0.113.9:443", 3),
             dest("api-1", "198.51.100.4:443", 2, "meshpassthrough_tls_198.51.100.0/24_*"))
    checked = refused = 0
    for trial, flag in itertools.product(range(300), (None, False)):
        changed = _random_policy(rng, 0)
        new = _random_policy(rng, 0)
        # The premise: the changed policy ranks above the others for every
        # dataplane (a more specific kind, or the same kind with a smaller name).
        others = tuple(p for p in (_random_policy(rng, i) for i in range(1, 3))
                       if p.target_ref.kind == "Mesh")
        st = state(changed, *others, flag=flag, proxies=proxies)
        doc = _doc(new)
        old = _doc(changed)
        exact = check([{"object": doc, "oldObject": old}], st, ev, dests)
        alone = check([{"object": doc, "oldObject": old}], None, ev, dests)
        checked += 1
        if exact["verdict"] == "deny":
            refused += 1
            assert alone["verdict"] == "deny", (trial, changed, new, others, flag, alone)
    assert checked == 600 and refused > 50  # the property was exercised


def _doc(p: Policy) -> dict[str, Any]:
    ref: dict[str, Any] = {"kind": p.target_ref.kind}
    if p.target_ref.tags:
        ref["tags"] = dict(p.target_ref.tags)
    if p.target_ref.name:
        ref["name"] = p.target_ref.name
    default: dict[str, Any] = {"appendMatch": [
        {"type": m.type, "value": m.value, "protocol": m.protocol} for m in p.matches]}
    if p.mode:
        default["passthroughMode"] = p.mode
    return mp(p.name, {"targetRef": ref, "default": default})


def test_decide_mesh_judges_changes_of_a_request_together() -> None:
    """Two documents that only together cut traffic: the flag off and the
    policy that kept passthrough on both deleted in one request."""
    open_all = mp("open", {"default": {"passthroughMode": "All"}})
    st = state(as_policy(open_all), proxies=PROXIES)
    parsed = parse_documents([MESH_OFF, {"object": None, "oldObject": open_all}])
    ev = Evidence(MESH, 900.0, (evidence("api-1", conns=3), evidence("web-1")), state=st,
                  time=1000.0)
    decisions = decide_mesh(parsed.changes, ev, ENFORCE)
    assert [d.verdict for d in decisions] == ["deny", "deny"]


async def test_a_large_judgement_runs_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above THREAD_COST the judgement runs in the gate's worker thread, so
    the loop keeps answering probes (bench/worst_request.py measures it);
    below, on the loop, where a thread hop would cost more than the work."""
    import threading

    threads: list[str] = []
    real = service.judge

    def spy(*args: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(service, "judge", spy)
    snap = Snapshot(1000.0, 900.0, 45.0, (evidence("api-1", conns=3),))
    small, _ = await service.check_async([MESH_OFF], snap, GateConfig(), None, 1000.0)
    monkeypatch.setattr(service, "THREAD_COST", 0)
    large, _ = await service.check_async([MESH_OFF], snap, GateConfig(), None, 1000.0)
    assert threads[0] == threading.current_thread().name
    assert threads[1].startswith("passguard-gate")
    assert small == large and large["verdict"] == "deny"


def test_a_mesh_flag_turned_on_is_safe_even_with_stale_policies() -> None:
    st = state(proxies=PROXIES, as_of=100.0)
    mesh_on = {"type": "Mesh", "name": MESH, "networking": {"outbound": {"passthrough": True}}}
    assert check([mesh_on], st, (evidence("api-1", conns=3),))["verdict"] == "allow"
