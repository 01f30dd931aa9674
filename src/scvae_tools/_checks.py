"""Argument checks shared by the tools and the preprocessing functions: one clear error each."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

__all__ = ["check_bool", "check_choice", "check_float", "check_int"]


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int, or a clear error naming ``name`` unless it is an integer >= minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an integer, got {value!r}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")
    return int(value)


def check_float(
    name: str, value: Any, *, low: float, high: float = math.inf, open_low: bool, open_high=False
) -> float:
    """``value`` as a float, or a clear error naming ``name`` and the interval it must lie in."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a number, got {value!r}.")
    v = float(value)
    too_low = v <= low if open_low else v < low
    too_high = v >= high if open_high else v > high
    if not math.isfinite(v) or too_low or too_high:
        lo = "(" if open_low else "["
        hi = ")" if open_high or high == math.inf else "]"
        raise ValueError(f"`{name}` must lie in {lo}{low:g}, {high:g}{hi}, got {value!r}.")
    return v


def check_bool(name: str, value: Any) -> bool:
    """``value`` as a bool, or a TypeError naming ``name``."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"`{name}` must be True or False, got {value!r}.")
    return bool(value)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, else a ValueError naming ``name`` and the choices."""
    if not isinstance(value, str) or value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"`{name}` must be one of {options}, got {value!r}.")
    return value
