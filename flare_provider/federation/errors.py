"""How a federated run fails."""


class RoundFailed(RuntimeError):
    """A round that cannot go on: too few sites, or no acceptable update.

    Airflow may retry the task: sites can come back, and their results are kept.
    """
