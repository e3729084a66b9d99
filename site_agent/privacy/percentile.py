"""Percentile privacy: only the largest changes leave the site, and none larger than ``gamma``.

After Shokri and Shmatikov (CCS 2015), selective sharing of large parameter changes.
With ``d`` the change of every value that may leave (``local - global``, all tensors
together):

1. ``cutoff`` = the ``percentile``-th percentile of ``|d|`` (numpy's linear interpolation);
2. every value with ``|d| <= cutoff`` is set to 0 (the site sends back what it received);
3. the rest are clipped to ``[-gamma, gamma]``.

With ``percentile: 90`` at most about a tenth of the values change, each by at most
``gamma``. A higher percentile and a smaller gamma are stricter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import HIGHER, LOWER, NumericFilter, between, flat_view, positive, write_back


@dataclass(frozen=True)
class PercentileFilter(NumericFilter):
    percentile: float  # in (0, 100): changes at or below this percentile of |change| stay home
    gamma: float  # > 0: the largest change that leaves, in absolute value

    family: ClassVar[str] = "percentile"
    STRICTER: ClassVar[dict[str, str]] = {"percentile": HIGHER, "gamma": LOWER}

    def __post_init__(self) -> None:
        object.__setattr__(self, "percentile", between(self.family, "percentile", self.percentile, 0, 100))
        object.__setattr__(self, "gamma", positive(self.family, "gamma", self.gamma))

    def apply(self, deltas: dict[str, np.ndarray], rng: np.random.Generator) -> None:
        flat, spans = flat_view(deltas)
        if not flat.size:
            return
        cutoff = np.percentile(np.abs(flat), self.percentile)
        flat[np.abs(flat) <= cutoff] = 0.0
        np.clip(flat, -self.gamma, self.gamma, out=flat)
        write_back(flat, spans, deltas)
