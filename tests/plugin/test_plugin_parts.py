"""The plugin's parts on their own: a light import, and the chart geometry."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from flare_provider.federation.records import read_history
from flare_provider.plugins.charts import bar_chart, line_chart, nice_range, run_charts, site_colors


def test_importing_the_plugin_imports_nothing_heavy(tmp_path):
    """Every Airflow component imports plugins; only Airflow's plugin base may come with this one."""
    code = """
import json, sys
import airflow.plugins_manager
before = set(sys.modules)
import flare_provider.plugins.federation
print(json.dumps(sorted(set(sys.modules) - before)))
"""
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    new = json.loads(out.stdout.splitlines()[-1])
    assert "flare_provider.plugins.federation" in new
    assert [m for m in new if m != "flare_provider" and not m.startswith("flare_provider.plugins")] == []


@pytest.mark.parametrize(
    ("low", "high", "expected"),
    [(0.86, 0.94, (0.86, 0.94, 0.02)), (0.3, 0.45, (0.3, 0.45, 0.05)), (0, 29.6, (0, 30, 10)), (5.0, 5.0, (4.5, 5.5, 0.5))],
)
def test_axis_ranges_are_round(low, high, expected):
    assert nice_range(low, high) == pytest.approx(expected)


def test_a_line_chart_has_one_point_per_round_and_breaks_where_a_site_is_missing():
    colors = site_colors(["a", "b"])
    chart = line_chart("val_accuracy", {1: 0.5, 2: 0.6, 3: 0.7}, {"a": {1: 0.4, 3: 0.8}, "b": {1: 0.6, 2: 0.7, 3: 0.75}}, colors)
    *sites, overall = chart.series
    assert overall.is_global and [p.round for p in overall.points] == [1, 2, 3]
    assert [p.x for p in overall.points] == sorted(p.x for p in overall.points)
    assert overall.points[2].y < overall.points[0].y  # higher values are drawn higher up
    by_name = {s.name: s for s in sites}
    assert by_name["a"].paths == [] and len(by_name["b"].paths) == 1  # a missed round 2: no line across it
    assert (by_name["a"].color, by_name["b"].color) == (colors["a"], colors["b"])
    top, bottom = chart.plot["top"], chart.plot["bottom"]
    assert all(top <= p.y <= bottom for s in chart.series for p in s.points)


def test_a_single_round_sits_in_the_middle():
    chart = line_chart("loss", {1: 0.3}, {}, {})
    (point,) = chart.series[0].points
    assert point.x == pytest.approx((chart.plot["left"] + chart.plot["right"]) / 2)


def test_duration_bars_start_at_zero():
    chart = bar_chart("round duration (s)", {1: 10.0, 2: 25.0})
    first, second = chart.bars
    assert first["y"] + first["height"] == pytest.approx(second["y"] + second["height"])  # a common base line
    assert second["height"] == pytest.approx(2.5 * first["height"], rel=0.01)


def test_run_charts_take_what_the_history_has_and_ignore_the_rest():
    history = [
        {"round": 1, "duration_s": 3.0, "metrics": {"val_accuracy": 0.8, "note": "text"},
         "sites": {"a": {"metrics": {"val_accuracy": 0.7}}, "b": {"metrics": {}}}},
        {"round": 2, "duration_s": float("nan"), "metrics": {"val_accuracy": float("inf")}, "sites": "damaged"},
    ]
    accuracy, durations = run_charts(read_history(history), ["val_accuracy"], site_colors(["a", "b"]))
    assert [(s.name, [p.round for p in s.points]) for s in accuracy.series] == [("a", [1]), ("all sites (weighted)", [1])]
    assert [b["round"] for b in durations.bars] == [1]
