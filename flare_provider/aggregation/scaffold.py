"""SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", ICML 2020), server side, with the sites' control variates of option II.

Each round the server sends the global model ``x`` together with its control variate
``c`` (tensors named ``scaffold.c/<tensor>`` in the same file). Site ``i`` takes ``K``
corrected SGD steps ``y <- y - lr * (g_i(y) - c_i + c)`` from ``y = x``, sets
``c_i+ = c_i - c + (x - y) / (K * lr)`` and returns ``dy = y - x`` (as its weights or
their difference) and ``dc = c_i+ - c_i`` (tensors named ``scaffold.dc/<tensor>``). With
``S`` the sites whose updates were accepted and ``N`` the sites the round was sent to::

    x <- x + server_lr * mean(dy over S)
    c <- c + |S| / N * mean(dc over S)

Both means are plain (the paper's), not weighted by sample counts. ``c`` covers the
model's floating-point tensors, is kept in float32 (float64 for float64 tensors) and is
the aggregator's ``state()``: it is saved with every snapshot and restored on resume.
Integer tensors (batch-norm counters) take the plain mean.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..wire.tensors import TensorSpec
from .base import to_model_dtype
from .mean import BLOCK, WeightedMeanAggregator
from .names import SCAFFOLD_DELTA_C, SCAFFOLD_SERVER_C
from .params import positive
from .spec import ModelSpec
from .validation import validate_update

_STATE_PREFIX = "c/"


class Scaffold(WeightedMeanAggregator):
    """SCAFFOLD: the mean model change stepped by ``server_lr``, plus the server control variate.

    :param server_lr: the global step size ``eta_g`` (1.0: the new model is the sites' mean).
    """

    name = "scaffold"

    def __init__(self, *, server_lr: float = 1.0, **kwargs: Any):
        super().__init__(**kwargs)
        self.server_lr = positive("server_lr", server_lr)
        self._c: dict[str, np.ndarray] = {}

    def parameters(self) -> dict[str, Any]:
        return {"server_lr": self.server_lr}

    # ---- the round ------------------------------------------------------------------

    def _start_round(self) -> None:
        super()._start_round()
        reserved = [n for n in self._spec if n.startswith((SCAFFOLD_SERVER_C, SCAFFOLD_DELTA_C))]
        if reserved:
            raise ValueError(
                f"scaffold: model tensor names {reserved[:5]} use the prefixes reserved for control variates "
                f"({SCAFFOLD_SERVER_C!r}, {SCAFFOLD_DELTA_C!r})"
            )
        floating = self._spec.floating()
        if not self._c:
            for name in floating:
                dtype = np.promote_types(self._spec[name].numpy_dtype, np.float32)
                self._c[name] = np.zeros(self._spec[name].shape, dtype)
        elif set(self._c) != set(floating) or any(self._c[n].shape != self._spec[n].shape for n in floating):
            raise ValueError(
                f"scaffold control variate does not match this model: tensors without one "
                f"{sorted(set(floating) - set(self._c))[:5]}, unknown tensors {sorted(set(self._c) - set(floating))[:5]}, "
                f"other shapes {sorted(n for n in set(floating) & set(self._c) if self._c[n].shape != self._spec[n].shape)[:5]}"
            )
        # An update holds the model's tensors and, for each floating one, the site's dc.
        dc_specs = {SCAFFOLD_DELTA_C + n: TensorSpec.of_array(c) for n, c in self._c.items()}
        self._update_spec = ModelSpec({**{n: self._spec[n] for n in self._spec}, **dc_specs})
        self._dc_sum = {name: np.zeros(c.shape, np.float64) for name, c in self._c.items()}

    def outgoing_tensors(self) -> dict[str, np.ndarray]:
        """The server control variate ``c``, sent to the sites with the round's model."""
        self._require_round()
        return {SCAFFOLD_SERVER_C + name: c for name, c in self._c.items()}

    def _validate(self, site: str, path: Path) -> None:
        validate_update(self._update_spec, path, site=site, max_bytes=self._max_update_bytes, nonfinite=self._nonfinite)

    def _fold(self, site: str, path: Path, num_samples: int, kind: str) -> None:
        # Every site counts once: mean(dy) and mean(dc) are plain means, as in the paper.
        super()._fold(site, path, 1, kind)
        with self._open(site, path) as update:
            for name, total in self._dc_sum.items():
                flat = total.reshape(-1)
                for first, values in update.blocks(SCAFFOLD_DELTA_C + name, BLOCK):
                    flat[first : first + values.size] += values

    def _step(self, mean_delta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        new = {}
        for name in list(mean_delta):
            delta = mean_delta.pop(name)
            if name in self._c:
                delta *= self.server_lr
            delta += self._global[name]
            new[name] = to_model_dtype(delta, self._spec[name].numpy_dtype)
        # c + |S|/N * mean(dc over S) = c + sum(dc over S) / N
        sent_to = len(self._status.expected)
        for name in list(self._dc_sum):
            total = self._dc_sum.pop(name)
            total /= sent_to
            total += self._c[name]
            self._c[name] = total.astype(self._c[name].dtype)
        return new

    # ---- state ------------------------------------------------------------------------

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        tensors = {_STATE_PREFIX + name: c for name, c in self._c.items()}
        return tensors, {"algorithm": self.name, "parameters": self.parameters()}

    def load_state(self, tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        if meta.get("algorithm") != self.name:
            raise ValueError(f"saved aggregator state is for {meta.get('algorithm')!r}, not {self.name!r}")
        strays = [k for k in tensors if not k.startswith(_STATE_PREFIX)]
        if strays:
            raise ValueError(f"saved scaffold state must hold only {_STATE_PREFIX}<tensor> control variates; got {strays[:5]}")
        c = {k[len(_STATE_PREFIX) :]: np.array(t) for k, t in tensors.items()}
        bad = [name for name, t in c.items() if t.dtype.kind != "f"]
        if bad:
            raise ValueError(f"saved scaffold control variates of tensors {bad[:5]} are not floats")
        # Checked against the model when the next round begins.
        self._c = c
