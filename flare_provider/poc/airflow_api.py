"""A client of Airflow's public REST API (``/api/v2``): what a user does from the UI, by script.

Log in (a JWT from ``/auth/token``), trigger a DAG run, follow runs and task instances,
read a task's log and XCom. Reads are retried when they time out: an api-server on a
busy machine may miss a read now and then.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import httpx

from .processes import wait_for

API = "/api/v2"
FINISHED = ("success", "failed")


class AirflowApiError(RuntimeError):
    """The api-server refused a call; the message has the status and what it answered."""

    def __init__(self, message: str, status_code: int | None = None):
        super().__init__(message)
        self.status_code = status_code


class AirflowApi:
    """One api-server, reached at ``base_url`` (``http://host:port``)."""

    read_attempts = 3

    def __init__(self, base_url: str, timeout: float = 30.0):
        self.base_url = base_url
        self.http = httpx.Client(base_url=base_url, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def login(self, user: str, password: str) -> None:
        """Send a token for ``user`` with every later call (SimpleAuthManager and others)."""
        response = self.http.post("/auth/token", json={"username": user, "password": password})
        if response.status_code != 201:
            raise AirflowApiError(f"logging in to Airflow as {user!r} failed: HTTP {response.status_code} "
                                  f"{response.text[:200]}", response.status_code)
        self.http.headers["Authorization"] = f"Bearer {response.json()['access_token']}"

    def call(self, method: str, path: str, *, ok: tuple[int, ...] = (200,), **kwargs: Any) -> Any:
        """``method`` on ``/api/v2<path>``; the decoded answer, or :class:`AirflowApiError`."""
        attempts = self.read_attempts if method == "GET" else 1
        for attempt in range(1, attempts + 1):
            try:
                response = self.http.request(method, API + path, **kwargs)
                break
            except httpx.TimeoutException:
                if attempt == attempts:
                    raise
        if response.status_code not in ok:
            raise AirflowApiError(f"{method} {path}: HTTP {response.status_code} {response.text[:500]}",
                                  response.status_code)
        return response.json() if response.content else None

    # ---- the deployment ----------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """Each component's health (``metadatabase``, ``scheduler``, ``triggerer``, ``dag_processor``)."""
        return self.call("GET", "/monitor/health")

    def component_healthy(self, component: str) -> bool:
        """Whether the api-server answers and reports ``component`` healthy; False while it starts."""
        try:
            response = self.http.get(API + "/monitor/health", timeout=5.0)
            health = response.json() if response.status_code == 200 else {}
        except (httpx.TransportError, ValueError):
            return False
        return (health.get(component) or {}).get("status") == "healthy"

    def dag(self, dag_id: str) -> dict[str, Any] | None:
        """The DAG, or None while the dag-processor has not loaded it."""
        try:
            return self.call("GET", f"/dags/{dag_id}")
        except AirflowApiError as exc:
            if exc.status_code == 404:
                return None
            raise

    def import_errors(self) -> list[dict[str, Any]]:
        return self.call("GET", "/importErrors")["import_errors"]

    def unpause(self, dag_id: str) -> None:
        self.call("PATCH", f"/dags/{dag_id}", json={"is_paused": False})

    # ---- runs --------------------------------------------------------------------------

    @staticmethod
    def run_path(dag_id: str, run_id: str) -> str:
        return f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}"

    def trigger(self, dag_id: str, run_id: str | None = None, conf: dict[str, Any] | None = None) -> dict[str, Any]:
        """Start a run of ``dag_id`` now; Airflow names it unless ``run_id`` is given.

        With a ``run_id``, a trigger whose answer timed out is looked up by that id: it
        may have been made all the same.
        """
        body: dict[str, Any] = {"logical_date": None, "conf": conf or {}}
        if run_id is not None:
            body["dag_run_id"] = run_id
        try:
            return self.call("POST", f"/dags/{dag_id}/dagRuns", ok=(200, 201), json=body)
        except httpx.TimeoutException:
            if run_id is None:
                raise
            return self.dag_run(dag_id, run_id)

    def dag_run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        return self.call("GET", self.run_path(dag_id, run_id))

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        return self.call("GET", f"{self.run_path(dag_id, run_id)}/taskInstances")["task_instances"]

    def task_instance(self, dag_id: str, run_id: str, task_id: str) -> dict[str, Any]:
        return self.call("GET", f"{self.run_path(dag_id, run_id)}/taskInstances/{task_id}")

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float, interval: float = 0.5,
                     on_poll: Callable[[dict[str, Any]], None] | None = None,
                     details: Callable[[], str] | None = None) -> dict[str, Any]:
        """The run once it finished (success or failed); ``on_poll(run)`` sees it at every poll."""
        def finished() -> dict[str, Any] | None:
            run = self.dag_run(dag_id, run_id)
            if on_poll is not None:
                on_poll(run)
            return run if run["state"] in FINISHED else None

        return wait_for(f"DAG run {dag_id}/{run_id} finished", finished, timeout, interval, details)

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int, lines: int = 20) -> str:
        """The last ``lines`` lines of a task try's log, with the exceptions it logged."""
        path = f"{self.run_path(dag_id, run_id)}/taskInstances/{task_id}/logs/{try_number}"
        try:
            content = self.call("GET", path, params={"full_content": "true"})["content"]
        except AirflowApiError as exc:
            return f"(log not available: HTTP {exc.status_code})"
        text = []
        for entry in content:
            if str(entry.get("event", "")).startswith(("::group::", "::endgroup::")):
                continue
            text.append(f"{entry.get('level', ''):>7} {entry.get('event', '')}")
            text += [f"        {e.get('exc_type')}: {e.get('exc_value')}" for e in (entry.get("error_detail") or [])[:1]]
        return "\n".join(text[-lines:])

    def failure_report(self, dag_id: str, run_id: str) -> str:
        """Each task of the run that failed or was skipped for it, with the end of a failed try's log."""
        lines = []
        for ti in self.task_instances(dag_id, run_id):
            if ti["state"] in ("failed", "upstream_failed"):
                lines.append(f"task {ti['task_id']} {ti['state']}")
                if ti["state"] == "failed":
                    lines.append(self.task_log(dag_id, run_id, ti["task_id"], ti["try_number"]))
        return "\n".join(lines)

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value") -> Any:
        entry = self.call("GET", f"{self.run_path(dag_id, run_id)}/taskInstances/{task_id}/xcomEntries/{key}")
        value = entry["value"]
        return json.loads(value) if isinstance(value, str) else value
