"""``make demo``: a local federation trained by a real Airflow, from nothing to a model.

1. provisions a project with three sites (``flare_provider.poc``), each with a skewed
   share of the digits data, and starts their agents on loopback (mutual TLS);
2. starts Airflow (api-server, scheduler, dag-processor, triggerer) with its own home in
   the work folder: SQLite, LocalExecutor, the repository's ``dags/``, the Federation page from the installed package,
   snapshots on local disk and a fixed login;
3. imports the server kit as the ``flare_demo`` connection and triggers
   ``train_federation`` through Airflow's REST API;
4. follows the run round by round (the global model of each committed round scored on a
   held-out set no site has), then compares the final model with what each site reaches
   training on its own data for as many rounds;
5. keeps everything running for you to explore until Ctrl-C, then stops every process it
   started.

Environment:

- ``FLARE_DEMO_EXIT=1``: exit right after the run instead of waiting for Ctrl-C (tests, CI);
- ``FLARE_DEMO_ROUNDS``: rounds to train (default 5);
- ``FLARE_DEMO_WORK``: the work folder (default ``demo-work/`` in the repository); its
  previous content is removed at start;
- ``FLARE_DEMO_PASSWORD``: the password of the UI user ``admin`` (default ``admin``).

The work folder holds the kits, ``airflow/`` (Airflow's home), ``logs/`` (one log per
Airflow component), ``snapshots/`` (the models) and ``summary.json`` (the results, for
machines).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

REPO = Path(__file__).resolve().parent.parent
APP_DIR = REPO / "examples" / "apps" / "digits"
DAG_ID = "train_federation"
PROJECT = "demo"
NUM_SITES = 3
USER = "admin"
# Airflow's components; scheduler and triggerer do not serve their logs over HTTP (they
# would listen on every interface): the api-server reads the task logs from local disk.
COMPONENTS = {
    "api-server": ("api-server",),
    "scheduler": ("scheduler", "--skip-serve-logs"),
    "dag-processor": ("dag-processor",),
    "triggerer": ("triggerer", "--skip-serve-logs"),
}

API_TIMEOUT = 120  # seconds for the api-server to answer
COMPONENTS_TIMEOUT = 120  # for scheduler, dag-processor and triggerer to report healthy
DAG_TIMEOUT = 120  # for the dag-processor to have parsed the DAG
RUN_TIMEOUT = 1200  # for the training run to end
STOP_TIMEOUT = 30  # for a component to shut down after SIGTERM


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
            self.rounds = int(env.get("FLARE_DEMO_ROUNDS") or 5)
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


def api_port() -> int:
    """8080 when it is free on loopback, else any free port."""
    import socket

    from flare_provider.poc import free_port

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", 8080))
            return 8080
        except OSError:
            return free_port()


def airflow_env(settings: Settings, port: int, conn_id: str) -> dict[str, str]:
    """The environment of every Airflow command: nothing inherited from another Airflow set-up."""
    import secrets

    home = settings.airflow_home
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "dags"),
        AIRFLOW__CORE__PLUGINS_FOLDER=str(home / "plugins"),  # the page comes from the package's entry point
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__EXECUTOR="LocalExecutor",
        AIRFLOW__CORE__PARALLELISM="8",  # LocalExecutor forks this many workers up front; a demo needs few
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home / 'airflow.db'}",
        AIRFLOW__CORE__AUTH_MANAGER="airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS=f"{USER}:admin",
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=str(home / "passwords.json"),
        AIRFLOW__API__HOST="127.0.0.1",
        AIRFLOW__API__PORT=str(port),
        AIRFLOW__API__BASE_URL=f"http://127.0.0.1:{port}",
        AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"http://127.0.0.1:{port}/execution/",
        AIRFLOW__API_AUTH__JWT_SECRET=secrets.token_urlsafe(64),  # signs the API's and the tasks' tokens
        # Where the example DAGs find the federation, the app and the snapshot store.
        FLARE_CONN_ID=conn_id,
        FLARE_APP_DIR=str(APP_DIR),
        FLARE_APP_NAME="digits",
        FLARE_SNAPSHOT_URI=settings.snapshot_uri,
        GRPC_VERBOSITY=os.environ.get("GRPC_VERBOSITY", "ERROR"),
        PYTHONUNBUFFERED="1",
    )
    return env


# ---- processes --------------------------------------------------------------------------


class Components:
    """Airflow components, each in its own process group, so that stopping one stops its
    children (the executor's workers, the task processes) too."""

    def __init__(self, env: dict[str, str], logs: Path):
        self.env = env
        self.logs = logs
        self.procs: dict[str, subprocess.Popen] = {}
        # Run from Airflow's home, not the repository root, whose *.egg-info would list the
        # package's plugin entry point a second time.
        self.cwd = env["AIRFLOW_HOME"]

    def log_path(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def run(self, name: str, *args: str, timeout: float) -> None:
        """``airflow ARGS`` to completion, output to ``logs/NAME.log``."""
        with open(self.log_path(name), "ab") as log:
            try:
                code = subprocess.run(
                    [sys.executable, "-m", "airflow", *args], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, timeout=timeout, start_new_session=True, cwd=self.cwd,
                ).returncode
            except subprocess.TimeoutExpired:
                raise DemoError(f"airflow {args[0]} did not finish in {timeout:.0f} s; see {self.log_path(name)}") from None
        if code != 0:
            log = self.log_path(name)
            raise DemoError(f"airflow {' '.join(args[:2])} failed (exit {code}); see {log}:\n{tail(log)}")

    def start(self, name: str, args: tuple[str, ...]) -> None:
        with open(self.log_path(name), "ab") as log:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "airflow", *args], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.cwd,
            )

    def check(self) -> None:
        """Raise if a component has exited."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                log = self.log_path(name)
                raise DemoError(f"Airflow {name} exited ({proc.returncode}); see {log}:\n{tail(log)}")

    def stop(self) -> None:
        """SIGTERM to every group, then SIGKILL to whatever is left of them."""
        for proc in self.procs.values():
            _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.procs.values():
            _signal_group(proc.pid, signal.SIGKILL)  # stragglers of a group whose leader is gone
            proc.wait()
        self.procs.clear()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def write_pids(settings: Settings, components: Components, fed) -> None:
    """Every process the demo started, for whoever has to clean up after a hard kill."""
    pids = {name: p.pid for name, p in components.procs.items()}
    pids.update({f"agent {site}": a.proc.pid for site, a in fed.agents.items() if a.proc is not None})
    write_json(settings.work / "processes.json", pids)


def write_json(path: Path, doc: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


# ---- Airflow's REST API ------------------------------------------------------------------


class AirflowApi:
    """The public REST API (``/api/v2``) with a JWT from ``/auth/token``."""

    def __init__(self, base_url: str):
        import httpx

        self.base_url = base_url
        self.http = httpx.Client(base_url=base_url, timeout=30.0)

    def close(self) -> None:
        self.http.close()

    def health(self) -> dict[str, Any] | None:
        """The components' health, or None while the api-server does not answer."""
        import httpx

        try:
            response = self.http.get("/api/v2/monitor/health", timeout=5.0)
        except httpx.TransportError:
            return None
        return response.json() if response.status_code == 200 else None

    def login(self, user: str, password: str) -> None:
        response = self.http.post("/auth/token", json={"username": user, "password": password})
        if response.status_code != 201:
            raise DemoError(f"logging in to Airflow as {user!r} failed: HTTP {response.status_code} {response.text[:200]}")
        self.http.headers["Authorization"] = f"Bearer {response.json()['access_token']}"

    def call(self, method: str, path: str, *, ok: tuple[int, ...] = (200,), **kwargs) -> Any:
        response = self.http.request(method, "/api/v2" + path, **kwargs)
        if response.status_code not in ok:
            raise DemoError(f"{method} {path}: HTTP {response.status_code} {response.text[:500]}")
        return response.json() if response.content else None

    def dag(self, dag_id: str) -> dict[str, Any] | None:
        response = self.http.get(f"/api/v2/dags/{dag_id}")
        return response.json() if response.status_code == 200 else None

    def import_errors(self) -> list[dict[str, Any]]:
        return self.call("GET", "/importErrors")["import_errors"]

    def run_path(self, dag_id: str, run_id: str) -> str:
        return f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}"

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int, lines: int = 20) -> str:
        """The last ``lines`` lines of a task try's log, with the exceptions it logged."""
        path = f"{self.run_path(dag_id, run_id)}/taskInstances/{task_id}/logs/{try_number}"
        response = self.http.get("/api/v2" + path, params={"full_content": "true"})
        if response.status_code != 200:
            return f"(log not available: HTTP {response.status_code})"
        text = []
        for entry in response.json()["content"]:
            if str(entry.get("event", "")).startswith(("::group::", "::endgroup::")):
                continue
            text.append(f"{entry.get('level', ''):>7} {entry.get('event', '')}")
            text += [f"        {e.get('exc_type')}: {e.get('exc_value')}" for e in (entry.get("error_detail") or [])[:1]]
        return "\n".join(text[-lines:])

    def xcom(self, dag_id: str, run_id: str, task_id: str) -> Any:
        entry = self.call("GET", f"{self.run_path(dag_id, run_id)}/taskInstances/{task_id}/xcomEntries/return_value")
        value = entry["value"]
        return json.loads(value) if isinstance(value, str) else value


# ---- the steps ---------------------------------------------------------------------------


def wait_until(what: str, check, timeout: float, where: str, interval: float = 1.0, alive=None):
    """``check()`` until it returns something truthy; ``alive()`` may raise meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        if alive is not None:
            alive()
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise DemoError(f"{what} in {timeout:.0f} s; see {where}")
        time.sleep(interval)


def start_airflow(settings: Settings, components: Components, conn_file: Path) -> None:
    """Make Airflow's database, import the connection, start the components."""
    home = settings.airflow_home
    home.mkdir(parents=True)
    settings.logs.mkdir()
    # SimpleAuthManager reads the users' passwords from this file (and would generate
    # one for a user it lacks).
    passwords = home / "passwords.json"
    passwords.touch(mode=0o600)
    passwords.write_text(json.dumps({USER: settings.password}))

    step("Preparing Airflow's database (SQLite) ...")
    components.run("db-migrate", "db", "migrate", timeout=300)
    components.run("connections-import", "connections", "import", str(conn_file), timeout=120)
    step(f"Starting Airflow: {', '.join(COMPONENTS)} (logs in {settings.logs}) ...")
    for name, args in COMPONENTS.items():
        components.start(name, args)


def wait_for_airflow(settings: Settings, components: Components, api: AirflowApi) -> None:
    """Until every component is healthy and the training DAG is loaded; logs in."""
    log = components.log_path("api-server")
    wait_until("Airflow api-server did not come up", api.health, API_TIMEOUT, log, alive=components.check)

    def healthy() -> bool:
        health = api.health() or {}
        parts = ("scheduler", "triggerer", "dag_processor")
        return all((health.get(part) or {}).get("status") == "healthy" for part in parts)

    wait_until("Airflow scheduler, triggerer and dag-processor did not all report healthy", healthy, COMPONENTS_TIMEOUT,
               settings.logs, alive=components.check)
    api.login(USER, settings.password)

    def dag_parsed() -> bool:
        errors = [e for e in api.import_errors() if e.get("filename", "").endswith(f"{DAG_ID}.py")]
        if errors:
            raise DemoError(f"dags/{DAG_ID}.py does not import:\n{errors[0].get('stack_trace', errors[0])}")
        return api.dag(DAG_ID) is not None

    wait_until(f"the dag-processor did not load dags/{DAG_ID}.py", dag_parsed, DAG_TIMEOUT,
               components.log_path("dag-processor"), alive=components.check)


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
        from site_agent.baseline import evaluate_weights

        done = {r["round"] for r in self.seen}
        for number in self.store.list_rounds(DAG_ID, self.run_id):
            if number in done or number == 0:  # round 0 is the initial model: no training yet
                continue
            snapshot = self.store.get_round(DAG_ID, self.run_id, number)
            record = snapshot.state["history"][-1]
            accuracy = evaluate_weights(APP_DIR, self.store.load_weights(snapshot), self.holdout)["accuracy"]
            self.seen.append({"round": number, "holdout_accuracy": accuracy, "sites": record["accepted"],
                              "num_samples": record["num_samples"], "duration_s": record["duration_s"],
                              "site_metrics": record["metrics"], "snapshot": snapshot.uri})
            val = record["metrics"].get("val_accuracy")
            step(f"  round {number}/{self.rounds}: {len(record['accepted'])} sites, {record['num_samples']} samples, "
                f"{record['duration_s']:.1f} s; global model on the held-out set: {accuracy:.3f}"
                + (f" (sites' validation: {val:.3f})" if val is not None else ""))


def follow_run(api: AirflowApi, components: Components, run_id: str, watcher: RoundWatcher) -> dict[str, Any]:
    """Print task states and rounds until the run ends; returns the finished run."""
    path = api.run_path(DAG_ID, run_id)
    states: dict[str, str] = {}
    deadline = time.monotonic() + RUN_TIMEOUT
    while True:
        components.check()
        run = api.call("GET", path)
        for ti in api.call("GET", f"{path}/taskInstances")["task_instances"]:
            state = ti["state"]
            if state and states.get(ti["task_id"]) != state:
                states[ti["task_id"]] = state
                step(f"  task {ti['task_id']}: {state}" + (f" (try {ti['try_number']})" if ti["try_number"] > 1 else ""))
        watcher.poll()
        if run["state"] in ("success", "failed"):
            return run
        if time.monotonic() > deadline:
            raise DemoError(f"run {run_id} did not finish in {RUN_TIMEOUT} s (state {run['state']}); see the UI")
        time.sleep(1.0)


def failure_report(api: AirflowApi, run_id: str) -> str:
    lines = []
    for ti in api.call("GET", f"{api.run_path(DAG_ID, run_id)}/taskInstances")["task_instances"]:
        if ti["state"] in ("failed", "upstream_failed"):
            lines.append(f"task {ti['task_id']} {ti['state']}")
            if ti["state"] == "failed":
                lines.append(api.task_log(DAG_ID, run_id, ti["task_id"], ti["try_number"]))
    return "\n".join(lines)


def local_only_accuracy(fed, rounds: int, holdout: Path) -> dict[str, float]:
    """What each site reaches on the held-out set training alone, as many rounds."""
    from site_agent.baseline import evaluate_weights, train_local_only

    return {
        site: evaluate_weights(APP_DIR, train_local_only(APP_DIR, fed.data_dir(site), rounds), holdout)["accuracy"]
        for site in fed.sites
    }


def report(summary: dict[str, Any], settings: Settings) -> None:
    from flare_provider.snapshots.local import path_from_file_uri

    rounds = summary["rounds"]
    rows = {f"federated model ({summary['aggregator']}, {rounds} rounds)": summary["global_accuracy"]}
    rows.update({f"{site} alone ({rounds} rounds)": acc for site, acc in summary["local_only_accuracy"].items()})
    say()
    say(f"Accuracy on the held-out set ({summary['holdout_samples']} digits no site trained on):")
    for label, accuracy in rows.items():
        say(f"  {label:<36} {accuracy:.3f}")
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


def run_training(settings: Settings, fed, api: AirflowApi, components: Components) -> dict[str, Any]:
    """Trigger the training DAG, follow it, compare with every site alone; returns the summary."""
    from site_agent.datasets.digits import write_holdout

    holdout = settings.work / "holdout"
    write_holdout(holdout / "test.npz")
    api.call("PATCH", f"/dags/{DAG_ID}", json={"is_paused": False})
    conf = {"rounds": settings.rounds, "aggregator": "fedavg"}
    run_id = api.call("POST", f"/dags/{DAG_ID}/dagRuns", json={"logical_date": None, "conf": conf})["dag_run_id"]
    step(f"Triggered {DAG_ID} ({settings.rounds} rounds, FedAvg): run {run_id}")

    summary: dict[str, Any] = {"dag_id": DAG_ID, "run_id": run_id, "rounds": settings.rounds, "aggregator": "fedavg",
                               "ui": api.base_url, "user": USER, "snapshot_uri": settings.snapshot_uri}
    watcher = RoundWatcher(settings, run_id, holdout)
    try:
        run = follow_run(api, components, run_id, watcher)
    finally:
        summary["per_round"] = watcher.seen
    summary["state"] = run["state"]
    if run["state"] != "success":
        summary["error"] = failure_report(api, run_id)
        write_json(settings.work / "summary.json", summary)
        raise DemoError(f"run {run_id} failed:\n{summary['error']}")

    result = api.xcom(DAG_ID, run_id, "train")
    step("Training every site alone for comparison ...")
    import numpy as np

    with np.load(holdout / "test.npz") as data:
        holdout_samples = len(data["y"])
    summary.update(
        model_uri=result["model_uri"],
        evaluation=result.get("evaluation", {}),
        global_accuracy=watcher.seen[-1]["holdout_accuracy"],
        holdout_samples=holdout_samples,
        local_only_accuracy=local_only_accuracy(fed, settings.rounds, holdout),
    )
    write_json(settings.work / "summary.json", summary)
    return summary


def wait_for_ctrl_c(components: Components, fed) -> None:
    say()
    say("Airflow and the agents keep running for you to explore; Ctrl-C stops them all.")
    while True:
        components.check()
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
    fed = components = api = None
    code = 0
    try:
        from flare_provider.poc import prepare

        step(f"Provisioning project {PROJECT!r} with {NUM_SITES} sites (non-IID digits data) in {settings.work} ...")
        fed = prepare(settings.work / "federation", PROJECT, NUM_SITES, digits_data=True)
        ports = ", ".join(str(fed.ports[s]) for s in fed.sites)
        step(f"Starting the site agents on 127.0.0.1 ports {ports} (mutual TLS) ...")
        try:
            fed.start_agents()
        except RuntimeError as exc:
            raise DemoError(str(exc)) from None

        port = api_port()
        components = Components(airflow_env(settings, port, fed.conn_id), settings.logs)
        write_pids(settings, components, fed)
        try:
            start_airflow(settings, components, fed.connections_file)
        finally:
            write_pids(settings, components, fed)
        api = AirflowApi(f"http://127.0.0.1:{port}")
        wait_for_airflow(settings, components, api)
        step(f"Airflow is up at {api.base_url} (login {USER} / {settings.password}); connection {fed.conn_id} imported")

        summary = run_training(settings, fed, api, components)
        report(summary, settings)
        if not settings.exit_after_run:
            wait_for_ctrl_c(components, fed)
    except KeyboardInterrupt:
        say("\nStopping ...")
    except DemoError as exc:
        say(f"\ndemo: {exc}")
        code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if api is not None:
            api.close()
        if components is not None:
            components.stop()
        if fed is not None:
            fed.stop_agents()
        lock.close()
        say("Stopped Airflow and the agents.")
    return code


if __name__ == "__main__":
    sys.exit(main())
