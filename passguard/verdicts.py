"""The gate's policy: its mode and what it answers when evidence is missing or unproven.

Below the config loader and the gate alike: ``decide()`` takes a
``GatePolicy`` without importing the config file's machinery.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

Mode = Literal["enforce", "warn", "audit"]
Fallback = Literal["deny", "warn", "allow"]
MODES: tuple[Mode, ...] = ("enforce", "warn", "audit")
FALLBACKS: tuple[Fallback, ...] = ("deny", "warn", "allow")
Unproven = Literal["deny", "warn"]
UNPROVEN: tuple[Unproven, ...] = ("deny", "warn")


@dataclass(frozen=True)
class GatePolicy:
    mode: Mode = "enforce"
    on_insufficient_data: Fallback = "deny"
    # Traffic the after-state may or may not keep (transport or name unknown).
    on_unproven: Unproven = "deny"


@dataclass(frozen=True)
class GateConfig:
    mode: Mode = "enforce"
    on_insufficient_data: Fallback = "deny"
    meshes: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    on_unproven: Unproven = "deny"

    def policy_for(self, mesh: str) -> GatePolicy:
        override = self.meshes.get(mesh, {})
        mode = override.get("mode", self.mode)
        fallback = override.get("on_insufficient_data", self.on_insufficient_data)
        unproven = override.get("on_unproven", self.on_unproven)
        return GatePolicy(mode=mode, on_insufficient_data=fallback,  # type: ignore[arg-type]
                          on_unproven=unproven)  # type: ignore[arg-type]
