"""make_aggregator: built-in names, custom classes by dotted path, clear errors up front."""

from __future__ import annotations

import numpy as np
import pytest

from flare_provider.aggregation import (
    Aggregator,
    AggregatorConfigError,
    FedAdam,
    FedAvg,
    TrimmedMean,
    available_aggregators,
    make_aggregator,
    register_aggregator,
)


class KeepGlobal(Aggregator):
    """A custom aggregator that validates updates and keeps the global model unchanged."""

    name = "keep_global_test"

    def __init__(self, *, note: str = "", **kwargs):
        super().__init__(**kwargs)
        self.note = note

    def _accept(self, site, update_path, num_samples, kind):
        self._validate(site, update_path)

    def _aggregate(self):
        return {name: array.copy() for name, array in self._global.items()}


def test_every_built_in_name():
    built_in = {"fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "median", "trimmed_mean"}
    assert built_in <= set(available_aggregators())
    for name in sorted(built_in):
        assert make_aggregator(name).name == name
    adam = make_aggregator("fedadam", server_lr=0.3, beta1=0.5, beta2=0.9, tau=1e-4)
    assert isinstance(adam, FedAdam) and adam.parameters() == {
        "server_lr": 0.3, "beta1": 0.5, "beta2": 0.9, "tau": 1e-4, "initial_v": 1e-8,
    }
    assert isinstance(make_aggregator("trimmed_mean", trim=0.3), TrimmedMean)
    assert make_aggregator("fedprox", mu=0.5).trainer_config() == {"fedprox_mu": 0.5}


@pytest.mark.parametrize("name, kwargs, message", [
    ("fedsgd", {}, "unknown aggregator 'fedsgd'; choose one of fedadagrad, fedadam, fedavg"),
    ("", {}, "non-empty string"),
    ("fedadam", {"lr": 0.1},
     "aggregator 'fedadam': got an unexpected keyword argument 'lr'; it takes: beta2, server_lr"),
    ("fedadagrad", {"beta2": 0.9}, "unexpected keyword argument 'beta2'"),
    ("fedadam", {"beta1": 1.0}, r"aggregator 'fedadam': beta1 must be in \[0, 1\), got 1.0"),
    ("fedyogi", {"server_lr": -1}, "server_lr must be > 0"),
    ("fedadam", {"tau": "small"}, "tau must be a finite number"),
    ("fedprox", {"mu": float("nan")}, "mu must be a finite number"),
    ("median", {"max_update_bytes": -5}, "max_update_bytes must be a positive integer"),
    ("no_such_module_xyz.Agg", {}, "cannot import 'no_such_module_xyz'"),
    ("numpy.NoSuchThing", {}, "module 'numpy' has no 'NoSuchThing'"),
    ("numpy.ndarray", {}, "not a concrete subclass of flare_provider.aggregation.Aggregator"),
    ("flare_provider.aggregation.FedOpt", {}, "not a concrete subclass"),
])
def test_bad_names_and_arguments_fail_before_any_round(name, kwargs, message):
    with pytest.raises(AggregatorConfigError, match=message):
        make_aggregator(name, **kwargs)


@pytest.mark.parametrize("separator", [".", ":"])
def test_custom_class_by_dotted_path(separator, update_file):
    agg = make_aggregator(f"{__name__}{separator}KeepGlobal", note="x")
    assert isinstance(agg, KeepGlobal) and agg.note == "x"
    weights = {"w": np.arange(3, dtype=np.float32)}
    agg.begin_round(weights, 0, ["a"])
    agg.add("a", update_file("a", {"w": np.ones(3, np.float32)}), 1)
    np.testing.assert_array_equal(agg.finish()["w"], weights["w"])
    with pytest.raises(AggregatorConfigError, match="unexpected keyword argument 'mu'; it takes: note, spill_dir"):
        make_aggregator(f"{__name__}.KeepGlobal", mu=1)


def test_register_a_custom_name():
    register_aggregator(KeepGlobal)
    assert "keep_global_test" in available_aggregators()
    assert isinstance(make_aggregator("keep_global_test"), KeepGlobal)
    register_aggregator(KeepGlobal)  # again: the same class is fine
    with pytest.raises(AggregatorConfigError, match="registered already"):
        register_aggregator(FedAvg, name="keep_global_test")
    with pytest.raises(AggregatorConfigError, match="not a subclass"):
        register_aggregator(dict, name="dict")
