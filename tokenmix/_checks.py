"""Argument checks shared across the package (the op's own checks are in ops/checks.py)."""

from __future__ import annotations


def check_positive_int(name: str, value) -> int:
    """``value`` if it is an int >= 1 (bool excluded), else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value
