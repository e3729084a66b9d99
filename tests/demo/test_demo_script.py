"""``make demo`` end to end: real agents, a real Airflow (api-server, scheduler,
dag-processor, triggerer) driven through its REST API, real PyTorch. The full run goes in
exit-after-run mode (``FLARE_DEMO_EXIT=1``); Ctrl-C is tried while Airflow starts."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "scripts" / "demo.py"
ROUNDS = 15  # the demo's recipe: 15 rounds of one local epoch


def run_demo(work: Path, timeout: float, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """The demo in its own session, and what it left running (killed then)."""
    full_env = {**os.environ, "FLARE_DEMO_WORK": str(work), "FLARE_DEMO_EXIT": "1", **env}
    proc = subprocess.Popen([sys.executable, str(DEMO)], env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the demo's own clean-up, as on Ctrl-C
        try:
            out, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        pytest.fail(f"the demo did not finish in {timeout} s:\n{out[-6000:]}")
    finally:
        leftovers = kill_leftovers(work, proc.pid)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out), leftovers


def kill_leftovers(work: Path, demo_pid: int) -> list[str]:
    """What the demo left running (its session, each process it recorded), killed now."""
    groups = {"the demo's session": demo_pid, **started_pids(work)}
    leftovers = [f"{name}: {pids}" for name, pgid in groups.items() if (pids := live_processes(pgid))]
    for pgid in groups.values():
        _kill_group(pgid)
    return leftovers


def started_pids(work: Path) -> dict[str, int]:
    path = work / "processes.json"
    return json.loads(path.read_text()) if path.exists() else {}


def live_processes(pid: int) -> list[int]:
    """Processes, zombies aside, that are ``pid`` or in the process group it leads."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        state, _, pgrp = text.rsplit(") ", 1)[1].split()[:3]
        number = int(text.split(" ", 1)[0])
        if state != "Z" and pid in (number, int(pgrp)):
            found.append(number)
    return found


def _kill_group(pid: int) -> None:
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    work = tmp_path_factory.mktemp("demo") / "work"
    started = time.monotonic()
    result, leftovers = run_demo(work, timeout=780, FLARE_DEMO_ROUNDS=str(ROUNDS))
    print(f"demo took {time.monotonic() - started:.0f} s:\n{result.stdout}")
    return work, result, leftovers


def test_demo_run_succeeds(demo):
    work, result, _ = demo
    assert result.returncode == 0, result.stdout[-6000:]
    summary = json.loads((work / "summary.json").read_text())
    assert summary["state"] == "success"
    assert summary["dag_id"] == "train_federation" and summary["rounds"] == ROUNDS
    assert [r["round"] for r in summary["per_round"]] == list(range(1, ROUNDS + 1))
    assert all(r["sites"] == ["site-1", "site-2", "site-3"] for r in summary["per_round"])
    assert set(summary["evaluation"]["sites"]) == {"site-1", "site-2", "site-3"}
    assert summary["model_uri"].startswith(summary["snapshot_uri"] + "/train_federation/")
    model = Path(summary["model_uri"].removeprefix("file://").replace("%25", "%"))
    assert model.is_file() and model.parent.name == f"round_{ROUNDS:05d}"


def test_federated_model_beats_every_site_alone_and_nears_centralized(demo):
    work, result, _ = demo
    summary = json.loads((work / "summary.json").read_text())
    accuracy = [r["holdout_accuracy"] for r in summary["per_round"]]
    assert accuracy[-1] > accuracy[0] + 0.1, accuracy
    local = summary["local_only_accuracy"]
    assert set(local) == {"site-1", "site-2", "site-3"}
    assert summary["global_accuracy"] == accuracy[-1]
    assert summary["global_accuracy"] > max(local.values()), (summary["global_accuracy"], local)
    ratio = summary["global_accuracy"] / summary["centralized_accuracy"]
    assert ratio >= 0.97 and summary["ratio_to_centralized"] == pytest.approx(ratio), summary["centralized_accuracy"]
    assert summary["recipe"]["aggregator"] == summary["aggregator"] == "fedadam"


def test_baselines_are_continuous_runs_of_the_sites_epochs(demo):
    """Each baseline trained as its owner would: one run of every epoch a site trains in the
    federation (15 rounds of 1), with the sites' settings; never pieces that restart."""
    work, _, _ = demo
    summary = json.loads((work / "summary.json").read_text())
    epochs = ROUNDS * summary["recipe"]["train_config"]["epochs"]
    assert summary["epochs"] == epochs == 15
    runs = summary["baseline_runs"]
    assert set(runs) == {"site-1", "site-2", "site-3", "centralized"}
    for name, run in runs.items():
        # one train call that reported each of its epochs once, as k / 15: no restart
        assert run["epochs"] == epochs and run["progress"] == pytest.approx([(k + 1) / epochs for k in range(epochs)]), name
    assert runs["centralized"]["num_samples"] == sum(runs[s]["num_samples"] for s in ("site-1", "site-2", "site-3"))
    assert runs["centralized"]["num_samples"] == summary["per_round"][-1]["num_samples"]  # what the federation trained on


def test_terminal_shows_progress_and_where_to_look(demo):
    _, result, _ = demo
    out = result.stdout
    for number in range(1, ROUNDS + 1):
        assert f"round {number}/{ROUNDS}: 3 sites" in out
    assert "task train: success" in out
    assert "Airflow UI:  http://127.0.0.1:" in out and "login: admin / admin" in out
    assert "Model:       file://" in out
    assert "site-1 alone (15 epochs)" in out and "centralized, all sites' data (15 epochs)" in out
    assert "x the centralized one's accuracy" in out


def test_every_process_is_stopped_and_no_key_is_logged(demo):
    work, result, leftovers = demo
    pids = started_pids(work)
    assert set(pids) == {"api-server", "scheduler", "dag-processor", "triggerer",
                         "agent site-1", "agent site-2", "agent site-3", "relay airflow-server"}
    assert leftovers == [], result.stdout[-3000:]
    (key_file,) = (work / "federation" / "workspace").glob("*/prod_00/airflow-server/startup/airflow-server.key")
    key_body = "".join(key_file.read_text().splitlines()[1:-1])
    assert len(key_body) > 40
    logs = [result.stdout] + [p.read_text(errors="replace") for folder in (work / "logs", work / "airflow" / "logs")
                              for p in folder.rglob("*") if p.is_file()]
    logs += [p.read_text(errors="replace") for p in (work / "federation").rglob("*.log")]  # the relay and the agents
    assert len(logs) > 8  # the components' logs and the tasks' logs
    assert not any(key_body[:40] in text for text in logs)


def test_ctrl_c_while_airflow_starts_stops_everything(tmp_path):
    """Ctrl-C in the terminal: SIGINT to the demo's process group, agents included."""
    work = tmp_path / "work"
    env = {**os.environ, "FLARE_DEMO_WORK": str(work)}
    proc = subprocess.Popen([sys.executable, str(DEMO)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while "api-server" not in started_pids(work):
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the demo never started Airflow"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        leftovers = kill_leftovers(work, proc.pid)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert "Stopping ..." in out and out.rstrip().endswith("Stopped Airflow and the agents.")
    assert leftovers == [], out[-3000:]


def test_refuses_a_folder_that_is_not_a_demo_folder(tmp_path):
    keep = tmp_path / "notes.txt"
    keep.write_text("mine")
    result, _ = run_demo(tmp_path, timeout=60)
    assert result.returncode == 1
    assert "is not empty and not a demo's work folder" in result.stdout
    assert keep.read_text() == "mine"


def test_refuses_a_folder_another_demo_holds(tmp_path):
    with open(tmp_path / "demo.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result, _ = run_demo(tmp_path, timeout=60)
    assert result.returncode == 1
    assert "another demo is running in" in result.stdout


def test_bad_round_count_is_named(tmp_path):
    result, _ = run_demo(tmp_path / "work", timeout=60, FLARE_DEMO_ROUNDS="many")
    assert result.returncode == 1
    assert "FLARE_DEMO_ROUNDS must be a whole number, got 'many'" in result.stdout
