"""passguard.fields: request-derived values capped with a digest, log text made one line."""

from __future__ import annotations

import hashlib

import pytest

from passguard.fields import NAME_BYTES, cap, escape_controls, log_safe


def test_a_value_within_the_cap_is_unchanged() -> None:
    assert cap("web-1", NAME_BYTES) == "web-1"
    assert cap("x" * 253, 253) == "x" * 253


@pytest.mark.parametrize("value", ["a" * 1000, "é" * 1000, "日本" * 300, "x" * 254])
def test_a_long_value_fits_the_cap_and_ends_with_its_digest(value: str) -> None:
    got = cap(value, 253)
    assert len(got.encode()) <= 253
    digest = hashlib.sha256(value.encode()).hexdigest()
    assert got.endswith(f"…[sha256:{digest}]")
    assert value.startswith(got.split("…[sha256:")[0])  # cut on a character boundary


def test_two_long_values_with_the_same_head_stay_apart() -> None:
    assert cap("a" * 500 + "1", 253) != cap("a" * 500 + "2", 253)


def test_control_characters_are_escaped() -> None:
    assert escape_controls("a\nb\rc\td\x00e\x1bf\x7fg\u2028h\x85") == \
        "a\\nb\\rc\\td\\x00e\\x1bf\\x7fg\\u2028h\\x85"
    assert escape_controls("plain ünïcode") == "plain ünïcode"
    assert "\n" not in log_safe("x\n" * 10_000) and len(log_safe("x\n" * 10_000)) <= 4096
