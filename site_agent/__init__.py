"""The site agent: what each site runs to train on its own data and GPUs. Needs no Airflow.

- :mod:`.service`: the gRPC service over mutual TLS, its authorization and audit log;
- :mod:`.runtime`: deployed apps and training tasks (records, queue, worker processes);
- :mod:`.worker`: what runs inside a task's worker process, around the app's trainer;
- :mod:`.trainer` and :mod:`.trainers`: the trainer API apps implement and the built-in
  trainers an ``app.yaml`` may name (app code imports them by these names);
- :mod:`.datasets`: sample data for the example apps (data preparation, never the agent);
- :mod:`.kit_config` (the kit's signed ``startup/agent.json``), :mod:`.site_settings`
  (the site's own ``local/site.yaml``), :mod:`.errors`, and :mod:`.cli` (``flare-agent``).
"""
