"""Central differential privacy around a mean-based aggregator: clip each update, noise the sum.

:class:`CentralDP` wraps FedAvg, FedProx or a FedOpt algorithm. Each round:

1. every site's update ``u_i`` (its change from the global model; floating-point tensors,
   all of them as one vector) is clipped to the L2 norm ``C``: ``u_i * min(1, C / ||u_i||)``;
   integer tensors, which cannot carry calibrated noise, keep the global values;
2. the wrapped aggregator averages the clipped updates with equal weights, whatever the
   sites' sample counts: a site's influence on the sum is then at most ``C``;
3. Gaussian noise ``N(0, (z * C)^2)`` per value is added to the sum, so the mean that the
   wrapped algorithm steps with carries noise of standard deviation ``z * C / n`` for ``n``
   sites accepted in the round (``z``: the update noise multiplier, see
   :class:`~flare_provider.privacy.central.CentralDPSettings`). The noise is drawn once per
   round and folded in with the first accepted update, so FedAdam and the other server
   optimizers only ever see the noisy mean;
4. the privacy spent so far (epsilon at the configured delta, every site in every round)
   is computed by the accountant and kept in :attr:`round_privacy` for the round record.

With adaptive clipping the next round's ``C`` moves toward the target quantile of the
update norms (Andrew et al. 2021), from a noisy count of the updates within ``C``.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..privacy.central import ACCOUNTANT, EPS_ERROR, CentralDPSettings, epsilon_spent, require_accountant
from ..wire.tensors import save_file
from .base import Aggregator, to_model_dtype
from .mean import WeightedMeanAggregator

STATE_KEY = "central_dp"


class CentralDP(Aggregator):
    """``inner`` (a mean-based aggregator) with central DP; ``settings`` from ``central_dp={...}``."""

    def __init__(self, inner: Aggregator, settings: CentralDPSettings, *, spill_dir: str | Path | None = None):
        if not isinstance(inner, WeightedMeanAggregator):
            raise ValueError(f"central_dp needs a mean-based aggregator (fedavg, fedprox, fedadam, fedyogi, fedadagrad), "
                             f"not {inner.name!r}: clipping bounds a site's share of a mean, not of a median")
        if type(inner).outgoing_tensors is not Aggregator.outgoing_tensors:
            raise ValueError(f"central_dp clips model updates only; {inner.name!r} exchanges other tensors with the sites")
        super().__init__(spill_dir=spill_dir)
        self.accountant = require_accountant() if settings.noise_multiplier > 0 else None
        self.inner = inner
        self.settings = settings
        self.name = inner.name  # the saved state is the wrapped algorithm's, with the clip and rounds beside it
        self.clip = settings.clip  # this round's clip (moves between rounds when adaptive)
        self.rounds = 0  # rounds released with noise: what the accountant composes
        #: the last finished round's privacy: clip, noise, epsilon spent so far
        self.round_privacy: dict[str, Any] = {}

    # ---- what the wrapped aggregator decides ---------------------------------------------

    def parameters(self) -> dict[str, Any]:
        return {**self.inner.parameters(), STATE_KEY: self._settings_dict()}

    def trainer_config(self) -> dict[str, Any]:
        return self.inner.trainer_config()

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        tensors, meta = self.inner.state()
        return tensors, {**meta, STATE_KEY: {"clip": self.clip, "rounds": self.rounds}}

    def load_state(self, tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        saved = meta.get(STATE_KEY) or {}
        self.inner.load_state(tensors, {k: v for k, v in meta.items() if k != STATE_KEY})
        if saved:
            self.clip, self.rounds = float(saved["clip"]), int(saved["rounds"])

    # ---- the round -------------------------------------------------------------------------

    def begin_round(self, global_weights: Mapping[str, np.ndarray], round_number: int, expected_sites: Iterable[str]) -> None:
        sites = list(expected_sites)
        super().begin_round(global_weights, round_number, sites)
        self.inner.begin_round(global_weights, round_number, sites)

    def _start_round(self) -> None:
        self._norms: dict[str, float] = {}
        self._noise_folded = False
        seed = self.settings.seed
        # With a seed (tests), each round draws its own reproducible noise, also after a resume.
        self._rng = np.random.default_rng(None if seed is None else np.random.SeedSequence([seed, self._status.round_number]))
        if self._spill_root is not None:
            self._spill_root.mkdir(parents=True, exist_ok=True)
        self._clipped_dir = Path(tempfile.mkdtemp(prefix="flare-dp-", dir=self._spill_root))

    def _accept(self, site: str, update_path: Path, num_samples: int, kind: str) -> None:
        self._validate(site, update_path)
        floating = self._spec.floating()
        with self._open(site, update_path) as update:
            change = {name: self._delta(update, name, kind) for name in floating}
        norm = math.sqrt(sum(float(np.dot(d.reshape(-1), d.reshape(-1))) for d in change.values()))
        self._norms[site] = norm
        scale = min(1.0, self.clip / norm) if norm > 0 else 1.0
        carries_noise = not self._noise_folded and self.settings.noise_multiplier > 0
        std = self.settings.update_noise_multiplier * self.clip
        clipped = {}
        for name, spec in self._spec.items():
            if name in change:
                values = change.pop(name)
                values *= scale
                if carries_noise:
                    values += self._rng.normal(0.0, std, values.shape)
                clipped[name] = to_model_dtype(values, spec.numpy_dtype)
            else:
                clipped[name] = np.zeros(spec.shape, spec.numpy_dtype)
        path = self._clipped_dir / f"site-{self._status.expected.index(site):05d}.safetensors"
        save_file(clipped, path, durable=False)
        # Equal weights: the sample counts would let one site's share of the mean exceed C / n.
        self.inner.add(site, path, 1, "diff", move=True)
        self._noise_folded = self._noise_folded or carries_noise

    def _aggregate(self) -> dict[str, np.ndarray]:
        weights = self.inner.finish()
        accepted = sorted(self._status.accepted)
        n = len(accepted)
        z = self.settings.update_noise_multiplier
        if self.settings.noise_multiplier > 0:
            self.rounds += 1
        epsilon = epsilon_spent(self.settings.noise_multiplier, self.rounds, self.settings.delta)
        record: dict[str, Any] = {
            "mechanism": "central_dp",
            "clip": self.clip,
            "noise_multiplier": self.settings.noise_multiplier,
            "update_noise_multiplier": z,
            "noise_std": z * self.clip / n,  # of the mean each value of the model moves by
            "sites": n,
            "clipped_sites": sum(self._norms[s] > self.clip for s in accepted),
            "rounds": self.rounds,
            "delta": self.settings.delta,
            "epsilon": epsilon,
        }
        if self.accountant:
            record["accountant"] = f"{ACCOUNTANT} {self.accountant} (eps_error {EPS_ERROR})"
        if self.settings.adaptive is not None:
            record.update(self._adapt_clip(accepted))
        self.round_privacy = record
        return weights

    def _adapt_clip(self, accepted: list[str]) -> dict[str, Any]:
        """The next clip, geometric update toward the target quantile (Andrew et al. 2021, Alg. 1).

        The count is centred (``b_i - 1/2``), which halves its sensitivity: with noise
        ``count_noise_std`` it is a Gaussian mechanism of multiplier ``2 * count_noise_std``.
        """
        adaptive = self.settings.adaptive
        n = len(accepted)
        centred = sum((self._norms[s] <= self.clip) - 0.5 for s in accepted)
        noisy = centred + (self._rng.normal(0.0, adaptive.count_noise_std) if adaptive.count_noise_std > 0 else 0.0)
        unclipped = noisy / n + 0.5
        self.clip = self.clip * math.exp(-adaptive.learning_rate * (unclipped - adaptive.target_quantile))
        return {"unclipped_fraction": unclipped, "target_quantile": adaptive.target_quantile, "next_clip": self.clip}

    def _end_round(self) -> None:
        super()._end_round()
        self.inner.abort()  # nothing left after finish(); after an abort, the wrapped round goes too
        folder = getattr(self, "_clipped_dir", None)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
            self._clipped_dir = None

    def _settings_dict(self) -> dict[str, Any]:
        s = self.settings
        doc: dict[str, Any] = {"clip": s.clip, "noise_multiplier": s.noise_multiplier, "delta": s.delta}
        if s.adaptive is not None:
            doc["adaptive"] = vars(s.adaptive).copy()
        return doc


def with_central_dp(aggregator: Aggregator, central_dp: Mapping[str, Any], *, spill_dir: str | Path | None = None) -> Aggregator:
    """``aggregator`` wrapped in :class:`CentralDP` when ``central_dp`` is set (else as it is)."""
    if not central_dp:
        return aggregator
    return CentralDP(aggregator, CentralDPSettings.from_dict(central_dp), spill_dir=spill_dir)
