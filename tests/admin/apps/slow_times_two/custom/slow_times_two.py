"""Doubles every weight, after ``sleep_s`` seconds of the round's config."""

from __future__ import annotations

import time

import numpy as np

from site_agent.trainer import Trainer, TrainResult


class SlowTimesTwo(Trainer):
    def train(self, weights, ctx) -> TrainResult:
        time.sleep(float(ctx.config.get("sleep_s", 0)))
        for value in weights.values():
            np.multiply(value, 2, out=value)
        return TrainResult(weights=weights, num_samples=1, metrics={"times": 2.0})
