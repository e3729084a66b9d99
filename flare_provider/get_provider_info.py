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
            {
                "integration-name": INTEGRATION,
                "python-modules": [
                    "flare_provider.operators.provision",
                    "flare_provider.operators.deploy",
                    "flare_provider.operators.scatter_gather",
                    "flare_provider.operators.cyclic",
                    "flare_provider.operators.cross_site_eval",
                ],
            }
        ],
        "sensors": [{"integration-name": INTEGRATION, "python-modules": ["flare_provider.sensors.sites_ready"]}],
        "hooks": [{"integration-name": INTEGRATION, "python-modules": ["flare_provider.hooks.flare",
                                                                 "flare_provider.tracking.hook"]}],
        "triggers": [{"integration-name": INTEGRATION, "python-modules": ["flare_provider.triggers.round",
                                                                    "flare_provider.triggers.data_version"]}],
        "connection-types": [
            {
                "connection-type": "mlflow",
                "hook-class-name": "flare_provider.tracking.hook.MlflowTrackingHook",
                "hook-name": "MLflow tracking server",
            },
            {
                "connection-type": "flare",
                "hook-class-name": "flare_provider.hooks.flare.FlareHook",
                "hook-name": "Federated Learning (FLARE)",
                "ui-field-behaviour": {
                    "hidden-fields": ["host", "port", "schema"],
                    "relabeling": {"login": "Server identity (CN)", "password": "Server private key (PEM)"},
                    "placeholders": {"login": "airflow-server"},
                },
                "conn-fields": {
                    "project": {"label": "Project", "schema": {"type": ["string", "null"]}},
                    "cert_pem": {
                        "label": "Server certificate (PEM)",
                        "schema": {"type": ["string", "null"], "format": "multiline"},
                    },
                    "root_ca_pem": {
                        "label": "Project root CA (PEM)",
                        "schema": {"type": ["string", "null"], "format": "multiline"},
                    },
                },
            }
        ],
    }
