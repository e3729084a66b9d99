"""Checks for numeric hyperparameters, so a bad value fails when the aggregator is made."""

from __future__ import annotations

import math
from typing import Any


def number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def positive(name: str, value: Any) -> float:
    if number(name, value) <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return float(value)


def non_negative(name: str, value: Any) -> float:
    if number(name, value) < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return float(value)


def fraction(name: str, value: Any, upper: float = 1.0) -> float:
    """A number in [0, upper)."""
    if not 0 <= number(name, value) < upper:
        raise ValueError(f"{name} must be in [0, {upper:g}), got {value!r}")
    return float(value)
