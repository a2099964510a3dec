"""Reading a secret (token, password) from a file, the same way for every source.

Read at each use, so a rotated secret is picked up without a reload; bounded,
so a wrong path pointing at something huge costs nothing.
"""

from __future__ import annotations


def read_secret(path: str, what: str) -> str:
    """The stripped contents, or ValueError saying what is wrong with the file."""
    try:
        with open(path, encoding="utf-8") as fh:
            value = fh.read(64 * 1024).strip()
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path} is not text") from None
    if not value:
        raise ValueError(f"{what} {path} is empty")
    return value
