"""Benchmarks of airflow-provider-flare: ``python -m bench`` (``make bench``) writes ``bench/RESULTS.md``.

Each benchmark runs the real thing (agents over mutual TLS on loopback, the run engine,
the snapshot store against an S3-protocol server) and measures, in the same run, the
limit its figure is judged against. ``python -m bench --help`` lists them.
"""
