"""A trainer that adds one to every weight, for measuring what a round costs besides training.

It imports numpy only (the weights arrive as numpy arrays), so a task's start-up cost is
the worker's own. ``t_train_start`` and ``t_train_end`` (seconds since the epoch, this
machine's clock) tell the benchmark how long the task spent inside ``train()``; the rest
of the task's time is start-up and writing the result.
"""

from __future__ import annotations

import time

import numpy as np

from site_agent.trainer import Trainer, TrainResult


class PlusOneTrainer(Trainer):
    def __init__(self, num_samples: int = 1):
        self.num_samples = num_samples

    def train(self, weights, ctx) -> TrainResult:
        started = time.time()
        for value in weights.values():
            np.add(value, 1, out=value)  # in place: a large model is not held twice
        return TrainResult(
            weights=weights,
            num_samples=self.num_samples,
            metrics={"t_train_start": started, "t_train_end": time.time()},
        )
