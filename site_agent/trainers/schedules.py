"""Learning-rate schedules that span a whole federated run, carried by the round number.

A site trains one round at a time, yet the schedule belongs to the run: the round config
from the server holds ``round`` and ``num_rounds``, so round r starts where round r - 1
ended, as if the site's epochs of every round were one run. A call with no
``num_rounds`` (a model trained alone, in one piece) is a whole run by itself, so a site
trained alone for the same epochs follows the same curve.

- ``constant``: ``lr`` throughout;
- ``cosine``: from ``lr`` down towards 0 along half a cosine, step by step (Loshchilov and
  Hutter's SGDR without restarts).

The curve assumes every round trains the same number of epochs on the same data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

LR_SCHEDULES = ("constant", "cosine")


def check_schedule(name: Any) -> str:
    if name not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {name!r}")
    return name


def run_steps(config: Mapping[str, Any], steps_per_round: int) -> tuple[int, int]:
    """(optimizer steps of the run before this round, steps of the whole run)."""
    if "num_rounds" not in config:
        return 0, steps_per_round
    round_number, num_rounds = config.get("round"), config["num_rounds"]
    for name, value in (("round", round_number), ("num_rounds", num_rounds)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"the round config's {name} must be a whole number >= 1, got {value!r}")
    if round_number > num_rounds:
        raise ValueError(f"the round config's round ({round_number}) is past its num_rounds ({num_rounds})")
    return (round_number - 1) * steps_per_round, num_rounds * steps_per_round


def scheduled_lr(schedule: str, lr: float, step: int, total_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``total_steps``."""
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
    return lr
