"""``flare poc``: prepare a two-site workspace, start it with its scripts, train, run two
federations at once on the same sites, stop it leaving no process, remove it.

Real processes throughout: the relay and the agents run from their kits' start.sh (as
``flare poc start`` runs them), and the runs are the engine an Airflow task drives,
talking to the sites through the relay with the server kit's identity.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import psutil
import pytest
from admin_support import APP, allow_test_app

from flare_provider.client import load_caller_kit
from flare_provider.federation.records import RunSpec
from flare_provider.federation.scatter_gather import ScatterGatherRun
from flare_provider.poc.workspace import PocWorkspace
from flare_provider.provisioning import verify_folder
from flare_provider.snapshots import SnapshotStore
from flare_provider.wire.bundles import build_bundle
from flare_provider.wire.tensors import save_file

FLARE = [sys.executable, "-m", "flare_provider.cli"]
TIMES_TWO = Path(__file__).parent / "apps" / "slow_times_two"


def run(*argv, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=180)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("poc") / "ws"
    run(*FLARE, "poc", "prepare", "-n", "2", "-w", root, "--allow-custom-code")
    ws = PocWorkspace.load(root)
    allow_test_app(ws, ws.sites, max_concurrent_cpu_tasks=1)  # one task at a time: two federations queue
    run(root / "start.sh")
    yield ws
    run(*FLARE, "poc", "stop", "-w", root, check=False)


def deploy(ws: PocWorkspace, app_dir: Path) -> None:
    kit = load_caller_kit(ws.server_kit)
    bundle = build_bundle(app_dir, kit.cert_pem, kit.key_pem)
    for site in ws.sites:
        with kit.client(site) as client:
            client.deploy_app(bundle)


def train(ws: PocWorkspace, store_dir: Path, federation: str, app: str, start: np.ndarray,
          rounds: int) -> tuple[np.ndarray, RunSpec]:
    """``rounds`` scatter-gather rounds of ``app`` from ``start``: the final global weights, and the run."""
    initial = store_dir / f"{federation}-initial.safetensors"
    save_file({"w": start}, initial)
    spec = RunSpec(federation=federation, run_id=uuid.uuid4().hex[:8], app_name=app, sites=ws.sites, num_rounds=rounds,
                   min_clients=len(ws.sites), train_config={"sleep_s": 0.5})
    store = SnapshotStore(store_dir.as_uri())
    with ScatterGatherRun(spec, load_caller_kit(ws.server_kit), store, initial_model=str(initial)) as engine:
        progress = engine.run_rounds(engine.restore())
    assert progress.round == rounds
    return store.load_weights(store.latest(federation, spec.run_id))["w"], spec


def test_prepare_writes_signed_kits_scripts_and_data(workspace):
    ws = workspace
    manifest = json.loads((ws.root / "poc.json").read_text())
    assert manifest["sites"] == ["site-1", "site-2"] and manifest["connect"] == "outbound"
    assert {p.name for p in ws.server_kit.parent.iterdir() if p.is_dir()} == {
        "airflow-server", "site-1", "site-2", "admin@poc.local"}
    assert ws.server_kit.parent.name == "prod_00"
    for name in ws.participants():
        assert (ws.kits[name] / "startup" / "start.sh").is_file() and (ws.kits[name] / "startup" / "stop.sh").is_file()
        assert verify_folder(ws.kits[name] / "startup").ok
    for site in ws.sites:
        assert (ws.data_dir(site) / "train.npz").is_file()
    for script in ("start.sh", "stop.sh", "admin.sh"):
        assert (ws.root / script).stat().st_mode & 0o111
    again = run(*FLARE, "poc", "prepare", "-n", "2", "-w", ws.root, check=False)
    assert again.returncode == 1 and "is not empty" in again.stderr


def test_the_admin_script_reaches_every_site_through_the_relay(workspace):
    out = run(workspace.root / "admin.sh", "status").stdout
    assert "asking as 'admin@poc.local' (admin)" in out
    assert out.count("airflow-server:attached") == 2
    started = run(*FLARE, "poc", "start", "-w", workspace.root).stdout  # a second start starts nothing
    assert "site-1 already running" in started


def test_a_training_run_on_the_poc_federation(workspace, tmp_path):
    deploy(workspace, APP)
    final, _ = train(workspace, tmp_path, "poc-train", "slow_plus_one", np.zeros(16, np.float32), rounds=2)
    assert np.array_equal(final, np.full(16, 2, np.float32))


def test_two_federations_at_once_on_the_same_sites(workspace, tmp_path):
    deploy(workspace, APP)
    deploy(workspace, TIMES_TWO)
    results: dict[str, tuple[np.ndarray, RunSpec]] = {}
    errors: list[BaseException] = []

    def federation(name, app, start):
        try:
            results[name] = train(workspace, tmp_path, name, app, start, rounds=3)
        except BaseException as exc:  # reported below, with the other run's outcome
            errors.append(exc)

    threads = [threading.Thread(target=federation, args=("fed-plus", "slow_plus_one", np.arange(8, dtype=np.float32))),
               threading.Thread(target=federation, args=("fed-times", "slow_times_two", np.ones(8, np.float32)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert not errors, errors
    assert not any(thread.is_alive() for thread in threads), "a federation did not finish in 180 s"
    assert np.array_equal(results["fed-plus"][0], np.arange(8, dtype=np.float32) + 3)
    assert np.array_equal(results["fed-times"][0], np.full(8, 8, np.float32))
    # Every site trained each run's three rounds, once each, sharing its one task slot.
    for site in workspace.sites:
        started = re.findall(r"task (\S+) running in process", workspace.log_path(site).read_text())
        for _, spec in results.values():
            assert sorted(t for t in started if t.startswith(spec.run_key)) == [spec.task_id(n, site) for n in (1, 2, 3)]


def test_stop_leaves_no_process_and_clean_removes_the_workspace(workspace):
    ws = workspace
    pids = list(ws.running().values())
    assert len(pids) == 3
    tree = [p for pid in pids for p in (psutil.Process(pid), *psutil.Process(pid).children(recursive=True))]
    out = run(ws.root / "stop.sh").stdout
    assert "site agent of site-1 stopped" in out and "relay airflow-server stopped" in out
    gone, alive = psutil.wait_procs(tree, timeout=10)
    assert alive == [], alive
    assert ws.running() == {}
    run(*FLARE, "poc", "clean", "-w", ws.root)
    assert not ws.root.exists()
