"""Norm clipping with Gaussian noise: local differential privacy for each update.

With ``d`` the change of every value that may leave (``local - global``, all tensors
together as one vector):

1. clip: ``d = d * min(1, clip / ||d||_2)``, so the update's L2 norm is at most ``clip``;
2. noise: every value gets independent ``N(0, (noise_multiplier * clip)^2)`` added.

The update that leaves is the Gaussian mechanism on a vector of L2 sensitivity ``clip``
(``2 clip`` between any two possible updates): for a release ``(epsilon, delta)`` see
``docs/privacy.md``. Stricter: a smaller ``clip``, a larger ``noise_multiplier``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import HIGHER, LOWER, NumericFilter, flat_view, positive, write_back


@dataclass(frozen=True)
class GaussianFilter(NumericFilter):
    clip: float  # > 0: the largest L2 norm of the whole update
    noise_multiplier: float  # > 0: the noise's standard deviation in units of clip

    family: ClassVar[str] = "gaussian"
    STRICTER: ClassVar[dict[str, str]] = {"clip": LOWER, "noise_multiplier": HIGHER}

    def __post_init__(self) -> None:
        object.__setattr__(self, "clip", positive(self.family, "clip", self.clip))
        object.__setattr__(self, "noise_multiplier", positive(self.family, "noise_multiplier", self.noise_multiplier))

    @property
    def noise_std(self) -> float:
        """The standard deviation of the noise on each value."""
        return self.noise_multiplier * self.clip

    def apply(self, deltas: dict[str, np.ndarray], rng: np.random.Generator) -> None:
        flat, spans = flat_view(deltas)
        if not flat.size:
            return
        norm = float(np.linalg.norm(flat))
        if norm > self.clip:
            flat *= self.clip / norm
        flat += rng.normal(0.0, self.noise_std, flat.size)
        write_back(flat, spans, deltas)
