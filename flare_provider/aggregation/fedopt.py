"""Adaptive server optimizers (Reddi et al., "Adaptive Federated Optimization", ICLR 2021).

The server treats the sample-weighted mean change of the sites, ``delta``, as a
pseudo-gradient and steps the global model ``x`` with it::

    m = beta1 * m + (1 - beta1) * delta
    v = v + delta**2                                        FedAdagrad
    v = v - (1 - beta2) * delta**2 * sign(v - delta**2)     FedYogi
    v = beta2 * v + (1 - beta2) * delta**2                  FedAdam
    x = x + server_lr * m / (sqrt(v) + tau)

as in the paper's Algorithm 2 (no bias correction; ``v`` starts at ``tau**2``). Only
floating-point tensors are stepped; integer buffers (such as batch-norm counters) take
the plain weighted mean. The moments ``m`` and ``v`` are the optimizer state saved with
every snapshot; they are kept in float32 (float64 for float64 tensors).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import Any

import numpy as np

from .base import to_model_dtype
from .mean import WeightedMeanAggregator
from .params import fraction, non_negative, positive


class FedOpt(WeightedMeanAggregator):
    """Base of FedAdagrad, FedYogi and FedAdam; subclasses define the second moment."""

    def __init__(
        self,
        *,
        server_lr: float = 0.01,
        beta1: float = 0.9,
        tau: float = 1e-3,
        initial_v: float | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.server_lr = positive("server_lr", server_lr)
        self.beta1 = fraction("beta1", beta1)
        self.tau = positive("tau", tau)
        self.initial_v = self.tau**2 if initial_v is None else non_negative("initial_v", initial_v)
        self._m: dict[str, np.ndarray] = {}
        self._v: dict[str, np.ndarray] = {}
        self._steps = 0

    def parameters(self) -> dict[str, Any]:
        return {"server_lr": self.server_lr, "beta1": self.beta1, "tau": self.tau, "initial_v": self.initial_v}

    @abstractmethod
    def _update_second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> None:
        """Turn ``v`` into the new second moment, in place (``delta_sq`` may be overwritten)."""

    def _start_round(self) -> None:
        super()._start_round()
        floating = self._spec.floating()
        if not self._m:
            for name in floating:
                dtype = np.promote_types(self._spec[name].numpy_dtype, np.float32)
                self._m[name] = np.zeros(self._spec[name].shape, dtype)
                self._v[name] = np.full(self._spec[name].shape, self.initial_v, dtype)
            return
        if set(self._m) != set(floating):
            raise ValueError(
                f"{self.name} optimizer state does not match this model: no moments for tensors "
                f"{sorted(set(floating) - set(self._m))[:5]}, moments for unknown tensors "
                f"{sorted(set(self._m) - set(floating))[:5]}"
            )
        for name in floating:
            if self._m[name].shape != self._spec[name].shape:
                raise ValueError(
                    f"{self.name} optimizer state for tensor {name!r} has shape {list(self._m[name].shape)}, "
                    f"the model {list(self._spec[name].shape)}"
                )

    def _step(self, mean_delta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        new = {}
        # In-place arithmetic, and each mean dropped once used: a few float64 copies of one
        # tensor at a time on top of the model-sized accumulators.
        for name in list(mean_delta):
            delta = mean_delta.pop(name)
            base = self._global[name]
            if name not in self._m:
                new[name] = to_model_dtype(base + delta, self._spec[name].numpy_dtype)
                continue
            m = self._m[name].astype(np.float64)
            m *= self.beta1
            m += (1.0 - self.beta1) * delta
            v = self._v[name].astype(np.float64)
            np.multiply(delta, delta, out=delta)
            self._update_second_moment(v, delta)
            self._m[name] = np.asarray(m, self._m[name].dtype)
            self._v[name] = np.asarray(v, self._v[name].dtype)
            np.sqrt(v, out=v)
            v += self.tau
            m *= self.server_lr
            m /= v
            m += base
            new[name] = to_model_dtype(m, base.dtype)
        self._steps += 1
        return new

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        tensors = {f"m/{name}": m for name, m in self._m.items()}
        tensors.update({f"v/{name}": v for name, v in self._v.items()})
        return tensors, {"algorithm": self.name, "parameters": self.parameters(), "steps": self._steps}

    def load_state(self, tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        if meta.get("algorithm") != self.name:
            raise ValueError(f"saved aggregator state is for {meta.get('algorithm')!r}, not {self.name!r}")
        m = {k[2:]: np.array(t) for k, t in tensors.items() if k.startswith("m/")}
        v = {k[2:]: np.array(t) for k, t in tensors.items() if k.startswith("v/")}
        strays = [k for k in tensors if not k.startswith(("m/", "v/"))]
        if strays or sorted(m) != sorted(v):
            raise ValueError(
                f"saved {self.name} state must hold m/<tensor> and v/<tensor> pairs; got {sorted(tensors)[:6]}"
            )
        for name in m:
            if m[name].shape != v[name].shape or m[name].dtype.kind != "f" or v[name].dtype.kind != "f":
                raise ValueError(f"saved {self.name} moments of tensor {name!r} disagree in shape or are not floats")
        steps = meta.get("steps", 0)
        if not isinstance(steps, int) or steps < 0:
            raise ValueError(f"saved {self.name} state has a bad step count {steps!r}")
        # Checked against the model when the next round begins.
        self._m, self._v, self._steps = m, v, steps


class FedAdagrad(FedOpt):
    """FedOpt with Adagrad's ever-growing second moment."""

    name = "fedadagrad"

    def _update_second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> None:
        v += delta_sq


class _DecayingFedOpt(FedOpt):
    """FedOpt whose second moment has a rate ``beta2`` in [0, 1)."""

    def __init__(self, *, beta2: float = 0.99, **kwargs: Any):
        super().__init__(**kwargs)
        self.beta2 = fraction("beta2", beta2)

    def parameters(self) -> dict[str, Any]:
        return {**super().parameters(), "beta2": self.beta2}


class FedYogi(_DecayingFedOpt):
    """FedOpt with Yogi's additive, sign-controlled second moment."""

    name = "fedyogi"

    def _update_second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> None:
        sign = np.sign(v - delta_sq)
        delta_sq *= 1.0 - self.beta2
        delta_sq *= sign
        v -= delta_sq


class FedAdam(_DecayingFedOpt):
    """FedOpt with Adam's exponential moving average second moment."""

    name = "fedadam"

    def _update_second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> None:
        v *= self.beta2
        delta_sq *= 1.0 - self.beta2
        v += delta_sq
