"""Sample-weighted mean of the sites' updates: FedAvg, FedProx, and the base of FedOpt.

Floating-point sums depend on their order, so updates are summed in a fixed order
(sorted site names), whatever order they arrive in: the result is bit-for-bit the same
for the same inputs. An update is checked when it arrives; it then waits in a file on
disk, not in memory, until the round is finished (the engine hands its files over, so
waiting costs a rename, or a link for one whose turn it is).

At the end one pass over the model sums ``n * values`` of every update, block by block on
every core (:mod:`.kernel`): each block's float64 total stays in the CPU's cache while
the updates are added to it, and only the new model is written to memory. No float64
sums of the whole model are kept, unless the caller keeps its own files (``add()``
without ``move``): an update whose turn it is is then added to float64 sums at once, and
the finish starts from those.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from . import kernel
from .base import Aggregator, to_model_dtype
from .params import non_negative

# Elements per block of the sums (see kernel.BLOCK); tests make it tiny to cut tensors up.
BLOCK = kernel.BLOCK
# Updates waiting on disk to be summed before they are added to float64 sums instead:
# each is an open file while the sum runs.
MAX_PENDING = 64


class WeightedMeanAggregator(Aggregator):
    """Averages updates weighted by sample count, then applies :meth:`_step`."""

    def _start_round(self) -> None:
        self._sum: dict[str, np.ndarray] | None = None  # float64 sums of the updates summed so far
        self._pending: list[tuple[Path, int]] = []  # checked updates (our files), in order, not summed yet
        self._total = 0
        self._weights_total = 0  # samples of the updates that were full weights, not differences
        self._next = 0  # index into the sorted site list of the next site to fold
        self._waiting: dict[str, tuple[Path, int, str]] = {}

    def _accept(self, site: str, update_path: Path, num_samples: int, kind: str) -> None:
        order = self._status.expected
        if order[self._next] == site:
            self._validate(site, update_path)
            kept = self._keep(site, update_path) if self._sums_later() else None
            if kept is None:
                self._fold(site, update_path, num_samples, kind)
            else:
                self._queue(kept, num_samples, kind)
            self._next += 1
            self._fold_ready()
        else:
            self._waiting[site] = (self._spill(site, update_path), num_samples, kind)

    def _sums_later(self) -> bool:
        # A subclass that folds more than the sums (SCAFFOLD) does so update by update.
        return type(self)._fold is WeightedMeanAggregator._fold

    def _keep(self, site: str, update_path: Path) -> Path | None:
        """A link to a handed-over file in the spill folder, or None where none can be made."""
        if not self._may_move:
            return None
        link = self._spill_path(site)
        try:
            os.link(update_path, link)
        except OSError:
            return None
        return link

    def _queue(self, path: Path, num_samples: int, kind: str) -> None:
        self._pending.append((path, num_samples))
        self._count(num_samples, kind)
        if len(self._pending) >= MAX_PENDING:
            self._sum_pending()

    def _count(self, num_samples: int, kind: str) -> None:
        self._total += num_samples
        if kind == "weights":
            self._weights_total += num_samples

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
        if self._sums_later():
            self._queue(path, num_samples, kind)
        else:
            self._fold(site, path, num_samples, kind)
            path.unlink(missing_ok=True)

    def _fold(self, site: str, path: Path, num_samples: int, kind: str) -> None:
        """``sum += num_samples * update`` now, into the float64 sums; the update was validated."""
        self._sum_pending(extra=(path, num_samples))
        self._count(num_samples, kind)

    def _sum_pending(self, extra: tuple[Path, int] | None = None) -> None:
        """Add the pending updates (and ``extra``, a file that stays the caller's) to the float64 sums."""
        pending = self._pending + ([extra] if extra is not None else [])
        if not pending:
            return
        fresh = self._sum is None
        if fresh:
            self._sum = {name: np.empty(spec.shape, np.float64) for name, spec in self._spec.items()}
        with _Terms(self, pending) as terms:
            kernel.weighted_sum(self._sizes(), terms, sums=None if fresh else self._sum,
                                finish=_copy_into(self._sum) if fresh else None, block=BLOCK)
        self._drop_pending()

    def _drop_pending(self) -> None:
        for path, _ in self._pending:
            path.unlink(missing_ok=True)
        self._pending = []

    def _sizes(self, names=None) -> dict[str, int]:
        names = self._spec if names is None else names
        return {name: int(np.prod(self._spec[name].shape)) for name in names}

    def _fold_waiting(self) -> None:
        # Sites still missing are dropped; those waiting behind them go in sorted order.
        for site in self._status.expected:
            if site in self._waiting:
                self._fold_spilled(site)

    def _aggregate(self) -> dict[str, np.ndarray]:
        self._fold_waiting()
        if type(self)._step is WeightedMeanAggregator._step:
            return self._mean_weights()
        self._sum_pending()
        return self._step(self._mean_deltas())

    def _add_global(self, total: np.ndarray, name: str, scale: float) -> None:
        """``total += scale * global[name]`` in float64, in place, block by block."""
        term = kernel.Term(self._global_source(), scale)
        kernel.weighted_sum({name: total.size}, [term], sums={name: total}, block=BLOCK)

    def _global_source(self):
        """The global model as the kernel reads it: its file, or flat contiguous arrays."""
        if isinstance(self._global, dict):
            return {name: np.ascontiguousarray(a).reshape(-1) for name, a in self._global.items()}
        return self._global

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
        the sites' weights (a difference counts as global + difference), in one pass: the
        float64 sums (if any), then each pending update, then ``(n of differences) x global``,
        divided by the samples and stored in the model's dtypes block by block.

        Float64 sums, where there are some, are dropped tensor by tensor as they are used,
        so they and the new model overlap by one tensor only.
        """
        diffs = float(self._total - self._weights_total)
        extra = [kernel.Term(self._global_source(), diffs)] if diffs else []
        total = float(self._total)
        new = {name: np.empty(spec.shape, spec.numpy_dtype) for name, spec in self._spec.items()}
        flat = {name: array.reshape(-1) for name, array in new.items()}

        def finish(name: str, first: int, values: np.ndarray) -> None:
            values /= total
            kernel.store_as(self._spec[name].numpy_dtype, values, flat[name][first : first + values.size])

        with _Terms(self, self._pending) as terms:
            if self._sum is None:
                kernel.weighted_sum(self._sizes(), terms + extra, finish=finish, block=BLOCK)
            else:
                with kernel.thread_pool() as pool:
                    for name in list(self._sum):
                        sums = {name: self._sum.pop(name)}
                        kernel.weighted_sum(
                            self._sizes([name]), terms + extra, sums=sums, finish=finish, block=BLOCK, pool=pool
                        )
        self._drop_pending()
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


def _copy_into(sums: dict[str, np.ndarray]):
    """A ``finish`` for the kernel that stores each block's total into fresh float64 sums."""
    flat = {name: array.reshape(-1) for name, array in sums.items()}

    def finish(name: str, first: int, values: np.ndarray) -> None:
        flat[name][first : first + values.size] = values

    return finish


class _Terms:
    """The pending updates' files, open for the kernel, as its weighted terms."""

    def __init__(self, aggregator: Aggregator, pending: list[tuple[Path, int]]):
        self._aggregator, self._pending, self._open = aggregator, pending, []

    def __enter__(self) -> list[kernel.Term]:
        for path, num_samples in self._pending:
            self._open.append(kernel.Term(self._aggregator._open("?", path), float(num_samples)))
        return list(self._open)

    def __exit__(self, *exc_info) -> None:
        for term in self._open:
            term.source.close()


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
