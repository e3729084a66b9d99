"""Adds one to every weight, after ``sleep_s`` seconds of the round's config."""

from __future__ import annotations

import time

import numpy as np

from site_agent.trainer import Trainer, TrainResult


class SlowPlusOne(Trainer):
    def train(self, weights, ctx) -> TrainResult:
        pause = float(ctx.config.get("sleep_s", 0))
        deadline = time.time() + pause
        while time.time() < deadline:
            ctx.report(1 - (deadline - time.time()) / pause)
            time.sleep(min(0.2, max(0.0, deadline - time.time())))
        for value in weights.values():
            np.add(value, 1, out=value)
        return TrainResult(weights=weights, num_samples=1, metrics={"plus": 1.0})
