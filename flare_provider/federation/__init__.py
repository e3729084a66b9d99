"""Federated workflows, without Airflow.

- ``records``: what a run does and where it stands (``RunSpec``, ``Progress``,
  ``InFlight``, ``RoundRecord``), plain data that travels as dicts;
- ``gather``: when a round stops waiting (``GatherRule``), for the worker and the trigger;
- ``communicator``: sending tasks to sites and taking their results back;
- ``checkpoints``: a run's committed steps in the snapshot store and its initial model;
- ``scatter_gather``: the scatter-gather workflow (``ScatterGatherRun``).

Importing this package loads nothing heavy; the modules load numpy and gRPC as needed.
"""
