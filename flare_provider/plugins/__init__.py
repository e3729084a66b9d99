"""Airflow UI plugins: the Federation page (:mod:`flare_provider.plugins.federation`)."""
