"""The site agent: what each site runs to train on its own data and GPUs. Needs no Airflow."""
