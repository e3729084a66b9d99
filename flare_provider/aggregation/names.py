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
    "scaffold": "flare_provider.aggregation.scaffold:Scaffold",
}

# SCAFFOLD's control variates travel in the same safetensors files as the weights, under
# reserved name prefixes: the server's ``c`` in the global model sent to the sites, each
# site's change of its own ``c_i`` in the result it sends back.
SCAFFOLD_SERVER_C = "scaffold.c/"
SCAFFOLD_DELTA_C = "scaffold.dc/"
