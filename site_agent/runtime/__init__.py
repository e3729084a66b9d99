"""What the agent does with the calls it accepts: the deployed apps (:mod:`.app_store`) and
the training tasks (:mod:`.task_manager`): their records on disk, the queue for GPU and
CPU slots, and the worker processes that run them (forked by :mod:`.launcher`)."""
