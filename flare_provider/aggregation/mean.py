"""Sample-weighted mean of the sites' updates: FedAvg, FedProx, and the base of FedOpt.

Floating-point sums depend on their order, so updates are folded in a fixed order
(sorted site names), whatever order they arrive in: the result is bit-for-bit the same
for the same inputs. An update that arrives before its turn waits in a file on disk, not
in memory, so memory stays at one float64 accumulator the size of the model.

An update is folded in as ``sum += n * values`` whatever its kind: full weights and
differences alike, block by block through small buffers that stay in the CPU's cache, so
folding reads the update once and the sums once, and allocates nothing per tensor. The
global model is only needed at the end, to turn summed full weights into a mean change
(``sum - n_weights * global``), and plain FedAvg does not need it then either when every
site sent full weights: its result is the mean of the weights, ``sum / n``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .base import Aggregator, to_model_dtype
from .params import non_negative

# Elements per block: a float32 block read from the file (512 KiB) and its float64
# product (1 MiB) stay in the CPU's caches; measured fastest among 2**13 to 2**18.
BLOCK = 1 << 17


class WeightedMeanAggregator(Aggregator):
    """Averages updates weighted by sample count, then applies :meth:`_step`."""

    def _start_round(self) -> None:
        # np.zeros takes zeroed pages from the system lazily: memory grows as sums are touched.
        self._sum = {name: np.zeros(spec.shape, np.float64) for name, spec in self._spec.items()}
        self._scratch = np.empty(BLOCK, np.float64)
        self._total = 0
        self._weights_total = 0  # samples of the updates that were full weights, not differences
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
        """``sum += num_samples * update``, in place; the update was validated already."""
        scale = float(num_samples)
        with self._open(site, path) as update:
            for name in self._spec:
                total = self._sum[name].reshape(-1)  # a view: the sums are contiguous
                for first, values in update.blocks(name, BLOCK):
                    part = total[first : first + values.size]
                    product = self._scratch[: values.size]
                    # In float64 n * value is exact (float32 or float16 values, counts below
                    # 2**29), so only the additions round, in the fixed site order.
                    np.copyto(product, values)
                    product *= scale
                    part += product
        self._total += num_samples
        if kind == "weights":
            self._weights_total += num_samples

    def _fold_waiting(self) -> None:
        # Sites still missing are dropped; those waiting behind them go in sorted order.
        for site in self._status.expected:
            if site in self._waiting:
                self._fold_spilled(site)

    def _aggregate(self) -> dict[str, np.ndarray]:
        self._fold_waiting()
        if type(self)._step is WeightedMeanAggregator._step:
            return self._mean_weights()
        return self._step(self._mean_deltas())

    def _add_global(self, total: np.ndarray, name: str, scale: float) -> None:
        """``total += scale * global[name]`` in float64, in place, block by block."""
        flat = total.reshape(-1)
        base = np.asarray(self._global[name]).reshape(-1)
        for first in range(0, flat.size, BLOCK):
            part = flat[first : first + BLOCK]
            product = self._scratch[: part.size]
            np.copyto(product, base[first : first + part.size])
            product *= scale
            part += product

    def _mean_deltas(self) -> dict[str, np.ndarray]:
        """The sums turned, in place, into the weighted mean change from the global model."""
        sums, self._sum = self._sum, {}
        for name, total in sums.items():
            if self._weights_total:
                self._add_global(total, name, -float(self._weights_total))
            total /= self._total
        return sums

    def _mean_weights(self) -> dict[str, np.ndarray]:
        """FedAvg's new model, the global model plus the mean change, computed as the mean of
        the sites' weights (a difference counts as global + difference).

        Each sum is dropped once converted, so the float64 sums and the new model overlap
        by one tensor only.
        """
        diffs = float(self._total - self._weights_total)
        new = {}
        for name in list(self._sum):
            total = self._sum.pop(name)
            if diffs:
                self._add_global(total, name, diffs)
            total /= self._total
            new[name] = to_model_dtype(total, self._spec[name].numpy_dtype)
        return new

    def _step(self, mean_delta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """New global weights from the weighted mean change (float64). FedAvg: global + mean.

        Each mean is dropped once used, so the float64 sums and the new model overlap
        by one tensor only. (FedAvg itself takes a shorter path to the same model, see
        :meth:`_mean_weights`; a subclass that overrides this method gets the mean change.)
        """
        new = {}
        for name in list(mean_delta):
            delta = mean_delta.pop(name)
            delta += self._global[name]
            new[name] = to_model_dtype(delta, self._spec[name].numpy_dtype)
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
