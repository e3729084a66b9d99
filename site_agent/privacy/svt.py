"""Sparse vector technique: a few changes, chosen and released with Laplace noise.

After the selective sharing of Shokri and Shmatikov (CCS 2015), with the sparse vector
technique in the corrected form of Lyu, Su and Li ("Understanding the Sparse Vector
Technique for Differential Privacy", VLDB 2017, Algorithm 1). With ``d`` the change of
every value that may leave (``local - global``, all tensors together), ``n`` values:

1. clip: ``d = clip(d, -gamma, gamma)``, so each ``|d_i|`` lies in ``[0, gamma]``;
2. budget: ``c = ceil(fraction * n)`` values at most; ``epsilon`` is split as
   ``eps1 = eps2 = epsilon / 4`` for choosing and ``eps3 = epsilon / 2`` for releasing;
3. threshold noise, drawn once: ``rho ~ Laplace(gamma / eps1)``;
4. scan the values in a random order; value ``i`` is chosen when
   ``|d_i| + Laplace(2 c gamma / eps2) >= tau + rho``, until ``c`` are chosen;
5. each chosen value leaves as ``clip(d_i + Laplace(2 c gamma / eps3), -gamma, gamma)``;
   every other value leaves unchanged from the global model (change 0).

Stricter: a smaller ``fraction``, ``epsilon`` or ``gamma``, a larger ``tau``. With a very
large ``epsilon`` the noise vanishes and exactly the (first ``c``, in the random order)
values with ``|d_i| >= tau`` leave, clipped to ``gamma``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import HIGHER, LOWER, NumericFilter, between, flat_view, non_negative, positive, write_back


@dataclass(frozen=True)
class SVTFilter(NumericFilter):
    fraction: float  # in (0, 1]: at most ceil(fraction * n) values change
    epsilon: float  # > 0: the budget of one release (choosing and releasing)
    tau: float  # >= 0: the threshold a change must pass (before noise)
    gamma: float  # > 0: changes are clipped to [-gamma, gamma]

    family: ClassVar[str] = "svt"
    STRICTER: ClassVar[dict[str, str]] = {"fraction": LOWER, "epsilon": LOWER, "tau": HIGHER, "gamma": LOWER}

    def __post_init__(self) -> None:
        object.__setattr__(self, "fraction", between(self.family, "fraction", self.fraction, 0, 1, high_inclusive=True))
        object.__setattr__(self, "epsilon", positive(self.family, "epsilon", self.epsilon))
        object.__setattr__(self, "tau", non_negative(self.family, "tau", self.tau))
        object.__setattr__(self, "gamma", positive(self.family, "gamma", self.gamma))

    def budget(self, n: int) -> int:
        """How many values may change out of ``n``."""
        return min(n, max(1, math.ceil(self.fraction * n)))

    def apply(self, deltas: dict[str, np.ndarray], rng: np.random.Generator) -> None:
        flat, spans = flat_view(deltas)
        n = flat.size
        if not n:
            return
        np.clip(flat, -self.gamma, self.gamma, out=flat)
        c = self.budget(n)
        eps1 = eps2 = self.epsilon / 4
        eps3 = self.epsilon / 2
        rho = rng.laplace(0.0, self.gamma / eps1)
        order = rng.permutation(n)
        # The scan of step 4, all at once: the query noises are independent, so the values
        # chosen are the first c in `order` whose noisy magnitude passes the noisy threshold.
        passes = np.abs(flat[order]) + rng.laplace(0.0, 2 * c * self.gamma / eps2, n) >= self.tau + rho
        chosen = order[np.flatnonzero(passes)[:c]]
        released = np.zeros(n, np.float64)
        released[chosen] = flat[chosen] + rng.laplace(0.0, 2 * c * self.gamma / eps3, chosen.size)
        np.clip(released, -self.gamma, self.gamma, out=released)
        write_back(released, spans, deltas)
