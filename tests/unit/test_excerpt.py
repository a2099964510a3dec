"""passguard.envoy.excerpt: what of a scraped answer may reach a log line."""

from __future__ import annotations

from passguard.envoy.excerpt import for_log


def test_control_characters_are_escaped() -> None:
    text = "ok\nFAKE 2024 ERROR forged\r\x1b[2J\x00\u202etxt.exe\\"
    out = for_log(text)
    assert out == "ok\\nFAKE 2024 ERROR forged\\r\\x1b[2J\\x00\\u202etxt.exe\\\\"
    assert all(ch.isprintable() for ch in out)


def test_bytes_and_invalid_utf8() -> None:
    assert for_log(b"\xff\xfeabc\n") == "\\\\xff\\\\xfeabc\\n"


def test_cut_says_how_long_the_answer_was() -> None:
    out = for_log("x" * 5000, limit=10)
    assert out == "xxxxxxxxxx... (5000 characters)"
    assert for_log("short") == "short"
