"""Suite-wide hooks: the Kuma cross-checks (tests marked ``kuma``).

They read Kuma's own files from ``$PASSGUARD_KUMA_FIXTURES`` (tests/kuma_fixtures.py).
Without the variable they are deselected, and the terminal summary says so
and how to run them: a fresh clone passes on its own data, but never silently.
"""

from __future__ import annotations

import os

import pytest

from tests.kuma_fixtures import ENV, enabled

_DESELECTED = pytest.StashKey[int]()
_SELECTED = pytest.StashKey[int]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"kuma: cross-check against Kuma's own files (runs when ${ENV} is set)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    cross = [item for item in items if item.get_closest_marker("kuma")]
    if enabled():
        config.stash[_SELECTED] = len(cross)
        return
    config.stash[_DESELECTED] = len(cross)
    if cross:
        config.hook.pytest_deselected(items=cross)
        items[:] = [item for item in items if not item.get_closest_marker("kuma")]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter,
                            config: pytest.Config) -> None:
    if _DESELECTED in config.stash:
        count = config.stash[_DESELECTED]
        terminalreporter.write_sep("=", "Kuma cross-checks", yellow=True)
        terminalreporter.write_line(
            f"Kuma cross-checks NOT run ({count} tests deselected): {ENV} is not set. "
            f"To run them: {ENV}=/path/to/shared/fixtures/kuma bash .ci/test "
            "(CI's .ci/run does this).", yellow=True)
    elif _SELECTED in config.stash:
        terminalreporter.write_line(
            f"Kuma cross-checks: {config.stash[_SELECTED]} tests selected against "
            f"{ENV}={os.environ[ENV]}")
