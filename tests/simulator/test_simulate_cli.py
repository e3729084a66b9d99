"""``flare simulate`` as a user runs it: its own data folders, a run the Federation page lists,
the sites' privacy filters, tasks bounded by ``--threads``, and clear errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from sim_support import DIGITS_APP, REPO, most_at_once, task_intervals

from flare_provider.cli import main
from flare_provider.snapshots import SnapshotStore
from site_agent.datasets.digits import write_site_partitions

SITES = ("clinic-a", "clinic-b")


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """One simulation through the command line: two sites of our own data, one task at a time,
    every site keeping ``2.bias`` home."""
    root = tmp_path_factory.mktemp("simulate")
    write_site_partitions([root / "data" / site for site in SITES], non_iid=False, seed=3)
    (root / "site.yaml").write_text("data_dir: data\nwork_dir: work\nprivacy:\n  exclude_vars: {names: ['2.bias']}\n")
    workspace = root / "workspace"
    out = subprocess.run(
        [sys.executable, "-m", "flare_provider.cli", "simulate", str(DIGITS_APP), "--out", str(workspace),
         "--data", str(root / "data"), "--rounds", "2", "--threads", "1", "--gpus", "none",
         "--train-config", '{"epochs": 1}', "--privacy", str(root / "site.yaml"), "--run-id", "cli-run", "--json"],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return workspace, json.loads(out.stdout), out.stderr


def test_the_run_is_committed_with_each_sites_metrics(simulated):
    workspace, result, log = simulated
    assert result["federation"] == "digits-simulation" and result["run_id"] == "cli-run" and result["rounds_done"] == 2
    assert result["model_uri"] == f"{(workspace / 'snapshots').as_uri()}/digits-simulation/cli-run/round_00002/model.safetensors"
    for record in result["history"]:
        assert record["accepted"] == list(SITES) and record["dropped"] == {}
        assert set(record["metrics"]) == {"train_loss", "train_accuracy", "val_loss", "val_accuracy"}
        assert all(record["sites"][site]["num_samples"] > 0 for site in SITES)
    assert "Round 2/2 done: 2/2 sites answered" in log


def test_every_site_applies_its_privacy_filters(simulated):
    workspace, result, _ = simulated
    for record in result["history"]:
        for site in SITES:
            applied = record["sites"][site]["privacy"]["applied"]
            assert [(a["filter"], a["excluded"], a["source"]) for a in applied] == [("exclude_vars", ["2.bias"], "site")]
    store = SnapshotStore((workspace / "snapshots").as_uri())
    first, last = (store.load_weights(store.get_round("digits-simulation", "cli-run", n)) for n in (0, 2))
    assert np.array_equal(last["2.bias"], first["2.bias"])  # it never left a site, so FedAvg kept the global value
    assert not np.array_equal(last["2.weight"], first["2.weight"])


def test_no_more_tasks_run_at_once_than_threads(simulated):
    workspace, _, _ = simulated
    intervals = task_intervals(workspace)
    assert len(intervals) == 1 + 2 * len(SITES)  # the initial model, then each site each round
    assert most_at_once(intervals) == 1


def test_the_federation_page_lists_the_simulated_run(simulated):
    from plugin.plugin_html import parse  # the Federation page tests' HTML reader (tests/ is on sys.path)

    from flare_provider.plugins.app import Settings, _dag_link, _dag_run_link, _read_store, _run_link, _template
    from flare_provider.plugins.charts import run_charts, site_colors

    workspace, _, _ = simulated
    settings = Settings(conn_ids=(), snapshot_uri=(workspace / "snapshots").as_uri(), aws_conn_id=None, status_timeout=1.0)
    runs, error = _read_store(settings)  # what the page reads, through the same hook
    assert error == "" and [(r.federation, r.run) for r in runs] == [("digits-simulation", "cli-run")]
    selected = runs[0]
    colors = site_colors(selected.sites())
    html = _template("federation.html").render(
        connections=[], hidden_connections=0, store_uri=settings.snapshot_uri, store_error=error, runs=runs,
        selected=selected, charts=run_charts(selected.history, selected.metric_names(), colors), site_colors=colors,
        now="", run_link=_run_link, dag_run_link=_dag_run_link, dag_link=_dag_link,
    )
    page = parse(html)
    row = page.one("table", id="runs").one("tr", data_run="cli-run")
    assert row.attrs["data-federation"] == "digits-simulation" and "2 / 2 done" in row.text
    section = page.one("section", id="run-section")
    assert section.attrs["data-run"] == "cli-run" and "app digits" in section.text
    rounds = section.one("table", id="rounds").select("tr", data_round=True)
    assert [r.attrs["data-round"] for r in rounds] == ["1", "2"]
    for r in rounds:
        assert [c.attrs["data-site"] for c in r.select("td", data_state="accepted")] == list(SITES)


# ---- bad input: a clear error, exit status 2, nothing written -----------------------------


def write_app(folder, text: str):
    folder.mkdir()
    (folder / "app.yaml").write_text(text)
    return folder


@pytest.mark.parametrize(
    "case, expected",
    [
        ("no app folder", "not an app folder"),
        ("bad app.yaml", "app.yaml: 'trainer.path' must be a dotted name"),
        ("trainer from nowhere", "'mymodule.Trainer' is neither a built-in trainer"),
        ("no --sites", "--sites is needed with the built-in digits data"),
        ("sites do not match --data", "--sites 3 does not match --data"),
        ("empty --data", "holds no site folders"),
        ("bad --gpus", "--gpus must be auto, none or GPU ids"),
        ("unknown aggregator", "--aggregator: "),
        ("min-clients above sites", "--min-clients must be between 1 and the number of sites (2)"),
        ("bad privacy", "unknown filter(s) ['blur']"),
        ("no initial model file", "--initial-model"),
    ],
)
def test_bad_input_is_refused_naming_the_option_or_file(tmp_path, capsys, case, expected):
    workspace = tmp_path / "workspace"
    app, args = DIGITS_APP, ["-n", "2"]
    data = tmp_path / "data"
    if case == "no app folder":
        app = tmp_path / "missing"
    elif case == "bad app.yaml":
        app = write_app(tmp_path / "app", "name: x\ntrainer: {path: 3}\n")
    elif case == "trainer from nowhere":
        app = write_app(tmp_path / "app", "name: x\ntrainer: {path: mymodule.Trainer}\n")
    elif case == "no --sites":
        args = []
    elif case == "sites do not match --data":
        for site in SITES:
            (data / site).mkdir(parents=True)
        args = ["-n", "3", "--data", str(data)]
    elif case == "empty --data":
        data.mkdir()
        args = ["--data", str(data)]
    elif case == "bad --gpus":
        args += ["--gpus", "first"]
    elif case == "unknown aggregator":
        args += ["--aggregator", "fedmagic"]
    elif case == "min-clients above sites":
        args += ["--min-clients", "3"]
    elif case == "bad privacy":
        (tmp_path / "privacy.yaml").write_text("blur: {radius: 2}\n")
        args += ["--privacy", str(tmp_path / "privacy.yaml")]
    elif case == "no initial model file":
        args += ["--initial-model", str(tmp_path / "nope.safetensors")]
    assert main(["simulate", str(app), "-w", str(workspace), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err, err
    assert not workspace.exists()  # refused before anything was written


def test_options_the_parser_refuses(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", str(DIGITS_APP), "-w", str(tmp_path), "-n", "2", "--train-config", "[1, 2]"])
    assert exit_info.value.code == 2
    assert "--train-config: expected a JSON object" in capsys.readouterr().err
