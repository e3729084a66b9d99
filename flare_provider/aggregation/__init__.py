"""Aggregation of the sites' updates into the next global model (numpy only, no Airflow).

Every aggregator streams: ``begin_round(global_weights, round, sites)``, then
``add(site, update_file, num_samples, kind)`` as results arrive, then ``finish()``.
See ``docs/aggregators.md``.
"""

from .base import AggregationError, Aggregator, RoundStatus
from .fedopt import FedAdagrad, FedAdam, FedOpt, FedYogi
from .mean import FedAvg, FedProx, WeightedMeanAggregator
from .registry import (
    AggregatorConfigError,
    available_aggregators,
    make_aggregator,
    parameter_names,
    register_aggregator,
)
from .robust import CoordinateMedian, CoordinateWiseAggregator, TrimmedMean
from .spec import ModelSpec, TensorSpec
from .validation import UpdateRejected, validate_update

__all__ = [
    "AggregationError",
    "Aggregator",
    "AggregatorConfigError",
    "CoordinateMedian",
    "CoordinateWiseAggregator",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedOpt",
    "FedProx",
    "FedYogi",
    "ModelSpec",
    "RoundStatus",
    "TensorSpec",
    "TrimmedMean",
    "UpdateRejected",
    "WeightedMeanAggregator",
    "available_aggregators",
    "make_aggregator",
    "parameter_names",
    "register_aggregator",
    "validate_update",
]
