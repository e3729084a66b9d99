"""Provider metadata for Airflow's ``apache_airflow_provider`` entry point."""

from flare_provider import __version__

INTEGRATION = "Federated Learning (FLARE)"


def get_provider_info() -> dict:
    return {
        "package-name": "airflow-provider-flare",
        "name": "Federated Learning (FLARE)",
        "description": "Federated learning with NVIDIA FLARE style provisioning, remote GPU site agents "
        "over mutual TLS, scatter-gather rounds and S3 snapshots, as Airflow tasks.",
        "versions": [__version__],
        "integrations": [{"integration-name": INTEGRATION, "tags": ["ml", "federated-learning"]}],
        "operators": [
            {"integration-name": INTEGRATION, "python-modules": ["flare_provider.operators.provision"]},
        ],
    }
