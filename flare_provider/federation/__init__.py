"""Federated workflows, without Airflow.

- ``records``: what a run does and where it stands (``RunSpec``, ``Progress``,
  ``InFlight``, ``RoundRecord``), plain data that travels as dicts;
- ``gather``: when a round stops waiting (``GatherRule``), for the worker and the trigger;
- ``communicator``: sending tasks to sites and taking their results back;
- ``checkpoints``: a run's committed steps in the snapshot store and its initial model;
- ``scatter_gather``: the scatter-gather workflow (``ScatterGatherRun``);
- ``cyclic_plan``, ``cyclic``: cyclic weight transfer (``CyclicRun``);
- ``evaluation``, ``selection``: a global model scored by the sites; the best round, early stopping;
- ``cross_site_matrix``, ``cross_site``: cross-site evaluation (``CrossSiteEval``).

Importing this package loads nothing heavy; the modules load numpy and gRPC as needed.
"""
