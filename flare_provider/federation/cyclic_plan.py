"""What a cyclic run does beside its spec: the sites' visiting order and what a failing site means.

No numpy and no Airflow here: the operator checks its arguments against these names at
DAG parse time, and :class:`~flare_provider.federation.cyclic.CyclicRun` plans its hops
with :func:`visiting_orders`.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

ORDERS = ("fixed", "random", "random_no_repeat")
ON_FAILURE = ("stop", "skip")


@dataclass(frozen=True)
class CyclicPlan:
    """How the model travels.

    :param order: ``fixed`` (the sites as given, every round), ``random`` (a new order
        each round) or ``random_no_repeat`` (random, and no site trains twice in a row
        across a round's end).
    :param seed: with the run id, makes the random orders; the same seed and run give the
        same orders.
    :param on_failure: ``stop`` fails the run at a failing site; ``skip`` passes the model
        on unchanged to the next site.
    """

    order: str = "fixed"
    seed: int = 0
    on_failure: str = "stop"

    def __post_init__(self) -> None:
        problems = []
        if self.order not in ORDERS:
            problems.append(f"order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            problems.append(f"seed must be an integer, got {self.seed!r}")
        if self.on_failure not in ON_FAILURE:
            problems.append(f"on_failure must be one of {', '.join(ON_FAILURE)}, got {self.on_failure!r}")
        if problems:
            raise ValueError("; ".join(problems))


def visiting_orders(plan: CyclicPlan, sites: Sequence[str], run_key: str, rounds: int) -> list[list[str]]:
    """The order of the sites in each of rounds 1..``rounds``: a pure function of its arguments."""
    orders: list[list[str]] = []
    for number in range(1, rounds + 1):
        order = list(sites)
        if plan.order != "fixed":
            # sha256, not hash(): the same in every process, whatever PYTHONHASHSEED says.
            digest = hashlib.sha256(f"{plan.seed}\0{run_key}\0{number}".encode()).digest()
            rng = random.Random(int.from_bytes(digest[:8], "big"))
            rng.shuffle(order)
            if plan.order == "random_no_repeat" and orders and len(order) > 1 and order[0] == orders[-1][-1]:
                swap = rng.randrange(1, len(order))
                order[0], order[swap] = order[swap], order[0]
        orders.append(order)
    return orders
