"""A scrape target: one sidecar's Envoy admin, with the labels that place it in a mesh."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Target:
    url: str
    mesh: str
    dataplane: str
    service: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)
    # Known disconnected from the control plane: listed, never counted unknown.
    offline: bool = False
    # Wall time it disconnected, when the control plane said (the gate counts a
    # dataplane offline for less than the window as unknown: it applies a
    # change when it reconnects, and its evidence ends at the disconnect).
    offline_since: float | None = None
    #: Identity across restarts and reloads: a dataplane name is unique in its
    #: mesh. Computed once: the store, its histories, evidence and marks, and
    #: the scrape worker's channel each key a dict by it, and a new string per
    #: lookup left one copy per dict (~17 MB at 50,000 dataplanes). Not
    #: sys.intern: on Python 3.12 interned strings are never freed, and a
    #: fleet's dataplane names come and go.
    key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", f"{self.mesh}/{self.dataplane}")
