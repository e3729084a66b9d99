"""What the benchmarks share: the machine's description, result tables, a local
federation with running agents, timed agent clients and the S3-protocol server."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import platform
import statistics
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from flare_provider.client import AgentClient, CallerKit
from flare_provider.poc import LocalFederation, prepare

REPO = Path(__file__).resolve().parent.parent
APPS = Path(__file__).resolve().parent / "apps"
MIB = 1 << 20
GIB = 1 << 30
LIBRARIES = ("numpy", "safetensors", "grpcio", "protobuf", "cryptography", "boto3", "moto", "torch", "apache-airflow")


# ---- numbers ------------------------------------------------------------------------------


def median(values: Iterable[float]) -> float:
    values = list(values)
    if not values:
        raise ValueError("no measurements to take the median of")
    return statistics.median(values)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def gbps(bytes_per_second: float) -> str:
    """Decimal gigabytes per second, as throughput is usually quoted."""
    return f"{bytes_per_second / 1e9:.2f}"


def ratio(value: float, limit: float) -> str:
    return f"{value / limit:.2f}x" if limit else "n/a"


def size(n: int) -> str:
    return f"{n / GIB:g} GiB" if n >= GIB else f"{n / MIB:g} MiB"


# ---- the machine --------------------------------------------------------------------------


def load_average() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def meminfo(name: str) -> int:
    """A field of /proc/meminfo in bytes (MemTotal, MemAvailable, ...)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return int(value.split()[0]) * 1024
    raise KeyError(name)


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or "unknown"


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return f"{line.partition('=')[2].strip(chr(34))}, Linux {platform.release()}"
    except OSError:
        pass
    return platform.platform()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    return {
        "CPU": _cpu_model(),
        "cores": f"{os.cpu_count()} ({len(os.sched_getaffinity(0))} usable by this process)",
        "memory": f"{meminfo('MemTotal') / GIB:.1f} GiB ({meminfo('MemAvailable') / GIB:.1f} GiB available at the start)",
        "OS": _os_name(),
        "Python": platform.python_version(),
        "libraries": ", ".join(f"{name} {_version(name)}" for name in LIBRARIES),
    }


class MemoryWatch:
    """Samples the machine's memory in use (MemTotal - MemAvailable) in a thread; ``peak`` in bytes."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.start = self.peak = meminfo("MemTotal") - meminfo("MemAvailable")
        self.lowest_available = meminfo("MemAvailable")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            available = meminfo("MemAvailable")
            self.lowest_available = min(self.lowest_available, available)
            self.peak = max(self.peak, meminfo("MemTotal") - available)

    def __enter__(self) -> "MemoryWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


# ---- results ------------------------------------------------------------------------------


@dataclass
class Table:
    """A result table; printed as Markdown to stdout and to RESULTS.md alike."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"table {self.title!r} has {len(self.columns)} columns, got {len(cells)} cells")
        self.rows.append([str(c) for c in cells])

    def markdown(self) -> str:
        lines = [f"#### {self.title}", "", "| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        for note in self.notes:
            lines += ["", note]
        return "\n".join(lines) + "\n"


@dataclass
class Section:
    """One benchmark's results: its tables, the command that reproduces them, when it ran."""

    title: str
    command: str
    intro: str = ""
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    summary: list[tuple[str, str, str, str]] = field(default_factory=list)  # figure, measured, limit, ratio
    load_before: str = ""
    load_after: str = ""
    seconds: float = 0.0

    def headline(self, figure: str, measured: str, limit: str, ratio: str) -> None:
        """A figure for the summary at the top of RESULTS.md."""
        self.summary.append((figure, measured, limit, ratio))

    def table(self, title: str, columns: list[str]) -> Table:
        table = Table(title, columns)
        self.tables.append(table)
        return table

    def markdown(self) -> str:
        parts = [f"## {self.title}", ""]
        if self.intro:
            parts += [self.intro, ""]
        parts += [
            f"Reproduce: `{self.command}` (took {self.seconds:.0f} s; load average 1/5/15 min "
            f"{self.load_before} before, {self.load_after} after)",
            "",
        ]
        parts += [t.markdown() for t in self.tables]
        parts += [f"{note}\n" for note in self.notes]
        return "\n".join(parts)


# ---- a local federation -------------------------------------------------------------------


@contextlib.contextmanager
def local_federation(
    root: Path, name: str, num_sites: int, *, gpus: tuple[int, ...] = (), connect: str = "listen",
    preload_modules: list[str] | None = None,
) -> Iterator[LocalFederation]:
    """``num_sites`` agents on loopback (mutual TLS) whose sites run apps' custom code; stopped on exit.

    ``connect="outbound"``: the sites dial out to one relay process and the rounds go through it.
    """
    fed = prepare(root, name, num_sites, digits_data=False, connect=connect)
    for site in fed.sites:
        # The benchmark apps bring their own trainer: each site opts in, as a site's IT would.
        changes: dict = {"allow_custom_code": True, "gpus": list(gpus)}
        if preload_modules is not None:
            changes["preload_modules"] = preload_modules
        fed.set_site_settings(site, **changes)
        fed.data_dir(site).mkdir(exist_ok=True)
    try:
        fed.start_agents()
        yield fed
    finally:
        fed.stop_agents()


@dataclass
class Transfer:
    site: str
    method: str  # "submit" or "fetch"
    started: float  # time.time()
    ended: float
    bytes: int


class TimedClient(AgentClient):
    """An :class:`AgentClient` that records when each weights upload and result download ran."""

    def __init__(self, *args, transfers: list[Transfer], **kwargs):
        super().__init__(*args, **kwargs)
        self.transfers = transfers
        self._lock = threading.Lock()

    def _record(self, method: str, started: float, nbytes: int) -> None:
        with self._lock:
            self.transfers.append(Transfer(self.site, method, started, time.time(), nbytes))

    def submit_task(self, task_id, app_name, weights, round, **kwargs):
        started = time.time()
        info, created = super().submit_task(task_id, app_name, weights, round, **kwargs)
        sent = os.stat(weights).st_size if created and not isinstance(weights, bytes) else 0
        self._record("submit", started, sent)
        return info, created

    def fetch_result(self, task_id, dest, **kwargs):
        started = time.time()
        info = super().fetch_result(task_id, dest, **kwargs)
        self._record("fetch", started, os.stat(dest).st_size)
        return info


def timed_client_factory(kit: CallerKit, transfers: list[Transfer]):
    """A ``client_factory`` for :class:`~flare_provider.federation.scatter_gather.ScatterGatherRun`."""

    def make(site: str) -> TimedClient:
        return TimedClient(
            site, kit.endpoint(site).address, kit.cert_pem, kit.key_pem, kit.root_ca_pem, transfers=transfers
        )

    return make


# ---- the S3-protocol server ---------------------------------------------------------------


def _test_s3_module():
    # The test suite's moto server helper (tests/s3_server.py), loaded by path: tests/ is no package.
    spec = importlib.util.spec_from_file_location("flare_bench_s3_server", REPO / "tests" / "s3_server.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class LocalS3:
    """moto's S3 server on 127.0.0.1 with one bucket; ``settings`` are SnapshotStore's ``s3_settings``."""

    server: object
    bucket: str
    settings: dict[str, str]

    def uri(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def client(self):
        from flare_provider.snapshots.s3 import make_s3_client

        return make_s3_client(self.settings)

    def empty_bucket(self) -> None:
        """Delete every object: moto keeps them in its memory."""
        client = self.client()
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})


@contextlib.contextmanager
def local_s3(log_dir: Path, bucket: str = "flare-bench") -> Iterator[LocalS3]:
    module = _test_s3_module()
    server = module.MotoServer(log_dir)
    try:
        s3 = LocalS3(server, bucket, {"endpoint_url": server.endpoint, **module.TEST_KEYS})
        s3.client().create_bucket(Bucket=bucket)
        yield s3
    finally:
        server.stop()
