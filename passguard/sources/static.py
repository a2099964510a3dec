"""Source ``envoy``: targets listed in the config and in target files.

Target files are globbed and re-read when their size or mtime changes, so a
configuration manager can drop a file into ``targets.d/`` without a reload. A
file that stops parsing keeps its last good targets (and says why): a typo must
not make dataplanes silently disappear from the evidence.
"""

from __future__ import annotations

import glob
import logging
from pathlib import Path

from passguard.config import EnvoySource, TargetConfig, load_target_file
from passguard.errors import ConfigError
from passguard.targets import Target

log = logging.getLogger(__name__)


def to_target(tc: TargetConfig) -> Target:
    tags = {k: v for k, v in tc.labels.items() if k not in ("mesh", "dataplane", "service")}
    return Target(url=tc.url, mesh=tc.mesh, dataplane=tc.dataplane, service=tc.service,
                  tags=tags)


class StaticSource:
    def __init__(self, cfg: EnvoySource) -> None:
        self.cfg = cfg
        self._files: dict[str, tuple[tuple[float, int], list[Target]]] = {}
        self.errors: dict[str, str] = {}

    def targets(self) -> list[Target]:
        out = [to_target(t) for t in self.cfg.targets]
        seen: set[str] = set()
        for pattern in self.cfg.target_files:
            for name in sorted(glob.glob(pattern)):
                seen.add(name)
                out.extend(self._read(Path(name)))
        for gone in set(self._files) - seen:
            del self._files[gone]
            self.errors.pop(gone, None)
        return out

    def _read(self, path: Path) -> list[Target]:
        name = str(path)
        try:
            st = path.stat()
        except OSError:
            return self._files.get(name, ((0.0, 0), []))[1]
        stamp = (st.st_mtime, st.st_size)
        cached = self._files.get(name)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            targets = [to_target(t) for t in load_target_file(path)]
        except ConfigError as exc:
            if self.errors.get(name) != str(exc):
                log.warning("target file %s is invalid, keeping its last good targets: %s",
                            name, exc)
            self.errors[name] = str(exc)
            return cached[1] if cached else []
        self.errors.pop(name, None)
        self._files[name] = (stamp, targets)
        log.info("target file %s: %d targets", name, len(targets))
        return targets
