"""A distributed Airflow on one machine, for failover tests.

PostgreSQL (its own cluster in a temporary folder) as the metadata database, Redis as the
Celery broker, the Celery executor with two workers, and the scheduler, dag-processor,
triggerer and api-server as separate processes; next to them three site agents
(:mod:`flare_provider.poc`) and a moto S3 server for the snapshots. Everything listens on
127.0.0.1 on free ports, every process writes its own log file under ``<root>/logs``, and
every process is stopped again, also when starting fails half-way.

Tests drive Airflow as a user does, through the REST API, and kill its processes with
SIGKILL as a machine failure would (:meth:`Service.kill`).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil
from s3_server import TEST_KEYS, MotoServer  # tests/ is on sys.path

from flare_provider.poc import LocalFederation, free_port, prepare
from flare_provider.snapshots import SnapshotStore

T = TypeVar("T")

PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"
REDIS_SERVER = "redis-server"
AIRFLOW = [sys.executable, "-m", "airflow"]
AWS_CONN_ID = "aws_snapshots"
START_TIMEOUT = 120.0  # seconds for one component to come up; two cores start six Airflow processes at once
STOP_TIMEOUT = 20.0
SHUTDOWN_GRACE = 10.0  # seconds a component has for a clean exit before it is killed

# Tuned for a test: a dead worker or triggerer is noticed in seconds, new DAG files are
# parsed at once. Production values, and why they are larger, are in docs/failover.md.
TEST_TUNING = {
    # A running task whose supervisor sent no heartbeat this long is failed (and retried).
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "10",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "1",
    # The task supervisor's heartbeat period (keep it well below the timeout).
    "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
    # A triggerer silent this long is dead: another triggerer takes over its triggers.
    "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "1",
    "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "5",
    # Celery: a task leaves the queue only when it finished; one slot and no prefetch per
    # worker. The visibility timeout is far longer than a test, so the broker never hands
    # a dead worker's message out again: Airflow's retry is what recovers the task.
    "AIRFLOW__CELERY__TASK_ACKS_LATE": "True",
    "AIRFLOW__CELERY__WORKER_CONCURRENCY": "1",
    "AIRFLOW__CELERY__WORKER_PREFETCH_MULTIPLIER": "1",
    "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "3600",
    # New DAG files are picked up within seconds.
    "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "2",
    "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
}


class HarnessError(RuntimeError):
    """The distributed set-up could not start, or did not reach a state in time."""


def wait_for(what: str, probe: Callable[[], T], timeout: float, interval: float = 0.2,
             details: Callable[[], str] | None = None) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise HarnessError(f"{what}: not within {timeout:.0f} s" + (f"\n{details()}" if details else ""))
        time.sleep(interval)


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Service:
    """A long-running child process in its own process group, with its own log file.

    ``start()`` may be called again after ``kill()`` or ``stop()``: the log is appended to.
    """

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path,
                 ready: Callable[["Service"], bool] | None = None):
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self.ready = ready
        self.proc: subprocess.Popen | None = None
        self._log_start = 0

    def start(self) -> "Service":
        with open(self.log_path, "ab") as log:
            self._log_start = log.tell()
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        def probe() -> bool:
            if not self.alive:
                raise HarnessError(f"{self.name} exited with {self.proc and self.proc.returncode}; "
                                   f"see {self.log_path}:\n{tail(self.log_path)}")
            return self.ready is None or self.ready(self)

        wait_for(f"{self.name} ready", probe, timeout, interval=0.5, details=lambda: tail(self.log_path))

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def processes(self) -> list[psutil.Process]:
        """The main process and all its descendants (task processes sit in groups of their own)."""
        if not self.alive:
            return []
        try:
            main = psutil.Process(self.proc.pid)
            return [main, *main.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def runs(self, pid: int) -> bool:
        """Whether process ``pid`` belongs to this service."""
        return any(p.pid == pid for p in self.processes())

    def kill(self) -> None:
        """SIGKILL the whole tree at once, as when the machine under it dies."""
        _signal_all(self.processes(), signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(STOP_TIMEOUT)

    def stop(self) -> None:
        stop_all([self])

    def log_text(self) -> str:
        """What the process wrote since it was last started."""
        with open(self.log_path, "rb") as log:
            log.seek(self._log_start)
            return log.read().decode(errors="replace")


def stop_all(services: list[Service], timeout: float = SHUTDOWN_GRACE) -> None:
    """SIGTERM every service at once (a clean shutdown), then SIGKILL whatever is left of their trees."""
    trees = {service: service.processes() for service in services}  # before children are re-parented
    for service, tree in trees.items():
        if tree:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(service.pid, signal.SIGTERM)
    _, alive = psutil.wait_procs([p for tree in trees.values() for p in tree], timeout=timeout)
    _signal_all(alive, signal.SIGKILL)
    for service in services:
        if service.proc is not None:
            service.proc.wait(STOP_TIMEOUT)


def _signal_all(procs: list[psutil.Process], sig: int) -> None:
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)
    psutil.wait_procs(procs, timeout=STOP_TIMEOUT)


class Postgres:
    """A private PostgreSQL cluster: ``initdb`` into a temporary folder, ``pg_ctl`` on a free port.

    PostgreSQL refuses to run as root; as root the cluster belongs to the ``postgres``
    account (or ``nobody``), in a folder of its own outside the test's private tree. Its
    log is copied to the log folder when it stops.
    """

    def __init__(self, log_dir: Path):
        self.bin = self.find_binaries()
        self.port = free_port()
        self.log_dir = log_dir
        self.dir = Path(tempfile.mkdtemp(prefix="flare-test-pg-"))
        self.data = self.dir / "data"
        self.sockets = self.dir / "sockets"
        self.log_path = self.dir / "postgres.log"
        self.user = self._server_user()
        self.database = "airflow"
        self.url = f"postgresql+psycopg2://airflow@127.0.0.1:{self.port}/{self.database}"

    @staticmethod
    def find_binaries() -> Path:
        found = [Path(p) for p in glob.glob(PG_BIN_GLOB) if (Path(p) / "initdb").exists()]
        if not found:
            raise HarnessError("postgresql server binaries not found: install Debian's postgresql package")
        return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)

    @staticmethod
    def _server_user() -> pwd.struct_passwd | None:
        if os.geteuid() != 0:
            return None
        for name in ("postgres", "nobody"):
            with contextlib.suppress(KeyError):
                return pwd.getpwnam(name)
        raise HarnessError("running as root, but neither a 'postgres' nor a 'nobody' account exists to run PostgreSQL")

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        kwargs: dict[str, Any] = {}
        if self.user is not None:
            kwargs = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        out = subprocess.run([str(self.bin / argv[0]), *argv[1:]], capture_output=True, text=True,
                             stdin=subprocess.DEVNULL, timeout=START_TIMEOUT, **kwargs)
        if check and out.returncode != 0:
            raise HarnessError(f"{argv[0]} failed ({out.returncode}): {out.stderr.strip()[-2000:]}\n{tail(self.log_path)}")
        return out

    def start(self) -> "Postgres":
        self.sockets.mkdir()
        if self.user is not None:
            for path in (self.dir, self.sockets):
                os.chown(path, self.user.pw_uid, self.user.pw_gid)
        # Trust on loopback: a throw-away cluster that lives as long as the test session.
        self._run("initdb", "-D", str(self.data), "-U", "airflow", "--auth=trust", "--encoding=UTF8",
                  "--locale=C", "--no-sync")
        options = (f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        self._run("pg_ctl", "start", "-D", str(self.data), "-l", str(self.log_path), "-w", "-t", "60", "-o", options)
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "airflow", self.database)
        return self

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            if self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w", "-t", "30", check=False).returncode:
                self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", check=False)
        with contextlib.suppress(OSError):
            shutil.copy(self.log_path, self.log_dir / "postgres.log")
        shutil.rmtree(self.dir, ignore_errors=True)


def redis_service(log_dir: Path, workdir: Path) -> tuple[Service, str]:
    """A Redis server of our own (no persistence) and its URL."""
    binary = shutil.which(REDIS_SERVER)
    if binary is None:
        raise HarnessError("redis-server not found: install Debian's redis-server package")
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(workdir)]

    def ready(_: Service) -> bool:
        import redis

        try:
            return bool(redis.Redis(host="127.0.0.1", port=port, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    return Service("redis", argv, dict(os.environ), log_dir, ready), f"redis://127.0.0.1:{port}/0"


class AirflowAPI:
    """The public REST API (``/api/v2``) of the api-server."""

    attempts = 3  # a busy api-server (two cores, many processes) may time out a read now and then

    def __init__(self, base_url: str):
        self.http = httpx.Client(base_url=f"{base_url}/api/v2", timeout=30.0)

    def get(self, path: str, **params: Any) -> Any:
        for attempt in range(1, self.attempts + 1):
            try:
                response = self.http.get(path, params=params)
                break
            except httpx.TimeoutException:
                if attempt == self.attempts:
                    raise
        response.raise_for_status()
        return response.json()

    def health(self) -> dict[str, Any]:
        return self.get("/monitor/health")

    def dag_parsed(self, dag_id: str) -> bool:
        try:
            self.get(f"/dags/{dag_id}")
            return True
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == 404:
                return False
            raise

    def import_errors(self) -> list[dict[str, Any]]:
        return self.get("/importErrors")["import_errors"]

    def trigger(self, dag_id: str, run_id: str, conf: dict[str, Any] | None = None) -> dict[str, Any]:
        body = {"dag_run_id": run_id, "logical_date": None, "conf": conf or {}}
        try:
            response = self.http.post(f"/dags/{dag_id}/dagRuns", json=body)
        except httpx.TimeoutException:
            return self.dag_run(dag_id, run_id)  # it may have been made all the same: the run id tells
        if response.status_code >= 400:
            raise HarnessError(f"triggering {dag_id} failed: {response.status_code} {response.text[:500]}")
        return response.json()

    def dag_run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        return self.get(f"/dags/{dag_id}/dagRuns/{run_id}")

    def task_instance(self, dag_id: str, run_id: str, task_id: str) -> dict[str, Any]:
        return self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}")

    def close(self) -> None:
        self.http.close()


class Harness:
    """The whole distributed set-up; ``start()`` brings it up, ``stop()`` takes it all down.

    :param root: a folder for the federation's kits, the Airflow home, DAGs and logs.
    :param workers: the Celery workers' names (each also its Celery hostname).
    """

    def __init__(self, root: Path, num_sites: int = 3, workers: tuple[str, ...] = ("worker-a", "worker-b")):
        self.root = Path(root)
        self.logs = self.root / "logs"
        self.dags = self.root / "dags"
        self.home = self.root / "airflow"
        self.num_sites = num_sites
        self.worker_names = workers
        self.api_port = free_port()
        self.api = AirflowAPI(f"http://127.0.0.1:{self.api_port}")
        self.federation: LocalFederation | None = None
        self.s3: MotoServer | None = None
        self.bucket = f"snapshots-{uuid.uuid4().hex[:8]}"
        self.services: dict[str, Service] = {}
        self.env: dict[str, str] = {}  # every Airflow process's environment, once started
        self._cleanup = contextlib.ExitStack()

    # ---- what tests use -----------------------------------------------------------------

    @property
    def conn_id(self) -> str:
        return self.federation.conn_id

    @property
    def workers(self) -> list[Service]:
        return [self.services[name] for name in self.worker_names]

    @property
    def triggerer(self) -> Service:
        return self.services["triggerer"]

    @property
    def snapshot_uri(self) -> str:
        return f"s3://{self.bucket}/federations"

    def store(self) -> SnapshotStore:
        return SnapshotStore(self.snapshot_uri, s3_settings={"endpoint_url": self.s3.endpoint, **TEST_KEYS})

    def write_dags(self, sources: dict[str, str], timeout: float = 90.0) -> None:
        """Put DAG files (by DAG id) into the dags folder and wait until the dag-processor has parsed them.

        Write all at once: the dag-processor parses a folder's new files in one pass.
        """
        for dag_id, source in sources.items():
            (self.dags / f"{dag_id}.py").write_text(source)

        def errors() -> str:
            return f"import errors: {self.api.import_errors()}\n{tail(self.services['dag-processor'].log_path)}"

        for dag_id in sources:
            wait_for(f"DAG {dag_id} parsed", lambda: self.api.dag_parsed(dag_id), timeout, interval=0.5, details=errors)

    def worker_running(self, pid: int) -> Service:
        """The Celery worker whose process tree holds process ``pid``."""
        for worker in self.workers:
            if worker.runs(pid):
                return worker
        raise HarnessError(f"process {pid} belongs to no Celery worker")

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float) -> dict[str, Any]:
        """The DAG run once it finished (success or failed)."""
        def finished() -> dict[str, Any] | None:
            run = self.api.dag_run(dag_id, run_id)
            return run if run["state"] in ("success", "failed") else None

        return wait_for(f"DAG run {dag_id}/{run_id} finished", finished, timeout, interval=0.5,
                        details=self.diagnostics)

    def task_log(self, dag_id: str, run_id: str, task_id: str, pattern: str = "attempt=*.log*") -> list[tuple[float, str]]:
        """(time, message) of every line of a task's logs (its tries and their triggers), in time order."""
        from datetime import datetime

        folder = self.home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}"
        events = []
        for path in folder.glob(pattern):
            for line in path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    record = json.loads(line)
                    events.append((datetime.fromisoformat(record["timestamp"]).timestamp(), record["event"]))
        return sorted(events)

    def diagnostics(self, lines: int = 25) -> str:
        """The end of every component's log, for a failure message."""
        return "\n".join(f"--- {s.name} ({'alive' if s.alive else 'dead'}):\n{tail(s.log_path, lines)}"
                         for s in self.services.values())

    def airflow(self, *args: str) -> None:
        """Run an ``airflow`` CLI command against this deployment (output in ``logs/airflow-<command>.log``)."""
        what = " ".join(args[:2])
        log_path = self.logs / f"airflow-{what.replace(' ', '-')}.log"
        with open(log_path, "ab") as log:
            try:
                code = subprocess.run([*AIRFLOW, *args], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, timeout=START_TIMEOUT).returncode
            except subprocess.TimeoutExpired:
                raise HarnessError(f"airflow {what} did not finish in {START_TIMEOUT:.0f} s; see {log_path}") from None
        if code != 0:
            raise HarnessError(f"airflow {what} failed ({code}); see {log_path}:\n{tail(log_path)}")

    # ---- start and stop -----------------------------------------------------------------

    def start(self) -> "Harness":
        for folder in (self.logs, self.dags, self.home):
            folder.mkdir(parents=True, exist_ok=True)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        cleanup = self._cleanup
        postgres = Postgres(self.logs)
        cleanup.callback(postgres.stop)
        redis, broker_url = redis_service(self.logs, self.root)
        cleanup.callback(redis.stop)
        redis.start()
        self.env = self._airflow_env(postgres.url, broker_url)
        # The database (initdb, then Airflow's schema) takes longest: the agents and the S3
        # server come up meanwhile.
        def make_database() -> None:
            postgres.start()
            self.airflow("db", "migrate")

        with ThreadPoolExecutor(max_workers=1) as pool:
            database = pool.submit(make_database)
            self.federation = prepare(self.root / "federation", f"dist_{uuid.uuid4().hex[:6]}", self.num_sites)
            cleanup.callback(self.federation.stop_agents)
            for site in self.federation.sites:
                self.federation.agent(site).start(wait=False)
            self.s3 = MotoServer(self.logs)
            cleanup.callback(self.s3.stop)
            self.s3.client().create_bucket(Bucket=self.bucket)
            redis.wait_ready()
            database.result()

        self.services = {name: Service(name, argv, self.env, self.logs, ready) for name, argv, ready in self._components()}
        cleanup.callback(lambda: stop_all(list(self.services.values())))
        for service in self.services.values():
            service.start()
        self._import_connections()  # while the components start; no task runs before they are up
        for site in self.federation.sites:
            self.federation.agent(site).wait_ready()
        for service in self.services.values():
            service.wait_ready()

    def stop(self) -> None:
        """Stop everything started, newest first; never raises for one that is gone already."""
        self.api.close()
        self._cleanup.close()

    def _airflow_env(self, database_url: str, broker_url: str) -> dict[str, str]:
        """The configuration every Airflow process shares (nothing inherited from the test's own Airflow)."""
        from cryptography.fernet import Fernet

        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        api_url = f"http://127.0.0.1:{self.api_port}"
        env.update({
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags),
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
            # Every component must sign and check the same tokens.
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(64),
            "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(64),
            # A test deployment on loopback: every API caller is an admin, no password exists to leak.
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.api_port),
            "AIRFLOW__API__BASE_URL": api_url,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{api_url}/execution/",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": database_url,
            "AIRFLOW__CELERY__BROKER_URL": broker_url,
            "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{database_url}",
            **TEST_TUNING,
        })
        return env

    def _components(self) -> list[tuple[str, list[str], Callable[[Service], bool]]]:
        def healthy(component: str) -> Callable[[Service], bool]:
            def probe(_: Service) -> bool:
                try:
                    return self.api.health()[component]["status"] == "healthy"
                except (httpx.HTTPError, KeyError, ValueError):
                    return False
            return probe

        def celery_ready(service: Service) -> bool:
            return " ready." in service.log_text()

        # Logs are read from the shared local folder, so no component serves them on a port.
        components = [
            ("api-server", [*AIRFLOW, "api-server", "--host", "127.0.0.1", "--port", str(self.api_port)],
             healthy("metadatabase")),
            ("scheduler", [*AIRFLOW, "scheduler"], healthy("scheduler")),
            ("dag-processor", [*AIRFLOW, "dag-processor"], healthy("dag_processor")),
            ("triggerer", [*AIRFLOW, "triggerer", "--skip-serve-logs"], healthy("triggerer")),
        ]
        components += [
            (name, [*AIRFLOW, "celery", "worker", "--celery-hostname", f"{name}@%h", "--skip-serve-logs"], celery_ready)
            for name in self.worker_names
        ]
        return components

    def _import_connections(self) -> None:
        """The server kit's connection (as a deployment imports it) and the snapshot store's AWS connection."""
        connections = json.loads(self.federation.connections_file.read_text())
        connections[AWS_CONN_ID] = {
            "conn_type": "aws",
            "login": TEST_KEYS["aws_access_key_id"],
            "password": TEST_KEYS["aws_secret_access_key"],
            "extra": json.dumps({"endpoint_url": self.s3.endpoint, "region_name": TEST_KEYS["region_name"]}),
        }
        path = self.root / "connections.json"
        # It holds the server's private key: private to this user, and gone once imported.
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump(connections, f)
        try:
            self.airflow("connections", "import", str(path))
        finally:
            path.unlink(missing_ok=True)
