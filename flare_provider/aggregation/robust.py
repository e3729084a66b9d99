"""Robust aggregation: coordinate-wise median and trimmed mean (Yin et al., 2018).

These need every site's value of a coordinate at once, so each accepted update is
spilled to a file on disk and the result is computed at ``finish()`` one block of rows of
one tensor at a time, read from the update files. Memory stays at
O(model + sites x block): the block is sized to ``block_bytes`` (64 MiB by default) and
holds at least one row of a tensor, so the worst case is O(model + sites x largest row),
within O(model + sites x largest tensor).

Sample counts are deliberately ignored: weighting by a count the site itself reports
would let one site buy the median.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from .base import Aggregator, to_model_dtype
from .params import fraction

_FLOAT64 = np.dtype(np.float64).itemsize


class CoordinateWiseAggregator(Aggregator):
    """Combines all accepted updates coordinate by coordinate with :meth:`_combine`.

    :param block_bytes: memory budget of one block of rows across all sites.
    """

    def __init__(self, *, block_bytes: int = 64 << 20, **kwargs: Any):
        super().__init__(**kwargs)
        if isinstance(block_bytes, bool) or not isinstance(block_bytes, int) or block_bytes <= 0:
            raise ValueError(f"block_bytes must be a positive integer, got {block_bytes!r}")
        self.block_bytes = block_bytes

    @abstractmethod
    def _combine(self, block: np.ndarray) -> np.ndarray:
        """Reduce ``block`` (sites along axis 0, float64 changes) over the sites."""

    def _start_round(self) -> None:
        self._files: dict[str, tuple[Path, str]] = {}

    def _accept(self, site: str, update_path: Path, num_samples: int, kind: str) -> None:
        self._files[site] = (self._spill(site, update_path), kind)

    def _aggregate(self) -> dict[str, np.ndarray]:
        sites = sorted(self._files)
        with ExitStack() as stack:
            updates = [(stack.enter_context(self._open(s, self._files[s][0])), self._files[s][1]) for s in sites]
            return {name: self._combine_tensor(name, updates) for name in self._spec}

    def _combine_tensor(self, name: str, updates: list) -> np.ndarray:
        spec = self._spec[name]
        base = self._global[name]
        if not spec.shape:  # a scalar
            block = np.stack([self._delta(tensors, name, kind, base=base) for tensors, kind in updates])
            return to_model_dtype(base + self._combine(block), spec.numpy_dtype)
        rows = spec.shape[0]
        row_elements = int(np.prod(spec.shape[1:], dtype=np.int64))
        step = max(1, self.block_bytes // max(1, len(updates) * row_elements * _FLOAT64))
        result = np.empty(spec.shape, spec.numpy_dtype)
        for start in range(0, rows, step):
            part = slice(start, min(rows, start + step))
            here = base[part]
            block = np.stack([self._delta(tensors, name, kind, rows=part, base=here) for tensors, kind in updates])
            result[part] = to_model_dtype(here + self._combine(block), spec.numpy_dtype)
        return result


class CoordinateMedian(CoordinateWiseAggregator):
    """Coordinate-wise median of the sites' weights (mean of the middle two for an even count)."""

    name = "median"

    def _combine(self, block: np.ndarray) -> np.ndarray:
        return np.median(block, axis=0)


class TrimmedMean(CoordinateWiseAggregator):
    """Coordinate-wise mean after dropping the ``trim`` fraction of largest and of smallest values.

    :param trim: fraction cut at each end, in [0, 0.5); with n sites, ``floor(trim * n)``
        values are dropped at each end (none when that is 0, which is then the plain mean).
    """

    name = "trimmed_mean"

    def __init__(self, *, trim: float = 0.1, **kwargs: Any):
        super().__init__(**kwargs)
        self.trim = fraction("trim", trim, upper=0.5)

    def parameters(self) -> dict[str, Any]:
        return {"trim": self.trim}

    def _combine(self, block: np.ndarray) -> np.ndarray:
        cut = math.floor(self.trim * block.shape[0] + 1e-9)  # 0.3 * 10 is 2.9999... in floats
        ordered = np.sort(block, axis=0)
        return ordered[cut : block.shape[0] - cut].mean(axis=0)
