"""Training curves at the site: the trainer's step, thinning to a bounded size and rate, the
site.yaml allow-list, and the curve kept in the task's record across an agent restart."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from flare_provider.wire.task_state import MetricPoint, TaskState
from site_agent.errors import SettingsError
from site_agent.runtime.metric_series import MetricSeries, MetricsPolicy, parse_metrics_policy
from site_agent.runtime.task_records import TaskRecords, TaskSpec
from site_agent.site_settings import parse_site_settings
from site_agent.trainer import TaskContext


def context(reports: list) -> TaskContext:
    return TaskContext(task_id="t", site="s", round=1, kind="train", config={}, data_dir=Path("."), work_dir=Path("."),
                       app_dir=Path("."), device="cpu", _reporter=lambda p, m, step: reports.append((p, m, step)))


def test_report_steps_count_on_by_default_and_take_an_explicit_step():
    reports: list = []
    ctx = context(reports)
    ctx.report(0.1, loss=2.0)  # the old call, unchanged
    ctx.report(0.2, loss=1.5)
    ctx.report(0.5, step=40, loss=1.0)
    ctx.report(0.6, loss=0.9)
    assert [r[2] for r in reports] == [0, 1, 40, 41]
    assert reports[2] == (0.5, {"loss": 1.0}, 40)
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(TypeError, match="step must be a whole number"):
            ctx.report(0.7, step=bad, loss=1.0)


def test_thinning_keeps_at_most_max_points_evenly_spread_and_always_the_latest():
    series = MetricSeries(MetricsPolicy(max_points=10, points_per_second=1e9))
    for step in range(1000):
        series.add(step, {"loss": 1000.0 - step}, now=step * 1e-3)
    points = series.points()
    assert len(points) <= 10
    steps = [p.step for p in points]
    assert steps[0] == 0 and steps[-1] == 999  # the first and the latest
    assert steps == sorted(steps)
    gaps = {b - a for a, b in zip(steps[:-2], steps[1:-1])}
    assert len(gaps) == 1  # evenly spread (the stride), the latest point apart
    assert points[-1].values == {"loss": 1.0}


def test_thinning_bounds_the_rate_but_the_latest_report_is_never_lost():
    series = MetricSeries(MetricsPolicy(points_per_second=2))
    for i in range(100):  # 100 reports within one second
        series.add(i, {"loss": float(i)}, now=1000.0 + i / 100)
    points = series.points()
    assert [p.step for p in points] == [0, 50, 99]  # at most 2 per second, then the latest
    series.add(100, {"loss": 0.5}, now=1002.0)
    assert [p.step for p in series.points()] == [0, 50, 100]  # taken: a second passed; 99 was only the latest


def test_the_allow_list_of_site_yaml_decides_which_metrics_leave():
    settings = parse_site_settings({"data_dir": "d", "work_dir": "w",
                                    "metrics": {"allow": ["train_*", "val_accuracy"], "max_points": 50}}, Path("/tmp"))
    series = MetricSeries(settings.metrics)
    assert settings.metrics.allowed({"train_loss": 1.0, "val_accuracy": 0.5, "grad_norm": 3.0, "secret_count": 7.0}) == \
        {"train_loss": 1.0, "val_accuracy": 0.5}
    assert series.add(0, {"grad_norm": 3.0}, now=0.0) is False  # nothing allowed: no point
    assert series.add(1, {"train_loss": 1.0, "grad_norm": 3.0, "nan_metric": float("nan")}, now=1.0) is True
    assert [(p.step, p.values) for p in series.points()] == [(1, {"train_loss": 1.0})]
    assert parse_site_settings({"data_dir": "d", "work_dir": "w"}, Path("/tmp")).metrics == MetricsPolicy()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("all", "'metrics' must be a mapping"),
        ({"allow": "train_*"}, "'metrics.allow' must be a list"),
        ({"max_points": 1}, "'metrics.max_points' must be a whole number from 2"),
        ({"points_per_second": 0}, "'metrics.points_per_second' must be a number above 0"),
        ({"rate": 3}, "unknown key"),
    ],
)
def test_bad_metrics_settings_are_refused_naming_the_key(value, message):
    with pytest.raises(SettingsError, match=message):
        parse_metrics_policy(value, "site.yaml")


def test_the_curve_is_kept_in_the_task_record_across_a_restart(tmp_path):
    lock = threading.Condition()
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    records = TaskRecords(tmp_path / "tasks", lock, "site-1")
    (tmp_path / "tasks").mkdir()
    with lock:
        task = records.create(TaskSpec("task-1", "app", "v1", 1), "app", "v1", 0, weights)
        history = [MetricPoint(0, 1.0, {"train_loss": 2.0}), MetricPoint(7, 2.0, {"train_loss": 1.0})]
        records.change(task, durable=True, history=history)
    reloaded = TaskRecords(tmp_path / "tasks", threading.Condition(), "site-1")
    reloaded.load(lambda pid, folder: None)
    state = reloaded.get("task-1").state
    assert state.history == history
    assert TaskState.from_message(state.to_message()).history == history  # and on the wire
