"""Local tooling: a proof-of-concept federation on this machine and what runs around it.

- :mod:`.federation`: provision a project whose sites listen on loopback and run their
  agents as child processes (:class:`LocalFederation`, :class:`AgentProcess`);
- :mod:`.processes`: child processes with a log file each, bounded waits, stopping
  process groups;
- :mod:`.local_airflow`: Airflow's processes (api-server, scheduler, dag-processor,
  triggerer, Celery workers) with their shared environment;
- :mod:`.airflow_api`: a client of Airflow's REST API.

The demo (``scripts/demo.py``), the tests and the benchmarks use them; nothing here is
needed for a real deployment. Importing the package loads the federation part only, not
the Airflow tooling.
"""

from .federation import (
    ADMIN,
    SERVER,
    START_TIMEOUT,
    STOP_TIMEOUT,
    AgentProcess,
    LocalFederation,
    free_port,
    prepare,
)

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
