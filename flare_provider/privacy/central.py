"""Central DP settings (``central_dp={...}`` of a run) and the epsilon its rounds spend.

The mechanism (see :mod:`flare_provider.aggregation.central_dp`) is the Gaussian mechanism
of DP-FedAvg (McMahan et al., "Learning Differentially Private Recurrent Language Models",
ICLR 2018) with every site taking part in every round: each round releases the sum of the
sites' clipped updates (L2 sensitivity ``clip`` when one site is added or removed) plus
``N(0, (noise_multiplier * clip)^2)`` per value. Rounds compose; the privacy spent after
``r`` rounds is the composition of ``r`` Gaussian mechanisms of that noise multiplier,
which ``prv-accountant`` computes (Gopi, Lee and Wutschitz, "Numerical Composition of
Differential Privacy", NeurIPS 2021).

With adaptive clipping (Andrew et al., "Differentially Private Learning with Adaptive
Clipping", NeurIPS 2021) each round also releases a noisy count of the sites whose update
was within the clip, with noise ``count_noise_std``; the updates then get the noise
multiplier ``(noise_multiplier^-2 - (2 count_noise_std)^-2)^-1/2`` so that the round as a
whole is still a Gaussian mechanism of ``noise_multiplier``, and the accounting stays the same.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ACCOUNTANT = "prv-accountant"
EPS_ERROR = 0.01  # the accountant's allowed error on epsilon; the recorded epsilon is its upper bound
_KEYS = {"clip", "noise_multiplier", "delta", "adaptive", "seed"}
_ADAPTIVE_KEYS = {"target_quantile", "learning_rate", "count_noise_std"}


@dataclass(frozen=True)
class AdaptiveClipping:
    """The clip follows the ``target_quantile`` of the sites' update norms (Andrew et al. 2021):
    ``clip <- clip * exp(-learning_rate * (unclipped_fraction - target_quantile))``."""

    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_noise_std: float = 0.0  # sigma_b: the noise on the count of unclipped updates


@dataclass(frozen=True)
class CentralDPSettings:
    """:param clip: the L2 bound of each site's update (the first round's, when adaptive).
    :param noise_multiplier: the noise's standard deviation on the sum, in units of ``clip``;
        0 clips without noise and gives no privacy guarantee (epsilon is then not recorded).
    :param delta: the delta that epsilon is stated for.
    :param adaptive: adaptive clipping, or None for a fixed clip.
    :param seed: makes the noise reproducible (tests only; never in production).
    """

    clip: float
    noise_multiplier: float
    delta: float = 1e-5
    adaptive: AdaptiveClipping | None = None
    seed: int | None = None

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> "CentralDPSettings":
        """Checked settings; ``ValueError`` names the key at fault."""
        if not isinstance(doc, Mapping):
            raise ValueError(f"central_dp must be a mapping such as {{'clip': 1.0, 'noise_multiplier': 1.0}}, got {doc!r}")
        unknown = sorted(set(doc) - _KEYS)
        if unknown:
            raise ValueError(f"central_dp: unknown key(s) {unknown}; it takes {sorted(_KEYS)}")
        for key in ("clip", "noise_multiplier"):
            if key not in doc:
                raise ValueError(f"central_dp: '{key}' is required")
        clip = _number("clip", doc["clip"])
        noise = _number("noise_multiplier", doc["noise_multiplier"])
        delta = _number("delta", doc.get("delta", 1e-5))
        if clip <= 0 or noise < 0:
            raise ValueError(f"central_dp: clip must be > 0 and noise_multiplier >= 0, got {clip} and {noise}")
        if not 0 < delta < 1:
            raise ValueError(f"central_dp: delta must be in (0, 1), got {delta}")
        seed = doc.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"central_dp: seed must be a non-negative integer, got {seed!r}")
        return cls(clip, noise, delta, _adaptive(doc.get("adaptive"), noise), seed)

    @property
    def update_noise_multiplier(self) -> float:
        """The noise multiplier on the sum of the updates (less than ``noise_multiplier`` when
        part of the round's budget goes to the adaptive clip's count)."""
        if self.adaptive is None or self.noise_multiplier == 0:
            return self.noise_multiplier
        return (self.noise_multiplier**-2 - (2 * self.adaptive.count_noise_std) ** -2) ** -0.5


def _adaptive(doc: Any, noise_multiplier: float) -> AdaptiveClipping | None:
    if doc is None or doc is False:
        return None
    if doc is True:
        doc = {}
    if not isinstance(doc, Mapping) or set(doc) - _ADAPTIVE_KEYS:
        raise ValueError(f"central_dp.adaptive must be a mapping of {sorted(_ADAPTIVE_KEYS)}, got {doc!r}")
    adaptive = AdaptiveClipping(**{k: _number(f"adaptive.{k}", v) for k, v in doc.items()})
    if not 0 < adaptive.target_quantile < 1 or adaptive.learning_rate <= 0 or adaptive.count_noise_std < 0:
        raise ValueError("central_dp.adaptive: target_quantile must be in (0, 1), learning_rate > 0, count_noise_std >= 0")
    if noise_multiplier > 0 and not 2 * adaptive.count_noise_std > noise_multiplier:
        raise ValueError(
            f"central_dp.adaptive: count_noise_std must be more than noise_multiplier / 2 ({noise_multiplier / 2:g}) so "
            "that the round's noise can be shared with the count; Andrew et al. suggest about sites / 20 and a "
            "noise_multiplier to match"
        )
    return adaptive


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"central_dp: {key} must be a finite number, got {value!r}")
    return float(value)


def require_accountant() -> str:
    """The accountant's version; ``ValueError`` with the fix when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(ACCOUNTANT)
    except PackageNotFoundError:
        raise ValueError(
            f"central_dp needs {ACCOUNTANT} to account for the privacy spent: pip install 'airflow-provider-flare[privacy]'"
        ) from None


def epsilon_spent(noise_multiplier: float, rounds: int, delta: float) -> float | None:
    """Epsilon (the accountant's upper bound) after ``rounds`` Gaussian mechanisms of
    ``noise_multiplier`` at ``delta``; None without noise (no finite epsilon)."""
    if noise_multiplier <= 0 or rounds < 1:
        return None
    from prv_accountant import GaussianMechanism, PRVAccountant  # the privacy extra, imported when used

    accountant = PRVAccountant(
        prvs=[GaussianMechanism(noise_multiplier)],
        max_self_compositions=[rounds],
        eps_error=EPS_ERROR,
        delta_error=delta * 1e-3,
    )
    return float(accountant.compute_epsilon(delta, [rounds])[2])
