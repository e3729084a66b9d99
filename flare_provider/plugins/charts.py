"""Chart geometry for the Federation page: axes, lines and bars in SVG coordinates.

The page draws them as inline SVG (no script, nothing fetched), so the numbers are
worked out here and the template only places them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from flare_provider.federation.records import RoundRecord

WIDTH, HEIGHT = 290, 180
LEFT, RIGHT, TOP, BOTTOM = 48, 12, 12, 30  # room for the axis labels

# Distinct on white and on dark backgrounds; the global model is drawn in the text colour.
SITE_COLORS = ("#2f7ed8", "#e4892b", "#3aa657", "#c0392b", "#8e5bc2", "#14a3a3", "#b5651d", "#d4429a")


@dataclass
class Point:
    x: float
    y: float
    round: int
    value: float


@dataclass
class Series:
    name: str
    color: str
    points: list[Point]
    is_global: bool = False
    continuous: bool = False  # a curve by step (thinned points): drawn through, never broken

    @property
    def paths(self) -> list[str]:
        """SVG path data, broken where the series has no value for a round."""
        paths, current, last_round = [], [], None
        for p in self.points:
            if current and last_round is not None and p.round != last_round + 1 and not self.continuous:
                paths.append(current)
                current = []
            current.append(p)
            last_round = p.round
        if current:
            paths.append(current)
        return ["M" + " L".join(f"{p.x:.1f},{p.y:.1f}" for p in run) for run in paths if len(run) > 1]


@dataclass
class Tick:
    pos: float
    label: str


@dataclass
class Chart:
    title: str
    width: int = WIDTH
    height: int = HEIGHT
    series: list[Series] = field(default_factory=list)
    bars: list[dict] = field(default_factory=list)
    x_ticks: list[Tick] = field(default_factory=list)
    y_ticks: list[Tick] = field(default_factory=list)
    x_label: str = "round"  # what the x axis counts (and Point.round holds): "round" or "step"

    @property
    def plot(self) -> dict[str, float]:
        return {"left": LEFT, "right": self.width - RIGHT, "top": TOP, "bottom": self.height - BOTTOM}


def nice_range(low: float, high: float, max_ticks: int = 5) -> tuple[float, float, float]:
    """Round bounds and a 1/2/5 step covering ``low``..``high``."""
    if not (math.isfinite(low) and math.isfinite(high)):
        low, high = 0.0, 1.0
    if high - low < 1e-12:
        pad = abs(high) * 0.1 or 1.0
        low, high = low - pad, high + pad
    raw = (high - low) / max(1, max_ticks - 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    # The tolerance keeps a bound that is a multiple of the step (0.86 for 0.02) from moving a step out.
    return math.floor(low / step + 1e-9) * step, math.ceil(high / step - 1e-9) * step, step


def _label(value: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step))) if step < 1 else 0
    return f"{value:.{decimals}f}"


def _x_axis(rounds: Sequence[int], chart: Chart):
    left, right = chart.plot["left"], chart.plot["right"]
    first, last = min(rounds), max(rounds)
    span = last - first

    def x(r: int) -> float:
        return (left + right) / 2 if span == 0 else left + (r - first) / span * (right - left)

    every = max(1, math.ceil(len(rounds) / 10))  # at most ten round labels
    chart.x_ticks = [Tick(x(r), str(r)) for i, r in enumerate(sorted(rounds)) if i % every == 0 or r == last]
    return x


def _y_axis(values: Sequence[float], chart: Chart, floor_zero: bool = False):
    low, high = min(values), max(values)
    if floor_zero:
        low = min(0.0, low)
    low, high, step = nice_range(low, high)
    top, bottom = chart.plot["top"], chart.plot["bottom"]

    def y(v: float) -> float:
        return bottom - (v - low) / (high - low) * (bottom - top)

    count = round((high - low) / step)
    chart.y_ticks = [Tick(y(low + i * step), _label(low + i * step, step)) for i in range(count + 1)]
    return y


def line_chart(
    title: str,
    global_values: Mapping[int, float],
    site_values: Mapping[str, Mapping[int, float]],
    site_colors: Mapping[str, str],
) -> Chart:
    """Metric ``title`` by round: the sample-weighted mean over the sites (as the engine
    records it) drawn bold, each site's own value behind it."""
    chart = Chart(title)
    rounds = sorted(set(global_values).union(*(v.keys() for v in site_values.values())))
    values = [*global_values.values(), *(x for v in site_values.values() for x in v.values())]
    if not rounds:
        return chart
    x, y = _x_axis(rounds, chart), _y_axis(values, chart)
    for site, per_round in sorted(site_values.items()):
        points = [Point(x(r), y(v), r, v) for r, v in sorted(per_round.items())]
        chart.series.append(Series(site, site_colors.get(site, SITE_COLORS[0]), points))
    points = [Point(x(r), y(v), r, v) for r, v in sorted(global_values.items())]
    chart.series.append(Series("all sites (weighted)", "currentColor", points, is_global=True))
    return chart


def step_chart(title: str, site_values: Mapping[str, Sequence[tuple[int, float]]], site_colors: Mapping[str, str]) -> Chart:
    """Metric ``title`` by step, one curve per site (a round in progress: what the sites reported so far)."""
    chart = Chart(title, x_label="step")
    steps = sorted({step for points in site_values.values() for step, _ in points})
    if not steps:
        return chart
    x, y = _x_axis(steps, chart), _y_axis([v for points in site_values.values() for _, v in points], chart)
    for site, points in sorted(site_values.items()):
        drawn = [Point(x(step), y(v), step, v) for step, v in sorted(points)]
        chart.series.append(Series(site, site_colors.get(site, SITE_COLORS[0]), drawn, continuous=True))
    return chart


def bar_chart(title: str, values: Mapping[int, float]) -> Chart:
    """One bar per round (for durations)."""
    chart = Chart(title)
    if not values:
        return chart
    rounds = sorted(values)
    y = _y_axis(list(values.values()), chart, floor_zero=True)
    slot = (chart.plot["right"] - chart.plot["left"]) / max(1, len(rounds))
    width = max(2.0, min(28.0, slot * 0.6))
    # Bars need room at both ends: place them in slots, not on the line chart's x positions.
    for i, r in enumerate(rounds):
        centre = chart.plot["left"] + slot * (i + 0.5)
        top = y(values[r])
        chart.bars.append({"x": centre - width / 2, "y": top, "width": width, "height": y(0) - top,
                           "round": r, "value": values[r]})
    every = max(1, math.ceil(len(rounds) / 10))
    chart.x_ticks = [Tick(chart.plot["left"] + slot * (i + 0.5), str(r)) for i, r in enumerate(rounds)
                     if i % every == 0 or i == len(rounds) - 1]
    return chart


def site_colors(sites: Sequence[str]) -> dict[str, str]:
    """One colour per site, the same in every chart and the legend."""
    return {site: SITE_COLORS[i % len(SITE_COLORS)] for i, site in enumerate(sites)}


def run_charts(history: Sequence[RoundRecord], metric_names: Sequence[str], colors: Mapping[str, str]) -> list[Chart]:
    """A run's charts: each global metric by round (the sites' own values behind it), then round durations."""
    charts = []
    rounds = [record for record in history if record.round is not None]
    for name in metric_names:
        global_values = {r.round: r.metrics[name] for r in rounds if name in r.metrics}
        site_values: dict[str, dict[int, float]] = {}
        for record in rounds:
            for site, info in record.sites.items():
                if name in info.metrics:
                    site_values.setdefault(site, {})[record.round] = info.metrics[name]
        charts.append(line_chart(name, global_values, site_values, colors))
    charts.append(bar_chart("round duration (s)", {r.round: r.duration_s for r in rounds if r.duration_s is not None}))
    return charts
