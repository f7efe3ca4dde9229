"""A secret key's text, read from an environment variable or a small file.

The audit chain's MAC key and the torch backend's artifact key are both given
as base64url text in an environment variable or a file, and a person reading
the error must learn which one is missing or unreadable. The reading (not the
decoding, whose rules differ per key) lives here once; each caller passes the
exception class its own callers already catch.
"""

from __future__ import annotations

import os
from pathlib import Path

MAX_KEY_TEXT = 4096  # a key file is a line of base64; more is not read


def from_env(name: str, problem: type[Exception]) -> str:
    """The variable's value; ``problem`` when it is not set."""
    value = os.environ.get(name)
    if value is None:
        raise problem(f"environment variable {name} is not set")
    return value


def from_file(path: os.PathLike[str] | Path | str, problem: type[Exception]) -> str:
    """The file's first ``MAX_KEY_TEXT`` characters (ASCII); ``problem`` naming the file when it cannot be read."""
    try:
        with open(path, encoding="ascii") as f:
            return f.read(MAX_KEY_TEXT)
    except FileNotFoundError:
        raise problem(f"key file {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise problem(f"key file {path} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
