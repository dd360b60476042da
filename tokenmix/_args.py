"""The int and int-pair argument checks used across the package. Errors name the argument and
show the value: TypeError for a value of the wrong type, ValueError for one out of range."""

from __future__ import annotations

from typing import Tuple


def check_int(name: str, value, minimum: int = 1, why: str = "") -> int:
    """``value`` if it is an int >= ``minimum`` (bool excluded); ``why`` explains the minimum in
    the error."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}" + (f" ({why})" if why else ""))
    return int(value)


def check_pair(name: str, value, minimum: int = 1) -> Tuple[int, int]:
    """An int or an (h, w) pair of ints, each >= ``minimum``, as an (h, w) tuple."""
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(pair, (tuple, list)) or len(pair) != 2 or any(
            isinstance(v, bool) or not isinstance(v, int) for v in pair):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return (int(pair[0]), int(pair[1]))
