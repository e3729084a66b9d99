"""A small client of MLflow's tracking REST API (``/api/2.0/mlflow``), standard library only.

The Airflow side speaks to the tracking server over its documented REST API rather than
through the ``mlflow`` package, whose pins conflict with Airflow 3's; the server itself is
any MLflow tracking server (``mlflow server``), with artifacts served through it
(``--serve-artifacts``, the default since MLflow 2) for the model to be uploaded.
"""

from __future__ import annotations

import base64
import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

API = "/api/2.0/mlflow"
ARTIFACTS_API = "/api/2.0/mlflow-artifacts/artifacts"
# MLflow's limits on one log-batch call, and on a parameter's value
MAX_BATCH_METRICS, MAX_BATCH_PARAMS, MAX_BATCH_TAGS = 1000, 100, 100
MAX_PARAM_CHARS = 6000


class MlflowError(Exception):
    """The tracking server refused a call or could not be reached (no credentials in the message)."""


@dataclass(frozen=True)
class MlflowSettings:
    """Where the tracking server is and how to sign in; ``experiment``: None names it after the federation."""

    tracking_uri: str
    experiment: str | None = None
    username: str | None = None
    password: str | None = None
    token: str | None = None

    def __post_init__(self) -> None:
        parsed = urllib.parse.urlparse(self.tracking_uri or "")
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"an MLflow tracking URI must be http(s)://host[:port][/path], got {self.tracking_uri!r}")

    def __repr__(self) -> str:  # never the password or the token
        return f"MlflowSettings({self.tracking_uri!r}, experiment={self.experiment!r})"


class MlflowClient:
    def __init__(self, settings: MlflowSettings, timeout: float = 30.0):
        self.settings = settings
        self.base = settings.tracking_uri.rstrip("/")
        self.timeout = timeout

    # ---- experiments and runs ------------------------------------------------------

    def experiment_id(self, name: str) -> str:
        """The id of experiment ``name``, created when it does not exist."""
        try:
            return self._call("GET", "/experiments/get-by-name", query={"experiment_name": name})["experiment"]["experiment_id"]
        except MlflowError as exc:
            if "RESOURCE_DOES_NOT_EXIST" not in str(exc):
                raise
        try:
            return self._call("POST", "/experiments/create", {"name": name})["experiment_id"]
        except MlflowError as exc:  # created meanwhile by another run
            if "RESOURCE_ALREADY_EXISTS" not in str(exc):
                raise
            return self._call("GET", "/experiments/get-by-name", query={"experiment_name": name})["experiment"]["experiment_id"]

    def find_run(self, experiment_id: str, tags: Mapping[str, str]) -> dict[str, Any] | None:
        """The (oldest) run of the experiment with all of ``tags``, or None."""
        terms = " and ".join(f"tags.{key} = '{_quoted(value)}'" for key, value in sorted(tags.items()))
        answer = self._call("POST", "/runs/search", {"experiment_ids": [experiment_id], "filter": terms,
                                                      "max_results": 10, "order_by": ["attributes.start_time ASC"]})
        runs = answer.get("runs") or []
        return runs[0] if runs else None

    def create_run(self, experiment_id: str, name: str, tags: Mapping[str, str]) -> dict[str, Any]:
        body = {"experiment_id": experiment_id, "run_name": name, "start_time": _now_ms(),
                "tags": [{"key": k, "value": str(v)} for k, v in tags.items()]}
        return self._call("POST", "/runs/create", body)["run"]

    def get_run(self, run_id: str) -> dict[str, Any]:
        return self._call("GET", "/runs/get", query={"run_id": run_id})["run"]

    def log_batch(self, run_id: str, metrics: Iterable[tuple[str, float, int, float | None]] = (),
                  params: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None) -> None:
        """Metrics as (key, value, step, wall time in seconds or None), in as many calls as MLflow's limits need."""
        metric_docs = [
            {"key": key, "value": float(value), "step": int(step), "timestamp": int((wall or time.time()) * 1000)}
            for key, value, step, wall in metrics if math.isfinite(float(value))
        ]
        param_docs = [{"key": k, "value": str(v)[:MAX_PARAM_CHARS]} for k, v in (params or {}).items()]
        tag_docs = [{"key": k, "value": str(v)} for k, v in (tags or {}).items()]
        while metric_docs or param_docs or tag_docs:
            body = {"run_id": run_id, "metrics": metric_docs[:MAX_BATCH_METRICS], "params": param_docs[:MAX_BATCH_PARAMS],
                    "tags": tag_docs[:MAX_BATCH_TAGS]}
            self._call("POST", "/runs/log-batch", body)
            metric_docs, param_docs = metric_docs[MAX_BATCH_METRICS:], param_docs[MAX_BATCH_PARAMS:]
            tag_docs = tag_docs[MAX_BATCH_TAGS:]

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self._call("POST", "/runs/set-tag", {"run_id": run_id, "key": key, "value": value})

    def finish_run(self, run_id: str, status: str = "FINISHED") -> None:
        self._call("POST", "/runs/update", {"run_id": run_id, "status": status, "end_time": _now_ms()})

    def upload_artifact(self, run: Mapping[str, Any], path_in_run: str, local: Path) -> None:
        """Upload ``local`` as the run's artifact ``path_in_run`` through the server's artifact proxy."""
        artifact_uri = run["info"]["artifact_uri"]
        if artifact_uri.startswith("mlflow-artifacts:"):
            where = urllib.parse.urlparse(artifact_uri).path.lstrip("/")
            url = f"{self.base}{ARTIFACTS_API}/{where}/{path_in_run}"
        elif artifact_uri.startswith(("http://", "https://")):
            url = f"{artifact_uri.rstrip('/')}/{path_in_run}"
        else:
            raise MlflowError(f"the tracking server keeps artifacts at {artifact_uri}, which it does not serve; "
                              "start it with --serve-artifacts to receive the model")
        with open(local, "rb") as body:
            self._request("PUT", url, body, {"Content-Type": "application/octet-stream",
                                             "Content-Length": str(Path(local).stat().st_size)})

    # ---- the wire ------------------------------------------------------------------------

    def _call(self, method: str, path: str, body: Mapping[str, Any] | None = None,
              query: Mapping[str, str] | None = None) -> dict[str, Any]:
        url = f"{self.base}{API}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        data = json.dumps(body).encode() if body is not None else None
        raw = self._request(method, url, data, {"Content-Type": "application/json"} if data is not None else {})
        return json.loads(raw or b"{}")

    def _request(self, method: str, url: str, data: Any, headers: dict[str, str]) -> bytes:
        headers = {**headers, **self._auth()}
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        what = f"MLflow {method} {urllib.parse.urlparse(url).path}"
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                return answer.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:500].decode(errors="replace")
            raise MlflowError(f"{what}: HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise MlflowError(f"{what}: cannot reach {self.base}: {getattr(exc, 'reason', exc)}") from None

    def _auth(self) -> dict[str, str]:
        s = self.settings
        if s.token:
            return {"Authorization": f"Bearer {s.token}"}
        if s.username:
            pair = base64.b64encode(f"{s.username}:{s.password or ''}".encode()).decode()
            return {"Authorization": f"Basic {pair}"}
        return {}


def _quoted(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("'", "\\'")


def _now_ms() -> int:
    return int(time.time() * 1000)
