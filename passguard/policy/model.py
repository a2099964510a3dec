"""The nouns of Kuma's passthrough semantics: policies, meshes, proxies, versions.

Plain frozen values, no I/O, nothing of aiohttp or the config: the gate, the
Kuma source and the tests all build them. ``docs/semantics.md`` says where in
Kuma's source each field's meaning comes from.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

PassthroughMode = Literal["All", "Matched", "None"]
MODES: tuple[PassthroughMode, ...] = ("None", "Matched", "All")
MatchType = Literal["Domain", "IP", "CIDR"]
MATCH_TYPES: tuple[MatchType, ...] = ("Domain", "IP", "CIDR")
#: The protocols an appendMatch entry may name (Kuma's ``ProtocolType`` enum).
PROTOCOLS = ("tcp", "tls", "grpc", "http", "http2", "mysql")
GatewayType = Literal["builtin", "delegated"]


@dataclass(frozen=True, slots=True)
class Match:
    """One ``appendMatch`` entry. ``protocol`` None: not written (Kuma's
    default, ``tcp``, applies); ``port`` None: any port."""

    type: str
    value: str
    port: int | None = None
    protocol: str | None = None

    @property
    def transport(self) -> str:
        """The protocol Kuma builds the filter chain for (``tcp`` when unset)."""
        return self.protocol or "tcp"

    def words(self) -> str:
        port = f":{self.port}" if self.port is not None else ""
        return f"{self.type} {self.value}{port} ({self.transport})"


@dataclass(frozen=True, slots=True)
class TargetRef:
    """``spec.targetRef`` of a policy. Absent means the whole mesh."""

    kind: str = "Mesh"
    name: str | None = None
    namespace: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)
    section_name: str | None = None
    proxy_types: tuple[str, ...] = ()

    def key(self) -> tuple[object, ...]:
        return (self.kind, self.name, self.namespace, tuple(sorted(self.labels.items())),
                tuple(sorted(self.tags.items())), self.section_name, self.proxy_types)

    def words(self) -> str:
        if self.kind == "Mesh":
            return "the whole mesh"
        if self.name:
            section = f" ({self.section_name})" if self.section_name else ""
            return f"{self.kind} {self.name}{section}"
        sel = self.labels or self.tags
        if sel:
            return f"{self.kind} " + ",".join(f"{k}={v}" for k, v in sorted(sel.items()))
        return f"every {self.kind}"


@dataclass(frozen=True, slots=True)
class Policy:
    """A MeshPassthrough as the control plane holds it. ``name`` is the
    control plane's name: ``name.namespace`` for one made on Kubernetes.
    ``mode`` None: ``passthroughMode`` not written (the version decides)."""

    name: str
    mesh: str
    mode: PassthroughMode | None
    matches: tuple[Match, ...] = ()
    target_ref: TargetRef = field(default_factory=TargetRef)
    # kuma.io/origin, kuma.io/policy-role, kuma.io/zone, k8s.kuma.io/namespace,
    # kuma.io/display-name: what ordering and selection read.
    labels: Mapping[str, str] = field(default_factory=dict)
    # Written in the Kubernetes form (the CRD's defaults applied by the API server).
    kubernetes: bool = False

    @property
    def ident(self) -> tuple[str, str, str]:
        return ("MeshPassthrough", self.mesh, self.name)

    @property
    def role(self) -> str:
        return self.labels.get("kuma.io/policy-role", "")


@dataclass(frozen=True, slots=True)
class MeshFlag:
    """A Mesh's ``networking.outbound.passthrough`` (None: not written, i.e. true)."""

    name: str
    passthrough: bool | None = None

    @property
    def enabled(self) -> bool:
        return self.passthrough is not False

    @property
    def ident(self) -> tuple[str, str, str]:
        return ("Mesh", self.name, self.name)


@dataclass(frozen=True, slots=True)
class Proxy:
    """What selection and the plugin's preconditions need of one dataplane.

    ``inbounds``: the tags of each inbound (and of a gateway's listener), in
    order; ``labels``: the resource's labels. ``transparent`` None: not known
    (no control plane said): treated as transparent, where the policy applies.
    """

    mesh: str
    name: str
    inbounds: tuple[Mapping[str, str], ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    inbound_names: tuple[str | None, ...] = ()
    inbound_ports: tuple[int | None, ...] = ()
    transparent: bool | None = None
    bind_outbounds: bool = False
    gateway: GatewayType | None = None
    # False: what passguard knows of its tags is partial (a static target's
    # labels): selection must not rule it out on a tag it cannot see.
    complete: bool = True

    @property
    def key(self) -> str:
        return f"{self.mesh}/{self.name}"


_VERSION = re.compile(r"^v?(\d+)\.(\d+)(?:\.(\d+))?")


@dataclass(frozen=True, slots=True, order=True)
class Version:
    """The Kuma version a control plane runs (Kong Mesh reports ``basedOnKuma``)."""

    major: int
    minor: int
    patch: int = 0

    @classmethod
    def parse(cls, text: str | None) -> Version | None:
        """``2.14.3``, ``v2.10.0-rc.1``; None for what is not a release (``dev``)."""
        if not text:
            return None
        m = _VERSION.match(text.strip())
        if m is None:
            return None
        return cls(int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))

    def at_least(self, major: int, minor: int) -> bool:
        return (self.major, self.minor) >= (major, minor)

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


@dataclass(frozen=True, slots=True)
class MeshState:
    """What a control plane said of one mesh at its last discovery pass: the
    current policy set, the proxies it applies to, and the Kuma version."""

    mesh: str
    flag: MeshFlag
    policies: tuple[Policy, ...]
    proxies: tuple[Proxy, ...]
    version: Version | None
    source: str  # the control plane's URL, for reasons
    # Wall time of the last pass that listed this mesh completely.
    as_of: float
    # Seconds after ``as_of`` past which the state is too old to judge on.
    stale_after: float

    def stale(self, now: float) -> bool:
        return now - self.as_of > self.stale_after
