"""Sample-weighted mean of the sites' updates: FedAvg, FedProx, and the base of FedOpt.

Floating-point sums depend on their order, so updates are folded in a fixed order
(sorted site names), whatever order they arrive in: the result is bit-for-bit the same
for the same inputs. An update that arrives before its turn waits in a file on disk, not
in memory, so memory stays at one float64 accumulator the size of the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .base import Aggregator, to_model_dtype
from .params import non_negative


class WeightedMeanAggregator(Aggregator):
    """Averages updates weighted by sample count, then applies :meth:`_step`."""

    def _start_round(self) -> None:
        self._sum = {name: np.zeros(spec.shape, np.float64) for name, spec in self._spec.items()}
        self._total = 0
        self._next = 0  # index into the sorted site list of the next site to fold
        self._waiting: dict[str, tuple[Path, int, str]] = {}

    def _accept(self, site: str, update_path: Path, num_samples: int, kind: str) -> None:
        order = self._status.expected
        if order[self._next] == site:
            self._validate(site, update_path)
            self._fold(site, update_path, num_samples, kind)
            self._next += 1
            self._fold_ready()
        else:
            self._waiting[site] = (self._spill(site, update_path), num_samples, kind)

    def _on_rejected(self, site: str) -> None:
        self._fold_ready()

    def _fold_ready(self) -> None:
        """Fold waiting updates whose turn has come; a rejected site's turn is skipped."""
        order, status = self._status.expected, self._status
        while self._next < len(order):
            site = order[self._next]
            if site in self._waiting:
                self._fold_spilled(site)
            elif site not in status.rejected:
                return
            self._next += 1

    def _fold_spilled(self, site: str) -> None:
        path, num_samples, kind = self._waiting.pop(site)
        self._fold(site, path, num_samples, kind)
        path.unlink(missing_ok=True)

    def _fold(self, site: str, path: Path, num_samples: int, kind: str) -> None:
        with self._open(site, path) as tensors:
            for name in self._spec:
                delta = self._delta(tensors, name, kind)
                delta *= num_samples
                self._sum[name] += delta
        self._total += num_samples

    def _aggregate(self) -> dict[str, np.ndarray]:
        # Sites still missing are dropped; those waiting behind them go in sorted order.
        for site in self._status.expected:
            if site in self._waiting:
                self._fold_spilled(site)
        mean = self._sum
        for delta in mean.values():
            delta /= self._total
        self._sum = {}
        return self._step(mean)

    def _step(self, mean_delta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """New global weights from the weighted mean change (float64). FedAvg: global + mean.

        Each mean is dropped once used, so the float64 sums and the new model overlap
        by one tensor only.
        """
        new = {}
        for name in list(mean_delta):
            delta = mean_delta.pop(name)
            delta += self._global[name]
            new[name] = to_model_dtype(delta, self._spec[name].dtype)
        return new


class FedAvg(WeightedMeanAggregator):
    """Federated averaging (McMahan et al.): the sites' weights averaged by sample count."""

    name = "fedavg"


class FedProx(FedAvg):
    """FedAvg aggregation; the trainers add the proximal term ``mu/2 * ||w - w_global||^2``.

    :param mu: proximal coefficient sent to the trainers as ``fedprox_mu`` (Li et al.).
    """

    name = "fedprox"

    def __init__(self, *, mu: float = 0.01, **kwargs: Any):
        super().__init__(**kwargs)
        self.mu = non_negative("mu", mu)

    def parameters(self) -> dict[str, Any]:
        return {"mu": self.mu}

    def trainer_config(self) -> dict[str, Any]:
        return {"fedprox_mu": self.mu}

