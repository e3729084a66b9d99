"""Aggregation of the sites' updates into the next global model (numpy only, no Airflow).

Every aggregator streams: ``begin_round(global_weights, round, sites)``, then
``add(site, update_file, num_samples, kind)`` as results arrive, then ``finish()``.
See ``docs/aggregators.md``.

The names below load on first use, so that ``flare_provider.aggregation.names`` (the
built-in names, read at DAG parse time) imports without numpy.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "AggregationError": "base",
    "Aggregator": "base",
    "RoundStatus": "base",
    "FedAdagrad": "fedopt",
    "FedAdam": "fedopt",
    "FedOpt": "fedopt",
    "FedYogi": "fedopt",
    "FedAvg": "mean",
    "FedProx": "mean",
    "WeightedMeanAggregator": "mean",
    "AggregatorConfigError": "registry",
    "available_aggregators": "registry",
    "make_aggregator": "registry",
    "parameter_names": "registry",
    "register_aggregator": "registry",
    "CoordinateMedian": "robust",
    "CoordinateWiseAggregator": "robust",
    "TrimmedMean": "robust",
    "ModelSpec": "spec",
    "UpdateRejected": "validation",
    "validate_update": "validation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
