"""CPU a destinations pass spends on shadow policies (issue 15 item 4).

A book of N dataplanes (mesh ``default``), each with D destinations of which
a share got new connections in the last pass, and S shadows (a mix of Mesh
off, MeshPassthrough None and Matched sets of 20 entries, tcp and tls). It
times the pure evaluation the daemon runs per pass (``passguard.gate.shadow``:
increments since the cursor, after-states, classification), with the plans
cached (the steady state: targets and control-plane state unchanged) and
with every plan recomputed (the pass after a discovery changed them).

    python -m bench.shadows [--dataplanes 1000] [--shadows 20] [--repeat 5]
"""

from __future__ import annotations

import argparse
import random
import time
from collections import deque
from typing import Any

from passguard.gate.shadow import PlanCache, Shadow, evaluate, increments, parse_shadow
from passguard.store.destinations import Destination
from passguard.targets import Target

NOW = 1_800_000_000.0


def _doc(i: int) -> dict[str, Any]:
    kind = i % 3
    if kind == 0:
        return {"type": "Mesh", "name": "default",
                "networking": {"outbound": {"passthrough": False}}}
    mode = "None" if kind == 1 else "Matched"
    spec: dict[str, Any] = {"targetRef": {"kind": "Mesh"}, "default": {"passthroughMode": mode}}
    if mode == "Matched":
        spec["default"]["appendMatch"] = [
            {"type": "IP", "value": f"10.0.{i}.{j}", "port": 443, "protocol": proto}
            for j in range(10) for proto in ("tcp", "tls")]
    return {"type": "MeshPassthrough", "name": f"p{i}", "mesh": "default", "spec": spec}


def build(dataplanes: int, shadows: int, dests: int, busy: float
          ) -> tuple[list[Target], list[tuple[str, Destination]], list[Shadow]]:
    rng = random.Random(15)
    targets = [Target(f"http://10.1.{i // 250}.{i % 250}:9901", "default", f"dp-{i}",
                      f"svc-{i % 50}") for i in range(dataplanes)]
    book = []
    for t in targets:
        for j in range(dests):
            events: deque[tuple[float, int]] = deque(
                [(NOW - 120 - k * 60, rng.randint(1, 5)) for k in range(3)][::-1])
            if rng.random() < busy:  # new connections in this pass
                events.append((NOW - rng.random() * 50, rng.randint(1, 20)))
            book.append((t.key, Destination("default", t.dataplane, t.service,
                                            f"10.0.{rng.randint(0, 30)}.{j}:443", "ipv4",
                                            NOW - 900, NOW, 10, 10, 0, events)))
    out = []
    for i in range(shadows):
        changes, _ = parse_shadow([_doc(i)])
        out.append(Shadow(f"s{i}", NOW - 3600, "bench", (), changes, NOW - 60))
    return targets, book, out


def one_pass(targets: list[Target], book: list[tuple[str, Destination]],
             shadows: list[Shadow], cache: PlanCache) -> int:
    incs = increments(book, NOW - 60)
    judged = 0
    for s in shadows:
        after = cache.get(s, "default", None, targets)
        judged += len(evaluate(s, after, incs, NOW).destinations)
    return judged


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataplanes", type=int, default=1000)
    p.add_argument("--shadows", type=int, default=20)
    p.add_argument("--destinations", type=int, default=10, help="per dataplane")
    p.add_argument("--busy", type=float, default=0.3,
                   help="share of destinations with new connections in a pass")
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args(argv)
    targets, book, shadows = build(a.dataplanes, a.shadows, a.destinations, a.busy)
    incs = len(increments(book, NOW - 60))
    cached = PlanCache()
    one_pass(targets, book, shadows, cached)  # warm the plans
    steady, cold = [], []
    for _ in range(a.repeat):
        t0 = time.process_time()
        judged = one_pass(targets, book, shadows, cached)
        steady.append(time.process_time() - t0)
        t0 = time.process_time()
        one_pass(targets, book, shadows, PlanCache())
        cold.append(time.process_time() - t0)
    print(f"{a.dataplanes} dataplanes, {len(book)} destinations, {incs} new increments, "
          f"{a.shadows} shadows ({judged} destination judgements per pass)")
    print(f"CPU per pass, plans cached:     median {sorted(steady)[len(steady) // 2] * 1000:.1f} ms"
          f" (min {min(steady) * 1000:.1f}, max {max(steady) * 1000:.1f})")
    print(f"CPU per pass, plans recomputed: median {sorted(cold)[len(cold) // 2] * 1000:.1f} ms"
          f" (min {min(cold) * 1000:.1f}, max {max(cold) * 1000:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
