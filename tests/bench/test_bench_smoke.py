"""The benchmarks run end to end at tiny sizes and make their tables.

``python -m bench NAME --quick`` is a smoke test, not a measurement: real agents, the
engine, the S3 server and PyTorch, at sizes that take seconds. No figure is judged here;
``make bench`` measures.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RATIO = re.compile(r"^\d+\.\d\dx$")

# benchmark -> (table titles, how many data rows the first table has at --quick sizes)
EXPECTED = {
    "overhead": (["Milliseconds per round", "A task's process start-up, piece by piece"], 2),
    "large": (["One round", "Where a round's time goes (seconds, median over rounds)",
               "Engine memory by phase of a round (peak over rounds)",
               "One transfer alone against the bare stream (same federation, same run)",
               "Limits on this machine (same run)"], 2),
    "aggregation": (["FedAvg throughput", "Where the time goes (in turn)"], 3),
    "snapshot": (["8 MiB model, moto S3 server on loopback", "Where the time goes"], 2),
    "gpu": (["Samples per second"], 2),
    "relay": (["Round overhead (plus-one app, training time taken out)", "Wire: one 8 MiB upload and download, each alone",
               "Relay memory", "4 sites attached to one relay"], 1),
}


def table_rows(markdown: str, title: str) -> list[list[str]]:
    """The data rows of the table under ``#### title``."""
    lines = markdown.split(f"#### {title}\n", 1)[1].splitlines()[1:]
    rows = []
    for line in lines[2:]:  # after the header and the rule
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


@pytest.mark.parametrize("benchmark", sorted(EXPECTED))
def test_benchmark_makes_its_tables(benchmark, tmp_path):
    out = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", benchmark, "--quick", "--out", str(out), "--work-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = out.read_text()
    titles, first_rows = EXPECTED[benchmark]
    for title in titles:
        assert f"#### {title}" in proc.stdout, title  # printed as it is made...
        assert table_rows(results, title), title  # ...and written, with rows
    assert len(table_rows(results, titles[0])) == first_rows
    assert f"Reproduce: `python -m bench {benchmark} " in results
    summary = table_rows(results.replace("## Summary\n\n", "#### Summary\n"), "Summary")
    assert summary, "no headline figures"
    for figure, measured, limit, ratio in summary:
        assert measured and limit, figure
        assert ratio == "" or RATIO.match(ratio), (figure, ratio)
    for fact in ("| CPU |", "| cores |", "| memory |", "| OS |", "| Python |", "| libraries |", "load average"):
        assert fact in results, fact
    assert list(tmp_path.glob("flare-bench-*")) == []  # the work folder is gone
    if benchmark == "gpu":  # without --gpu the GPU row says so, and the CPU row is measured
        rows = table_rows(results, "Samples per second")
        assert rows[0][:3] == ["GPU", "-", "not measured: no GPU in this run"]
        assert rows[1][0].startswith("CPU")


def test_unknown_benchmark_is_refused():
    proc = subprocess.run([sys.executable, "-m", "bench", "nonesuch"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "unknown benchmark(s) nonesuch" in proc.stderr
