"""Airflow's processes on this machine: api-server, scheduler, dag-processor, triggerer and
Celery workers sharing one home, one environment and a log folder.

Every process gets an environment built from nothing Airflow-related in the caller's
(another Airflow set-up on the same machine must not leak in) and runs from Airflow's
home, not the repository root, whose ``*.egg-info`` would list the package's plugin entry
point a second time. Logs are read from the shared local folder, so no component serves
them on a port.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .airflow_api import AirflowApi
from .processes import SHUTDOWN_GRACE, START_TIMEOUT, ProcessError, Service, run_logged, stop_all, tail, wait_for

AIRFLOW = [sys.executable, "-m", "airflow"]
HOST = "127.0.0.1"

Readiness = Callable[[Service], bool]


def airflow_env(home: Path, dags: Path, api_port: int, database_url: str, executor: str,
                **settings: str) -> dict[str, str]:
    """The environment of every process of one deployment on 127.0.0.1; ``settings`` add to it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    api_url = f"http://{HOST}:{api_port}"
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__EXECUTOR": executor,
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": database_url,
        "AIRFLOW__API__HOST": HOST,
        "AIRFLOW__API__PORT": str(api_port),
        "AIRFLOW__API__BASE_URL": api_url,
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{api_url}/execution/",
        # Every component must sign and check the same tokens (the API's and the tasks').
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(64),
        **settings,
    })
    return env


def simple_auth(home: Path, passwords: dict[str, str], role: str = "admin") -> dict[str, str]:
    """Settings for Airflow's SimpleAuthManager with these users, all in ``role``.

    The manager reads the passwords from a file in Airflow's home (and would generate one
    for a user it lacks); it is written here, private to this user.
    """
    path = home / "passwords.json"
    path.touch(mode=0o600)
    path.write_text(json.dumps(passwords))
    return {
        "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(f"{user}:{role}" for user in passwords),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(path),
    }


class LocalAirflow:
    """The processes of one deployment, made from :func:`airflow_env`'s environment.

    Add the components (:meth:`add_components`, :meth:`add_celery_worker`), then
    :meth:`start` and :meth:`wait_ready`; :meth:`stop` stops them all.
    """

    def __init__(self, env: dict[str, str], logs: Path):
        self.env = env
        self.home = Path(env["AIRFLOW_HOME"])
        self.logs = Path(logs)
        self.api_port = int(env["AIRFLOW__API__PORT"])
        self.api = AirflowApi(env["AIRFLOW__API__BASE_URL"])
        self.services: dict[str, Service] = {}

    # ---- commands ----------------------------------------------------------------------

    def run(self, *args: str, timeout: float = START_TIMEOUT) -> None:
        """``airflow ARGS`` to completion, its output in ``logs/airflow-<command>.log``."""
        log_path = self.logs / f"airflow-{'-'.join(args[:2])}.log"
        run_logged([*AIRFLOW, *args], log_path, env=self.env, timeout=timeout, cwd=self.home)

    def import_connections(self, connections: dict[str, Any]) -> None:
        """Import connections (Airflow's JSON file format) through a file private to this user.

        Connections hold private keys: the file is gone again once imported.
        """
        path = self.home / "connections.json"
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump(connections, f)
        try:
            self.run("connections", "import", str(path))
        finally:
            path.unlink(missing_ok=True)

    # ---- components --------------------------------------------------------------------

    def add(self, name: str, args: Iterable[str], ready: Readiness | None = None) -> Service:
        """A long-running ``airflow ARGS`` process named ``name``, not started yet."""
        service = Service(name, [*AIRFLOW, *args], self.env, self.logs, ready, cwd=self.home)
        self.services[name] = service
        return service

    def healthy(self, component: str) -> Readiness:
        """A readiness probe: the api-server reports ``component`` healthy."""
        return lambda _service: self.api.component_healthy(component)

    def add_components(self) -> None:
        """api-server, scheduler, dag-processor and triggerer; each is ready when the api-server says so."""
        self.add("api-server", ["api-server", "--host", HOST, "--port", str(self.api_port)], self.healthy("metadatabase"))
        self.add("scheduler", ["scheduler", "--skip-serve-logs"], self.healthy("scheduler"))
        self.add("dag-processor", ["dag-processor"], self.healthy("dag_processor"))
        self.add("triggerer", ["triggerer", "--skip-serve-logs"], self.healthy("triggerer"))

    def add_celery_worker(self, name: str) -> Service:
        """A Celery worker whose Celery hostname starts with ``name``; ready once Celery says so."""
        args = ["celery", "worker", "--celery-hostname", f"{name}@%h", "--skip-serve-logs"]
        return self.add(name, args, lambda service: " ready." in service.log_text())

    def start(self) -> None:
        for service in self.services.values():
            service.start()

    def check(self) -> None:
        """Raise if any component has exited."""
        for service in self.services.values():
            service.check()

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Until every component is ready, in the order they were added; fails at once when one exits."""
        for service in self.services.values():
            def ready(service: Service = service) -> bool:
                self.check()
                return service.is_ready()

            wait_for(f"Airflow {service.name} ready", ready, timeout, interval=0.5,
                     details=lambda service=service: f"see {service.log_path}:\n{tail(service.log_path, 25)}")

    def wait_for_dags(self, dag_ids: Iterable[str], timeout: float) -> None:
        """Until the dag-processor has loaded each DAG (from ``<dag_id>.py``); fails at once on an import error."""
        log = self.logs / "dag-processor.log"
        for dag_id in dag_ids:
            def loaded(dag_id: str = dag_id) -> bool:
                self.check()
                errors = [e for e in self.api.import_errors() if e.get("filename", "").endswith(f"{dag_id}.py")]
                if errors:
                    raise ProcessError(f"{errors[0].get('filename')} does not import:\n"
                                       f"{errors[0].get('stack_trace', errors[0])}")
                return self.api.dag(dag_id) is not None

            wait_for(f"DAG {dag_id} loaded by the dag-processor", loaded, timeout, interval=0.5,
                     details=lambda: f"see {log}")

    def stop(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Stop every component (SIGTERM, then SIGKILL after ``grace`` s) and close the API client."""
        self.api.close()
        stop_all(list(self.services.values()), grace)

    def pids(self) -> dict[str, int]:
        return {name: service.pid for name, service in self.services.items() if service.pid is not None}

    def diagnostics(self, lines: int = 25) -> str:
        """The end of every component's log, for a failure message."""
        return "\n".join(f"--- {s.name} ({'alive' if s.alive else 'dead'}):\n{tail(s.log_path, lines)}"
                         for s in self.services.values())
