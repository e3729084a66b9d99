"""Running a policy's filters over a training result, before it is written for the server.

The worker calls :func:`filter_update` between the trainer's return and the write of
``result.safetensors``: what is hashed, kept and fetched is the filtered update only. The
record of what was applied (:func:`privacy_record`) travels in the result file's metadata
under ``flare.privacy`` and in ``result.json``; the audit log's ``FetchResult`` line and
the server's round record read it from there.

Numeric filters act on floating-point tensors. Integer and boolean tensors (counters such
as BatchNorm's ``num_batches_tracked``) cannot carry calibrated noise, so under a numeric
filter their change stays home too: the site returns the values it received.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from flare_provider.wire.tensors import RESULT_PRIVACY_KEY, TensorFormatError, describe_file

from .exclude import ExcludeVars
from .policy import PrivacyPolicy


def task_rng(policy: PrivacyPolicy, task_id: str) -> np.random.Generator:
    """Fresh entropy for the noise; with the site's ``seed``, a stream of its own per task.

    A fixed seed alone would draw the same noise for every round, and differences between
    rounds would cancel it; mixing in the task id keeps the streams apart.
    """
    if policy.seed is None:
        return np.random.default_rng()
    task_key = int.from_bytes(hashlib.sha256(task_id.encode()).digest()[:8], "big")
    return np.random.default_rng(np.random.SeedSequence([policy.seed, task_key]))


def filter_update(
    policy: PrivacyPolicy,
    global_weights: Mapping[str, Any],
    weights: Mapping[str, Any],
    is_difference: bool,
    rng: np.random.Generator,
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """``weights`` after the policy's filters, as the same kind of result and tensor types.

    Returns the filtered weights and, by filter family, the tensors kept at home.
    """
    if not policy:
        return dict(weights), {}
    exclude = policy.filters.get(ExcludeVars.family)
    numeric = [f for f in policy.ordered() if not isinstance(f, ExcludeVars)]
    held = {ExcludeVars.family: exclude.matches(weights) if exclude else []}
    home = set(held[ExcludeVars.family])
    not_float = [n for n in weights if n not in home and not _is_float(weights[n])] if numeric else []
    if not_float:
        held["not_float"] = not_float
        home.update(not_float)

    def base(name: str) -> Any:
        # What the server sent for this tensor; None where the result holds a change
        # (a difference, or a tensor such as SCAFFOLD's control-variate change).
        return None if is_difference else global_weights.get(name)

    deltas = {}
    for name, value in weights.items():
        if name not in home and numeric and _is_float(value):
            sent = base(name)
            deltas[name] = _float64(value) if sent is None else _float64(value) - _float64(sent)
    for one in numeric:
        one.apply(deltas, rng)
    out: dict[str, Any] = {}
    for name, value in weights.items():
        sent = base(name)
        if name in home:
            out[name] = _zeros_like(value) if sent is None else sent
        elif name in deltas:
            out[name] = _like(value, deltas[name] if sent is None else deltas[name] + _float64(sent))
        else:
            out[name] = value
    return out, held


def filter_result(
    policy: PrivacyPolicy,
    refused: list[str],
    global_file: Path,
    tensor_format: str,
    weights: Mapping[str, Any],
    is_difference: bool,
    task_id: str,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A trainer's result through the task's policy, and its record. The global weights are read
    again from ``global_file``: a trainer may have changed the ones it was given in place."""
    from ..worker.weights import load_weights

    global_weights = load_weights(global_file, tensor_format) if policy else {}
    filtered, held = filter_update(policy, global_weights, weights, is_difference, task_rng(policy, task_id))
    return filtered, privacy_record(policy, refused, held)


def privacy_record(policy: PrivacyPolicy, refused: list[str], held: Mapping[str, list[str]]) -> dict[str, Any]:
    """What a result records: each filter applied (its parameters, who set them), and what was refused."""
    applied = []
    for one in policy.ordered():
        entry = {"filter": one.family, **one.params(), "source": "+".join(policy.sources.get(one.family, ("site",)))}
        if isinstance(one, ExcludeVars):
            entry["excluded"] = list(held.get(ExcludeVars.family, []))
        applied.append(entry)
    record: dict[str, Any] = {"applied": applied, "refused": list(refused)}
    if held.get("not_float"):
        record["kept_home"] = list(held["not_float"])  # integer tensors under a numeric filter
    return record


def record_metadata(record: Mapping[str, Any]) -> str:
    """The record as the result file's metadata value."""
    return json.dumps(record, sort_keys=True)


def result_privacy(path: Path) -> dict[str, Any] | None:
    """The privacy record a result file carries (None for none or an unreadable one)."""
    try:
        text = describe_file(path)[1].get(RESULT_PRIVACY_KEY)
        return json.loads(text) if text else None
    except (OSError, ValueError, TensorFormatError):
        return None


def _is_torch(value: Any) -> bool:
    return type(value).__module__.startswith("torch")


def _is_float(value: Any) -> bool:
    if _is_torch(value):
        return bool(value.is_floating_point())
    return np.asarray(value).dtype.kind == "f"


def _float64(value: Any) -> np.ndarray:
    if _is_torch(value):
        import torch

        return value.detach().to("cpu", torch.float64).numpy()
    return np.asarray(value, np.float64)


def _like(original: Any, values: np.ndarray) -> Any:
    """``values`` in the dtype and tensor type of ``original``."""
    if _is_torch(original):
        import torch

        return torch.from_numpy(np.ascontiguousarray(values)).to(original.dtype)
    return values.astype(np.asarray(original).dtype)


def _zeros_like(original: Any) -> Any:
    if _is_torch(original):
        import torch

        return torch.zeros_like(original, device="cpu")
    return np.zeros_like(np.asarray(original))
