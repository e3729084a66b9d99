"""The built-in aggregators by name: the one list the registry, the operators and the DAGs' forms read.

Only strings here, so an operator can check a name at DAG parse time without numpy.
"""

BUILTIN_AGGREGATORS: dict[str, str] = {
    "fedavg": "flare_provider.aggregation.mean:FedAvg",
    "fedprox": "flare_provider.aggregation.mean:FedProx",
    "fedadam": "flare_provider.aggregation.fedopt:FedAdam",
    "fedyogi": "flare_provider.aggregation.fedopt:FedYogi",
    "fedadagrad": "flare_provider.aggregation.fedopt:FedAdagrad",
    "median": "flare_provider.aggregation.robust:CoordinateMedian",
    "trimmed_mean": "flare_provider.aggregation.robust:TrimmedMean",
}
