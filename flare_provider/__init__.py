"""Federated learning orchestrated by Apache Airflow.

Only the Airflow-facing subpackages (operators, hooks, triggers, sensors) import Airflow;
provisioning and the wire format do not, so sites can use them without Airflow.
"""

__version__ = "0.1.0"
