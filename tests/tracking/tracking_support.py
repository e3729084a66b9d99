"""Support of the tracking tests: a real MLflow tracking server on loopback (SQLite store,
artifacts served through it), started from its own virtualenv (``make mlflow-server``: MLflow's pins conflict with
Airflow 3's, so it cannot share the test environment), and what reads it back: MLflow's
own client, run in that virtualenv."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from flare_provider.poc import free_port

REPO = Path(__file__).resolve().parents[2]
MLFLOW_VENV = Path(sys.prefix) / "mlflow-server"
START_TIMEOUT_S = 180

# Prints every run of an experiment as MLflow's client sees it: tags, params, metric
# histories (step, value) and artifact paths.
_DUMP = """
import json, sys
from mlflow.tracking import MlflowClient
client = MlflowClient(sys.argv[1])
experiment = client.get_experiment_by_name(sys.argv[2])
runs = []
for run in client.search_runs([experiment.experiment_id]):
    histories = {k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)) for k in run.data.metrics}
    def walk(path=None):
        out = []
        for f in client.list_artifacts(run.info.run_id, path):
            out += walk(f.path) if f.is_dir else [f.path]
        return out
    runs.append({"id": run.info.run_id, "status": run.info.status, "tags": run.data.tags, "params": run.data.params,
                 "metrics": histories, "artifacts": walk()})
print(json.dumps(runs))
"""


class MlflowServer:
    def __init__(self, root: Path):
        if not (MLFLOW_VENV / ".installed-stamp").is_file():
            subprocess.run(["make", "-s", "mlflow-server", f"VENV={sys.prefix}", f"PYTHON={sys.executable}"],
                           cwd=REPO, check=True, timeout=900)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = root / "mlflow.log"
        argv = [str(MLFLOW_VENV / "bin" / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
                "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
                "--workers", "1"]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=root, start_new_session=True)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"MLflow did not start in {START_TIMEOUT_S}s: {self.log.read_text()[-3000:]}")

    def runs(self, experiment: str) -> list[dict]:
        out = subprocess.run([str(MLFLOW_VENV / "bin" / "python"), "-c", _DUMP, self.uri, experiment],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.splitlines()[-1])

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # the group this fixture started
            try:
                self.process.wait(5)  # its store is this test's own: no need to wait for a clean stop
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(30)
