"""``make demo``: a local federation trained by a real Airflow, from nothing to a model.

1. provisions a project with three sites (``flare_provider.poc``, as ``flare poc prepare``
   does: ``federation/`` holds its ``admin.sh``), each with a skewed share of the digits
   data, and starts their agents on loopback (mutual TLS);
2. starts Airflow (api-server, scheduler, dag-processor, triggerer) with its own home in
   the work folder: SQLite, LocalExecutor, the repository's ``dags/``, the Federation page from the installed package,
   snapshots on local disk and a fixed login;
3. imports the server kit as the ``flare_demo`` connection and triggers
   ``train_federation`` through Airflow's REST API;
4. follows the run round by round (the global model of each committed round scored on a
   held-out set no site has), then compares the final model on that set with two
   baselines, each one continuous run of as many epochs as a site trains in the
   federation, with the same trainer settings: each site alone on its own data, and
   one model on every site's data pooled (centralized);
5. keeps everything running for you to explore until Ctrl-C, then stops every process it
   started.

Environment:

- ``FLARE_DEMO_EXIT=1``: exit right after the run instead of waiting for Ctrl-C (tests, CI);
- ``FLARE_DEMO_ROUNDS``: rounds to train (default 15);
- ``FLARE_DEMO_WORK``: the work folder (default ``demo-work/`` in the repository); its
  previous content is removed at start;
- ``FLARE_DEMO_PASSWORD``: the password of the UI user ``admin`` (default ``admin``).

The work folder holds the kits, ``airflow/`` (Airflow's home), ``logs/`` (one log per
Airflow component), ``snapshots/`` (the models) and ``summary.json`` (the results, for
machines).

The recipe (``RECIPE``): 15 rounds of one local epoch each, SGD with momentum 0.9 from
learning rate 0.2 down a cosine that spans the whole run (the round number in the round
config says where a round is on it), and FedAdam on the server (server learning rate
0.03, beta1 0.5) over the sample-weighted mean update. The baselines train with the same
optimizer, learning rate, schedule and batch size.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from flare_provider.files import write_atomic
from flare_provider.poc import LocalFederation, free_port, prepare
from flare_provider.poc.airflow_api import AirflowApiError
from flare_provider.poc.local_airflow import LocalAirflow, airflow_env, simple_auth
from flare_provider.poc.processes import ProcessError
from flare_provider.poc.workspace import write_manifest

REPO = Path(__file__).resolve().parent.parent
APP_DIR = REPO / "examples" / "apps" / "digits"
DAG_ID = "train_federation"
PROJECT = "demo"
NUM_SITES = 3
USER = "admin"
# How the demo trains: the rounds, the sites' round config and the server optimizer. The
# DAG reads the last three from the environment of Airflow (see dags/federation_tasks.py).
RECIPE: dict[str, Any] = {
    "rounds": 15,
    "train_config": {"epochs": 1, "lr": 0.2, "momentum": 0.9, "lr_schedule": "cosine"},
    "aggregator": "fedadam",
    "aggregator_args": {"server_lr": 0.03, "beta1": 0.5},
}

MIGRATE_TIMEOUT = 300  # seconds for Airflow's database to be made
START_TIMEOUT = 120  # for each Airflow component to report healthy
DAG_TIMEOUT = 120  # for the dag-processor to have parsed the DAG
RUN_TIMEOUT = 1200  # for the training run to end
STOP_GRACE = 30  # for the components to shut down after SIGTERM


class DemoError(RuntimeError):
    """Something the user has to look at; the message says what and where."""


def say(message: str = "") -> None:
    print(message, flush=True)


_STARTED = time.monotonic()


def step(message: str) -> None:
    """A progress line, with the seconds since the demo started."""
    say(f"[{time.monotonic() - _STARTED:4.0f}s] {message}")


# ---- settings ---------------------------------------------------------------------------


class Settings:
    def __init__(self, env: dict[str, str]):
        self.work = Path(env.get("FLARE_DEMO_WORK") or REPO / "demo-work").resolve()
        self.exit_after_run = env.get("FLARE_DEMO_EXIT", "").lower() in ("1", "true", "yes")
        self.password = env.get("FLARE_DEMO_PASSWORD") or "admin"
        try:
            self.rounds = int(env.get("FLARE_DEMO_ROUNDS") or RECIPE["rounds"])
        except ValueError:
            raise DemoError(f"FLARE_DEMO_ROUNDS must be a whole number, got {env['FLARE_DEMO_ROUNDS']!r}") from None
        if self.rounds < 1:
            raise DemoError(f"FLARE_DEMO_ROUNDS must be at least 1, got {self.rounds}")

    @property
    def airflow_home(self) -> Path:
        return self.work / "airflow"

    @property
    def logs(self) -> Path:
        return self.work / "logs"

    @property
    def snapshot_uri(self) -> str:
        return (self.work / "snapshots").as_uri()


def claim_work_folder(work: Path):
    """Lock ``work`` for this demo and empty it; returns the open lock file (keep it open).

    Only an empty folder or an earlier demo's (it has ``demo.lock``) is emptied.
    """
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()) and not (work / "demo.lock").exists():
        raise DemoError(f"{work} is not empty and not a demo's work folder; set FLARE_DEMO_WORK to a new folder")
    lock = open(work / "demo.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise DemoError(f"another demo is running in {work}; stop it (Ctrl-C) or set FLARE_DEMO_WORK") from None
    for entry in work.iterdir():
        if entry.name != "demo.lock":
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    return lock


def airflow_settings(settings: Settings, port: int, conn_id: str) -> dict[str, str]:
    """The environment of every Airflow command (SQLite, LocalExecutor, a fixed login, the
    example DAGs' settings); makes Airflow's home and the log folder."""
    home = settings.airflow_home
    home.mkdir(parents=True)
    settings.logs.mkdir()
    return airflow_env(
        home, REPO / "dags", port, f"sqlite:///{home / 'airflow.db'}", "LocalExecutor",
        **simple_auth(home, {USER: settings.password}),
        AIRFLOW__CORE__PLUGINS_FOLDER=str(home / "plugins"),  # the page comes from the package's entry point
        AIRFLOW__CORE__PARALLELISM="8",  # LocalExecutor forks this many workers up front; a demo needs few
        # Where the example DAGs find the federation, the app and the snapshot store.
        FLARE_CONN_ID=conn_id,
        FLARE_APP_DIR=str(APP_DIR),
        FLARE_APP_NAME="digits",
        FLARE_SNAPSHOT_URI=settings.snapshot_uri,
        FLARE_TRAIN_CONFIG=json.dumps(RECIPE["train_config"]),
        FLARE_AGGREGATOR=RECIPE["aggregator"],
        FLARE_AGGREGATOR_ARGS=json.dumps(RECIPE["aggregator_args"]),
        GRPC_VERBOSITY=os.environ.get("GRPC_VERBOSITY", "ERROR"),
        PYTHONUNBUFFERED="1",
    )


def write_json(path: Path, doc: Any) -> None:
    write_atomic(path, (json.dumps(doc, indent=2) + "\n").encode(), durable=False)


def write_pids(settings: Settings, airflow: LocalAirflow, fed: LocalFederation) -> None:
    """Every process the demo started, for whoever has to clean up after a hard kill."""
    pids = airflow.pids()
    pids.update({f"agent {site}": a.proc.pid for site, a in fed.agents.items() if a.proc is not None})
    pids.update({f"relay {name}": r.pid for name, r in fed.relays.items() if r.pid is not None})
    write_json(settings.work / "processes.json", pids)


# ---- Airflow -----------------------------------------------------------------------------


def start_airflow(settings: Settings, airflow: LocalAirflow, fed: LocalFederation) -> None:
    """Make Airflow's database, import the connection, start the components."""
    step("Preparing Airflow's database (SQLite) ...")
    airflow.run("db", "migrate", timeout=MIGRATE_TIMEOUT)
    airflow.import_connections(json.loads(fed.connections_file.read_text()))
    airflow.add_components()
    step(f"Starting Airflow: {', '.join(airflow.services)} (logs in {settings.logs}) ...")
    try:
        airflow.start()
    finally:
        write_pids(settings, airflow, fed)


def wait_for_airflow(settings: Settings, airflow: LocalAirflow) -> None:
    """Until every component is healthy and the training DAG is loaded; logs in."""
    airflow.wait_ready(START_TIMEOUT)
    airflow.api.login(USER, settings.password)
    airflow.wait_for_dags([DAG_ID], DAG_TIMEOUT)


# ---- the run -----------------------------------------------------------------------------


def round_record(snapshot) -> dict[str, Any]:
    """What the demo shows of a committed round: the last record of its snapshot's history."""
    from flare_provider.federation.records import read_history

    record = read_history(snapshot.state.get("history"))[-1]
    return {"sites": record.accepted, "num_samples": record.num_samples, "duration_s": record.duration_s,
            "site_metrics": record.metrics}


class RoundWatcher:
    """Reads the rounds of a run from the snapshot store as they commit and scores each
    round's global model on the held-out set."""

    def __init__(self, settings: Settings, run_id: str, holdout: Path):
        from flare_provider.snapshots import SnapshotStore

        self.store = SnapshotStore(settings.snapshot_uri)
        self.run_id = run_id
        self.rounds = settings.rounds
        self.holdout = holdout
        self.seen: list[dict[str, Any]] = []

    def poll(self) -> None:
        from site_agent.worker.baseline import evaluate_weights

        done = {r["round"] for r in self.seen}
        for number in self.store.list_rounds(DAG_ID, self.run_id):
            if number in done or number == 0:  # round 0 is the initial model: no training yet
                continue
            snapshot = self.store.get_round(DAG_ID, self.run_id, number)
            accuracy = evaluate_weights(APP_DIR, self.store.load_weights(snapshot), self.holdout)["accuracy"]
            record = round_record(snapshot)
            self.seen.append({"round": number, "holdout_accuracy": accuracy, **record, "snapshot": snapshot.uri})
            val = record["site_metrics"].get("val_accuracy")
            step(f"  round {number}/{self.rounds}: {len(record['sites'])} sites, {record['num_samples']} samples, "
                 f"{record['duration_s']:.1f} s; global model on the held-out set: {accuracy:.3f}"
                 + (f" (sites' validation: {val:.3f})" if val is not None else ""))


def follow_run(airflow: LocalAirflow, run_id: str, watcher: RoundWatcher) -> dict[str, Any]:
    """Print task states and rounds until the run ends; returns the finished run."""
    states: dict[str, str] = {}

    def show(run: dict[str, Any]) -> None:
        airflow.check()
        for ti in airflow.api.task_instances(DAG_ID, run_id):
            state = ti["state"]
            if state and states.get(ti["task_id"]) != state:
                states[ti["task_id"]] = state
                step(f"  task {ti['task_id']}: {state}" + (f" (try {ti['try_number']})" if ti["try_number"] > 1 else ""))
        watcher.poll()

    return airflow.api.wait_for_run(DAG_ID, run_id, RUN_TIMEOUT, interval=1.0, on_poll=show,
                                    details=lambda: "see the UI")


def baselines(fed, rounds: int, holdout: Path) -> dict[str, Any]:
    """Each site alone and all sites pooled, each one continuous run of the epochs a site
    trains in ``rounds`` rounds, scored on the held-out set."""
    from site_agent.worker.baseline import epochs_per_round, evaluate_weights, train_centralized, train_local_only

    config = RECIPE["train_config"]
    epochs = rounds * epochs_per_round(APP_DIR, config)
    runs = {site: train_local_only(APP_DIR, fed.data_dir(site), epochs, config) for site in fed.sites}
    central = train_centralized(APP_DIR, [fed.data_dir(site) for site in fed.sites], epochs, config)
    return {
        "epochs": epochs,
        "local_only_accuracy": {site: evaluate_weights(APP_DIR, run.weights, holdout)["accuracy"]
                                for site, run in runs.items()},
        "centralized_accuracy": evaluate_weights(APP_DIR, central.weights, holdout)["accuracy"],
        "baseline_runs": {**{site: run.summary() for site, run in runs.items()}, "centralized": central.summary()},
    }


def report(summary: dict[str, Any], settings: Settings) -> None:
    from flare_provider.snapshots.local import path_from_file_uri

    rounds, epochs = summary["rounds"], summary["epochs"]
    aggregator = summary["aggregator"]
    rows = {f"federated model ({aggregator}, {rounds} rounds)": summary["global_accuracy"]}
    rows.update({f"{site} alone ({epochs} epochs)": acc for site, acc in summary["local_only_accuracy"].items()})
    rows[f"centralized, all sites' data ({epochs} epochs)"] = summary["centralized_accuracy"]
    say()
    say(f"Accuracy on the held-out set ({summary['holdout_samples']} digits no site trained on):")
    for label, accuracy in rows.items():
        say(f"  {label:<44} {accuracy:.3f}")
    say(f"The federated model reaches {summary['ratio_to_centralized']:.3f}x the centralized one's accuracy.")
    say(f"Each baseline is one continuous run of {epochs} epochs with the sites' trainer settings "
        f"({json.dumps(RECIPE['train_config'])}).")
    sites_eval = summary["evaluation"].get("sites", {})
    if sites_eval:
        own = ", ".join(f"{s} {r.get('metrics', {}).get('accuracy', float('nan')):.3f}"
                        for s, r in sorted(sites_eval.items()))
        say(f"The final model on each site's own test data: {own}")
    say()
    say(f"Model:       {summary['model_uri']}")
    if summary["model_uri"].startswith("file://"):
        say(f"             ({path_from_file_uri(summary['model_uri'])})")
    say(f"Airflow UI:  {summary['ui']}   login: {USER} / {settings.password}")
    say(f"The run:     {summary['ui']}/dags/{DAG_ID}/runs/{quote(summary['run_id'], safe='')}")
    say(f"Summary:     {settings.work / 'summary.json'}")


def run_training(settings: Settings, fed: LocalFederation, airflow: LocalAirflow) -> dict[str, Any]:
    """Trigger the training DAG, follow it, compare with every site alone; returns the summary."""
    from site_agent.datasets.digits import write_holdout

    holdout = settings.work / "holdout"
    write_holdout(holdout / "test.npz")
    api = airflow.api
    api.unpause(DAG_ID)
    aggregator = RECIPE["aggregator"]
    run_id = api.trigger(DAG_ID, conf={"rounds": settings.rounds, "aggregator": aggregator})["dag_run_id"]
    step(f"Triggered {DAG_ID} ({settings.rounds} rounds, {aggregator} {json.dumps(RECIPE['aggregator_args'])}, "
         f"sites' round config {json.dumps(RECIPE['train_config'])}): run {run_id}")

    summary: dict[str, Any] = {"dag_id": DAG_ID, "run_id": run_id, "rounds": settings.rounds, "aggregator": aggregator,
                               "recipe": {**RECIPE, "rounds": settings.rounds},
                               "ui": api.base_url, "user": USER, "snapshot_uri": settings.snapshot_uri}
    watcher = RoundWatcher(settings, run_id, holdout)
    try:
        run = follow_run(airflow, run_id, watcher)
    finally:
        summary["per_round"] = watcher.seen
    summary["state"] = run["state"]
    if run["state"] != "success":
        summary["error"] = api.failure_report(DAG_ID, run_id)
        write_json(settings.work / "summary.json", summary)
        raise DemoError(f"run {run_id} failed:\n{summary['error']}")

    result = api.xcom(DAG_ID, run_id, "train")
    step("Training the baselines: every site alone, and all sites' data pooled ...")
    import numpy as np

    with np.load(holdout / "test.npz") as data:
        holdout_samples = len(data["y"])
    summary.update(
        model_uri=result["model_uri"],
        evaluation=result.get("evaluation", {}),
        global_accuracy=watcher.seen[-1]["holdout_accuracy"],
        holdout_samples=holdout_samples,
        **baselines(fed, settings.rounds, holdout),
    )
    summary["ratio_to_centralized"] = summary["global_accuracy"] / summary["centralized_accuracy"]
    write_json(settings.work / "summary.json", summary)
    return summary


def wait_for_ctrl_c(airflow: LocalAirflow, fed: LocalFederation) -> None:
    say()
    say("Airflow and the agents keep running for you to explore; Ctrl-C stops them all.")
    while True:
        airflow.check()
        down = [site for site, agent in fed.agents.items() if not agent.alive]
        if down:
            raise DemoError(f"the agents of {', '.join(down)} exited; see {fed.agent(down[0]).log_path}")
        time.sleep(2.0)


def _interrupt(signum, frame) -> None:
    """Ctrl-C, and SIGTERM (a CI timeout, ``kill``), stop everything the demo started."""
    raise KeyboardInterrupt


def main() -> int:
    try:
        settings = Settings(dict(os.environ))
        lock = claim_work_folder(settings.work)
    except DemoError as exc:
        say(f"demo: {exc}")
        return 1

    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)  # also where the demo was started with SIGINT ignored
    # Three sites share this machine: one CPU thread each for their training (the agents
    # pass it on to their tasks), and one for this process's evaluations. More threads
    # than cores make such small models many times slower.
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")
    fed = airflow = None
    code = 0
    try:
        step(f"Provisioning project {PROJECT!r} with {NUM_SITES} sites (non-IID digits data) in {settings.work} ...")
        fed = prepare(settings.work / "federation", PROJECT, NUM_SITES, digits_data=True, connect="outbound")
        admin_script = write_manifest(fed).root / "admin.sh"  # the folder is a `flare poc` workspace too
        relays = ", ".join(f"{name} on 127.0.0.1:{port}" for name, port in fed.relay_ports.items())
        step(f"Starting the relay ({relays}) and the site agents, which dial out to it and open no port "
             "(mutual TLS end to end) ...")
        fed.start_agents()

        airflow = LocalAirflow(airflow_settings(settings, free_port(8080), fed.conn_id), settings.logs)
        write_pids(settings, airflow, fed)
        start_airflow(settings, airflow, fed)
        wait_for_airflow(settings, airflow)
        step(f"Airflow is up at {airflow.api.base_url} (login {USER} / {settings.password}); "
             f"connection {fed.conn_id} imported; admin console: {admin_script} status")

        summary = run_training(settings, fed, airflow)
        report(summary, settings)
        if not settings.exit_after_run:
            wait_for_ctrl_c(airflow, fed)
    except KeyboardInterrupt:
        say("\nStopping ...")
    except (DemoError, ProcessError, AirflowApiError) as exc:
        say(f"\ndemo: {exc}")
        code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if airflow is not None:
            airflow.stop(STOP_GRACE)
        if fed is not None:
            fed.stop_agents()
        lock.close()
        say("Stopped Airflow and the agents.")
    return code


if __name__ == "__main__":
    sys.exit(main())
