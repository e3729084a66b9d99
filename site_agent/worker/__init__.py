"""The side of the agent that runs an app's trainer: the worker process of one task
(:mod:`.task_runner`, also ``python -m site_agent.worker``), the checks on the weights it
produces (:mod:`.weights`), and running a trainer in-process without a federation
(:mod:`.baseline`)."""
