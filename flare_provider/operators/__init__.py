"""Airflow operators of the provider.

Import an operator from here (``from flare_provider.operators import ProvisionOperator``);
each lives in its own module so importing one does not import the others' dependencies.
"""

from __future__ import annotations

_OPERATORS = {
    "ProvisionOperator": "flare_provider.operators.provision",
    "DeployAppOperator": "flare_provider.operators.deploy",
    "ScatterGatherOperator": "flare_provider.operators.scatter_gather",
    "CyclicOperator": "flare_provider.operators.cyclic",
    "CrossSiteEvalOperator": "flare_provider.operators.cross_site_eval",
}


def __getattr__(name: str):
    if name in _OPERATORS:
        import importlib

        return getattr(importlib.import_module(_OPERATORS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_OPERATORS)
