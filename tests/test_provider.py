"""The package as Airflow sees it: the provider entry point and ProvisionOperator in a real DAG run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from flare_provider.provisioning import verify_folder

PROVISION_DAG = """
import pendulum
from airflow.sdk import DAG
from flare_provider.operators import ProvisionOperator

with DAG("provision_test", schedule=None, start_date=pendulum.datetime(2026, 1, 1), catchup=False) as dag:
    ProvisionOperator(
        task_id="provision",
        project_file="{{ params.project_file }}",
        workspace="{{ params.workspace }}",
        params={"project_file": "", "workspace": ""},
    )
"""


def test_airflow_lists_the_provider(airflow_db):
    out = subprocess.run(
        [sys.executable, "-m", "airflow", "providers", "get", "airflow-provider-flare", "-o", "json"],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
    )
    assert out.returncode == 0, out.stderr
    info = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("[")))
    assert info[0]["Provider"] == "airflow-provider-flare"


def test_provider_info_passes_airflows_schema():
    from airflow.providers_manager import _create_provider_info_schema_validator

    from flare_provider.get_provider_info import get_provider_info

    _create_provider_info_schema_validator().validate(get_provider_info())  # raises when invalid


def test_provision_operator_in_a_real_dag_run(run_dag, xcom, tmp_path, sample_project_file):
    workspace = tmp_path / "ws"
    dag_run = run_dag(
        PROVISION_DAG,
        "provision_test",
        conf={"project_file": str(sample_project_file), "workspace": str(workspace)},
    )
    assert dag_run.state == "success"
    summary = xcom(dag_run, "provision")
    assert summary["prod_dir"] == str(workspace / "hospital_federation" / "prod_00")
    assert set(summary["kits"]) == {"airflow-server", "hospital-a", "hospital-b", "hospital-c",
                                    "admin@lead-lab.example", "it@hospital-a.example"}
    for kit in summary["kits"].values():
        assert verify_folder(Path(kit) / "startup", summary["root_fingerprint"]).ok
    assert "BEGIN" not in json.dumps(summary)  # no key material in XCom


def test_provision_operator_fails_without_retry_on_bad_project(run_dag, tmp_path):
    bad = tmp_path / "project.yml"
    bad.write_text("api_version: 3\nname: x\nparticipants: []\n")
    dag_run = run_dag(PROVISION_DAG, "provision_test", conf={"project_file": str(bad), "workspace": str(tmp_path / "ws")})
    assert dag_run.state == "failed"
    assert not (tmp_path / "ws").exists()


def test_dag_file_import_does_not_load_heavy_modules():
    code = (
        "import sys, flare_provider.operators as ops; ops.ProvisionOperator; "
        "heavy = [m for m in ('torch', 'grpc', 'boto3', 'numpy', 'safetensors', 'site_agent') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
