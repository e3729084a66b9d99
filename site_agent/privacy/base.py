"""What every privacy filter shares: its configuration checks and how a request may tighten it.

A numeric filter is a frozen dataclass whose fields are its parameters. Each parameter
says in which direction it is stricter (``STRICTER``): a request from the server or the
app may move a parameter that way only. Filters act in place on the float64 changes
``local - global`` of the tensors that may leave the site (see :mod:`.apply`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, ClassVar

import numpy as np

LOWER, HIGHER = "lower", "higher"


class PrivacyConfigError(ValueError):
    """A privacy setting that is malformed; the message names the filter and the parameter."""


def number(family: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PrivacyConfigError(f"{family}.{name} must be a finite number, found {value!r}")
    return float(value)


def positive(family: str, name: str, value: Any) -> float:
    if number(family, name, value) <= 0:
        raise PrivacyConfigError(f"{family}.{name} must be > 0, found {value!r}")
    return float(value)


def non_negative(family: str, name: str, value: Any) -> float:
    if number(family, name, value) < 0:
        raise PrivacyConfigError(f"{family}.{name} must be >= 0, found {value!r}")
    return float(value)


def between(family: str, name: str, value: Any, low: float, high: float, *, high_inclusive: bool = False) -> float:
    value = number(family, name, value)
    if not (low < value < high or (high_inclusive and value == high)):
        bracket = "]" if high_inclusive else ")"
        raise PrivacyConfigError(f"{family}.{name} must be in ({low:g}, {high:g}{bracket}, found {value!r}")
    return value


@dataclass(frozen=True)
class NumericFilter:
    """A filter on the values that leave the site; subclasses are dataclasses of their parameters."""

    family: ClassVar[str]
    STRICTER: ClassVar[dict[str, str]]

    @classmethod
    def parse(cls, doc: Any, where: str) -> "NumericFilter":
        """The filter from a mapping of all its parameters; :class:`PrivacyConfigError` names ``where``."""
        if not isinstance(doc, Mapping):
            raise PrivacyConfigError(f"{where}: '{cls.family}' must be a mapping of its parameters ({cls.names()})")
        unknown = sorted(set(doc) - set(cls.names()))
        missing = sorted(set(cls.names()) - set(doc))
        if unknown or missing:
            raise PrivacyConfigError(
                f"{where}: '{cls.family}' takes exactly {cls.names()}; unknown {unknown}, missing {missing}"
            )
        try:
            return cls(**{name: doc[name] for name in cls.names()})
        except PrivacyConfigError as exc:
            raise PrivacyConfigError(f"{where}: {exc}") from None

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def params(self) -> dict[str, Any]:
        return asdict(self)

    def tighten(self, request: Any, where: str) -> tuple["NumericFilter", list[str]]:
        """This filter with the stricter of each requested parameter; the looser ones are refused.

        Returns the merged filter and one sentence per refused parameter. A malformed
        request raises :class:`PrivacyConfigError`.
        """
        if not isinstance(request, Mapping):
            raise PrivacyConfigError(f"{where}: '{self.family}' must be a mapping of parameters to tighten ({self.names()})")
        unknown = sorted(set(request) - set(self.names()))
        if unknown:
            raise PrivacyConfigError(f"{where}: '{self.family}' has no parameter(s) {unknown}; it takes {self.names()}")
        merged, refused = self, []
        for name, value in request.items():
            try:
                candidate = replace(merged, **{name: value})  # checks the value
            except PrivacyConfigError as exc:
                raise PrivacyConfigError(f"{where}: {exc}") from None
            wanted, current = getattr(candidate, name), getattr(merged, name)
            if wanted == current:
                continue
            if (wanted < current) == (self.STRICTER[name] == LOWER):
                merged = candidate
            else:
                refused.append(
                    f"{where}: {self.family}.{name} = {value!r} is looser than the site's {current!r}; the site's value stays"
                )
        return merged, refused

    def apply(self, deltas: dict[str, np.ndarray], rng: np.random.Generator) -> None:
        """Change ``deltas`` (name -> float64 change, flat or shaped) in place."""
        raise NotImplementedError


def flat_view(deltas: Mapping[str, np.ndarray]) -> tuple[np.ndarray, list[tuple[str, int, int]]]:
    """All changes as one float64 vector (a copy), and where each tensor sits in it."""
    spans, start = [], 0
    for name, values in deltas.items():
        spans.append((name, start, start + values.size))
        start += values.size
    flat = np.empty(start, np.float64)
    for name, first, end in spans:
        flat[first:end] = deltas[name].reshape(-1)
    return flat, spans


def write_back(flat: np.ndarray, spans: list[tuple[str, int, int]], deltas: dict[str, np.ndarray]) -> None:
    for name, first, end in spans:
        deltas[name] = flat[first:end].reshape(deltas[name].shape)
