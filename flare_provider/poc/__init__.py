"""Local tooling: a proof-of-concept federation on this machine and what runs around it.

- :mod:`.federation`: provision a project whose sites listen on loopback and run their
  agents as child processes (:class:`LocalFederation`, :class:`AgentProcess`);
- :mod:`.processes`: child processes with a log file each, bounded waits, stopping
  process groups;
- :mod:`.local_airflow`: Airflow's processes (api-server, scheduler, dag-processor,
  triggerer, Celery workers) with their shared environment;
- :mod:`.airflow_api`: a client of Airflow's REST API;
- :mod:`.workspace` and :mod:`.command`: ``flare poc``, a workspace with start and stop
  scripts for every participant.

The demo (``scripts/demo.py``), the tests and the benchmarks use them; nothing here is
needed for a real deployment. Importing the package loads nothing; its names load the
federation part on first use, never the Airflow tooling.
"""

from importlib import import_module
from typing import Any

__all__ = [
    "ADMIN",
    "SERVER",
    "START_TIMEOUT",
    "STOP_TIMEOUT",
    "AgentProcess",
    "LocalFederation",
    "free_port",
    "prepare",
]


def __getattr__(name: str) -> Any:
    # Loaded on first use: ``flare`` builds its parser from .command without gRPC.
    if name in __all__:
        return getattr(import_module(".federation", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
