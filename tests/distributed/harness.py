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
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Any

from s3_server import TEST_KEYS, MotoServer  # tests/ is on sys.path

from flare_provider.poc import LocalFederation, free_port, prepare
from flare_provider.poc.airflow_api import AirflowApi
from flare_provider.poc.local_airflow import LocalAirflow, airflow_env
from flare_provider.poc.processes import START_TIMEOUT, Service, tail, wait_for
from flare_provider.snapshots import SnapshotStore

# The failover tests take wait_for and Service from here, with the harness they drive.
__all__ = ["AWS_CONN_ID", "Harness", "HarnessError", "Service", "wait_for"]

PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"
REDIS_SERVER = "redis-server"
AWS_CONN_ID = "aws_snapshots"

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
    """A part of the distributed set-up is missing or could not start."""


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
        self.airflow: LocalAirflow | None = None
        self.federation: LocalFederation | None = None
        self.s3: MotoServer | None = None
        self.bucket = f"snapshots-{uuid.uuid4().hex[:8]}"
        self._cleanup = contextlib.ExitStack()

    # ---- what tests use -----------------------------------------------------------------

    @property
    def api(self) -> AirflowApi:
        return self.airflow.api

    @property
    def env(self) -> dict[str, str]:
        """Every Airflow process's environment."""
        return self.airflow.env

    @property
    def conn_id(self) -> str:
        return self.federation.conn_id

    @property
    def workers(self) -> list[Service]:
        return [self.airflow.services[name] for name in self.worker_names]

    @property
    def triggerer(self) -> Service:
        return self.airflow.services["triggerer"]

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
        self.airflow.wait_for_dags(sources, timeout)

    def worker_running(self, pid: int) -> Service:
        """The Celery worker whose process tree holds process ``pid``."""
        for worker in self.workers:
            if worker.runs(pid):
                return worker
        raise HarnessError(f"process {pid} belongs to no Celery worker")

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float) -> dict[str, Any]:
        """The DAG run once it finished (success or failed)."""
        return self.api.wait_for_run(dag_id, run_id, timeout, details=self.diagnostics)

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
        return self.airflow.diagnostics(lines)

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
        self.airflow = LocalAirflow(self._airflow_env(postgres.url, broker_url), self.logs)
        # The database (initdb, then Airflow's schema) takes longest: the agents and the S3
        # server come up meanwhile.
        def make_database() -> None:
            postgres.start()
            self.airflow.run("db", "migrate")

        with ThreadPoolExecutor(max_workers=1) as pool:
            database = pool.submit(make_database)
            self.federation = prepare(self.root / "federation", f"dist_{uuid.uuid4().hex[:6]}", self.num_sites,
                                      connect="outbound")
            cleanup.callback(self.federation.stop_agents)
            for server in self.federation.relay_ports:  # the sites dial out to it
                self.federation.relay(server).start()
            for site in self.federation.sites:
                self.federation.agent(site).start(wait=False)
            self.s3 = MotoServer(self.logs)
            cleanup.callback(self.s3.stop)
            self.s3.client().create_bucket(Bucket=self.bucket)
            redis.wait_ready()
            database.result()

        cleanup.callback(self.airflow.stop)
        self.airflow.add_components()
        for name in self.worker_names:
            self.airflow.add_celery_worker(name)
        self.airflow.start()
        self._import_connections()  # while the components start; no task runs before they are up
        for site in self.federation.sites:
            self.federation.agent(site).wait_ready()
        self.airflow.wait_ready()

    def stop(self) -> None:
        """Stop everything started, newest first; never raises for one that is gone already."""
        self._cleanup.close()

    def _airflow_env(self, database_url: str, broker_url: str) -> dict[str, str]:
        """The configuration every Airflow process shares: Celery on Redis, PostgreSQL, everyone an admin."""
        from cryptography.fernet import Fernet

        return airflow_env(
            self.home, self.dags, self.api_port, database_url, "CeleryExecutor",
            AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="False",
            AIRFLOW__CORE__FERNET_KEY=Fernet.generate_key().decode(),
            AIRFLOW__API__SECRET_KEY=secrets.token_urlsafe(64),
            # A test deployment on loopback: every API caller is an admin, no password exists to leak.
            AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="True",
            AIRFLOW__CELERY__BROKER_URL=broker_url,
            AIRFLOW__CELERY__RESULT_BACKEND=f"db+{database_url}",
            **TEST_TUNING,
        )

    def _import_connections(self) -> None:
        """The server kit's connection (as a deployment imports it) and the snapshot store's AWS connection."""
        connections = json.loads(self.federation.connections_file.read_text())
        connections[AWS_CONN_ID] = {
            "conn_type": "aws",
            "login": TEST_KEYS["aws_access_key_id"],
            "password": TEST_KEYS["aws_secret_access_key"],
            "extra": json.dumps({"endpoint_url": self.s3.endpoint, "region_name": TEST_KEYS["region_name"]}),
        }
        self.airflow.import_connections(connections)
