"""Keeping the best round of a run, and stopping when it stops getting better.

After each round the sites evaluate the new global model on their own validation data
(:func:`~flare_provider.federation.evaluation.evaluate_at_sites`); the sample-weighted
mean of the named metric scores the round. :class:`BestRound` remembers the best-scoring
round and how many rounds have gone by without beating it. It travels in every committed
round's state (``state["best"]``), so a resumed run, a run coming back from the
triggerer and a later warm start all read the same standing. The best round's weights are
those of its own committed round: nothing is copied.

No numpy and no Airflow here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

MODES = ("max", "min")
CHOICES = ("last", "best")  # which model a warm start or the operator's output takes


@dataclass(frozen=True)
class SelectionRule:
    """How rounds are scored.

    :param metric: a metric of the sites' evaluation of the global model (the trainer's
        ``evaluate`` metrics: ``accuracy`` or ``loss`` for the built-in trainer); None
        keeps no best round and evaluates nothing per round.
    :param mode: ``"max"`` when a higher value is better, ``"min"`` when lower is.
    :param early_stop_rounds: stop the run once this many rounds in a row did not beat
        the best one; None runs every round.
    """

    metric: str | None = None
    mode: str = "max"
    early_stop_rounds: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.metric is not None and (not isinstance(self.metric, str) or not self.metric):
            problems.append(f"best_metric must be a metric name, got {self.metric!r}")
        if self.mode not in MODES:
            problems.append(f"best_mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.early_stop_rounds is not None:
            if isinstance(self.early_stop_rounds, bool) or not isinstance(self.early_stop_rounds, int) or self.early_stop_rounds < 1:
                problems.append(f"early_stop_rounds must be a positive integer or None, got {self.early_stop_rounds!r}")
            elif self.metric is None:
                problems.append("early_stop_rounds needs best_metric: rounds are judged by it")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def enabled(self) -> bool:
        return self.metric is not None

    def better(self, value: float, than: float | None) -> bool:
        if than is None:
            return True
        return value > than if self.mode == "max" else value < than


@dataclass
class BestRound:
    """The best round so far by a :class:`SelectionRule`, and the rounds since it."""

    metric: str
    mode: str
    round: int | None = None
    value: float | None = None
    rounds_without_improvement: int = 0
    stopped_early: bool = False

    @classmethod
    def start(cls, rule: SelectionRule) -> "BestRound":
        return cls(metric=rule.metric or "", mode=rule.mode)

    def observe(self, rule: SelectionRule, round_number: int, metrics: Mapping[str, float]) -> bool:
        """Score ``round_number`` by its evaluation ``metrics``; True when it is the new best.

        A round whose evaluation lacks the metric (no site could evaluate it) is no
        improvement.
        """
        value = metrics.get(rule.metric or "")
        if value is not None and math.isfinite(value) and rule.better(value, self.value):
            self.round, self.value, self.rounds_without_improvement = round_number, float(value), 0
            return True
        self.rounds_without_improvement += 1
        if rule.early_stop_rounds is not None and self.rounds_without_improvement >= rule.early_stop_rounds:
            self.stopped_early = True
        return False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, rule: SelectionRule, doc: Any) -> "BestRound":
        """The standing a committed state holds; a fresh one when it holds none for this rule.

        A standing kept for another metric or mode does not carry over: the rounds are
        scored again from here on.
        """
        fresh = cls.start(rule)
        if not isinstance(doc, Mapping) or doc.get("metric") != fresh.metric or doc.get("mode") != fresh.mode:
            return fresh
        number, value, stale = doc.get("round"), doc.get("value"), doc.get("rounds_without_improvement")
        if isinstance(number, int) and not isinstance(number, bool) and isinstance(value, (int, float)) and not isinstance(value, bool):
            fresh.round, fresh.value = number, float(value)
        if isinstance(stale, int) and not isinstance(stale, bool) and stale >= 0:
            fresh.rounds_without_improvement = stale
        fresh.stopped_early = doc.get("stopped_early") is True
        return fresh


def best_round_of(state: Mapping[str, Any]) -> int | None:
    """The best round a committed state names, or None when its run kept none."""
    doc = state.get("best")
    number = doc.get("round") if isinstance(doc, Mapping) else None
    return number if isinstance(number, int) and not isinstance(number, bool) else None
