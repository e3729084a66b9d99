"""Airflow triggers of the provider (run in the triggerer, never in dags/)."""
