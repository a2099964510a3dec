"""Where the tests find Kuma-shaped data: one place for the path logic.

* ``own(relative)`` — the project's own test data under ``tests/data/kuma``
  (hand-written in Kuma's formats, see tests/data/README.md). Always there.
* ``kuma(relative)`` — Kuma's own files (golden files, CRDs, API answers), in
  the folder named by ``$PASSGUARD_KUMA_FIXTURES`` (CI: ``../shared/fixtures/kuma``).
  Tests that read them are *cross-checks*, marked ``@cross_check``; they are
  deselected when the variable is unset (tests/conftest.py says so in the
  summary), and fail — never skip — when it is set but a file is missing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ENV = "PASSGUARD_KUMA_FIXTURES"
OWN = Path(__file__).resolve().parent / "data" / "kuma"

#: Marks a test that reads Kuma's own files (run only when $PASSGUARD_KUMA_FIXTURES is set).
cross_check = pytest.mark.kuma


def enabled() -> bool:
    return bool(os.environ.get(ENV))


def kuma_root() -> Path:
    """The folder of Kuma's own files; fails the test when it is not usable."""
    value = os.environ.get(ENV)
    if not value:
        pytest.fail(f"{ENV} is not set: this Kuma cross-check cannot run", pytrace=False)
    root = Path(value).resolve()
    if not root.is_dir():
        pytest.fail(f"{ENV}={value}: no such folder", pytrace=False)
    return root


def kuma(relative: str) -> Path:
    """One of Kuma's own files; a missing one fails the test (never a skip)."""
    path = kuma_root() / relative
    if not path.exists():
        pytest.fail(f"Kuma fixture {path} is missing ({ENV}={os.environ[ENV]})", pytrace=False)
    return path


def own(relative: str) -> Path:
    """A file of the project's own test data (tests/data/kuma/...)."""
    path = OWN / relative
    assert path.exists(), f"test data {path} is missing"
    return path
