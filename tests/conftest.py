"""Shared test set-up.

Airflow reads its configuration at import, so its home (a fresh folder with a SQLite
database) is set here, before any test module imports Airflow.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="flare-test-airflow-"))
os.environ["AIRFLOW_HOME"] = str(_AIRFLOW_HOME)
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_AIRFLOW_HOME}/airflow.db"
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(_AIRFLOW_HOME / "dags")


def _migrate_airflow_db() -> None:
    subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True, env=os.environ.copy()
    )


# The metadata database is made before any test module is collected: Airflow, once
# imported (some test modules import it at the top), keeps what it found at import, and
# a database without tables would stay unusable for connections.
_migrate_airflow_db()


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """The Airflow home of this test session, with an initialised SQLite metadata database."""
    return _AIRFLOW_HOME


@pytest.fixture(scope="session")
def run_dag(airflow_db):
    """Write a DAG file into the dags folder (a real bundle) and run it with ``dag.test()``.

    Returns the finished DagRun. Airflow syncs the DAG from the file, as the
    dag-processor would, so the file must define the DAG at module level.
    """
    import importlib.util

    dags = airflow_db / "dags"
    dags.mkdir(exist_ok=True)

    def run(source: str, dag_id: str, conf: dict | None = None, logical_date: str | None = None):
        path = dags / f"{dag_id}.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(f"test_dag_{dag_id}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        kwargs = {"run_conf": conf}
        if logical_date is not None:  # the same dates give the same run id: a rerun of that DAG run
            import pendulum

            kwargs["logical_date"] = kwargs["run_after"] = pendulum.parse(logical_date)
        return getattr(module, "dag").test(**kwargs)

    return run


def xcom_value(dag_run, task_id: str):
    """The return value a task of ``dag_run`` pushed to XCom."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    query = XComModel.get_many(run_id=dag_run.run_id, dag_ids=dag_run.dag_id, task_ids=task_id, key="return_value")
    with create_session() as session:
        row = session.scalars(query).first()
        return None if row is None else XComModel.deserialize_value(row)


@pytest.fixture(scope="session")
def xcom():
    """``xcom(dag_run, task_id)``: the value the task returned (conftest modules cannot be imported by name)."""
    return xcom_value


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_AIRFLOW_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def sample_project_file() -> Path:
    return REPO / "examples" / "project.yml"
