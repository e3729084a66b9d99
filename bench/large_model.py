"""2. Large model round: a model of 1 GiB of float32 weights, four sites.

The engine runs in a child process (``python -m bench.large_model --engine CONFIG``) so
that its peak memory is its own: the kernel's high-water mark of resident memory
(``VmHWM``), reset between the phases of a round through ``/proc/self/clear_refs``, and
the anonymous part of it sampled every few milliseconds. The sites run the plus-one
trainer, so a round is moving, checking and averaging the weights, not training them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from . import limits
from .common import (
    APPS,
    GIB,
    MIB,
    REPO,
    MemoryWatch,
    Section,
    Transfer,
    gbps,
    local_federation,
    median,
    meminfo,
    ratio,
    size,
    timed_client_factory,
)

APP = APPS / "plus_one"
APP_NAME = "bench_plus_one"
TENSOR_BYTES = 16 * MIB  # the model is made of tensors this large (a mid-sized layer)
TARGET_MULTIPLE = 3.0
LIMIT_PROBE_BYTES = 512 * MIB
# Memory a round takes, in models: the engine (measured below 3: the float64 sums and
# buffers), and each site's worker (the weights, their check, the result's page cache).
ENGINE_MODELS = 3
WORKER_MODELS = 2
PHASES = ("restore", "scatter", "gather", "finish")


def model_layout(nbytes: int) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a float32 model of ``nbytes``: ``TENSOR_BYTES`` each, the last one smaller."""
    shapes, left, index = {}, nbytes, 0
    while left > 0:
        piece = min(TENSOR_BYTES, left)
        shapes[f"layer_{index:04d}.weight"] = (piece // 4 // 1024, 1024) if piece % 4096 == 0 else (piece // 4,)
        left -= piece
        index += 1
    return shapes


def write_model(path: Path, nbytes: int) -> None:
    """A float32 model of ``nbytes`` as safetensors (every weight 0.5)."""
    from safetensors.numpy import save_file

    save_file({name: np.full(shape, 0.5, np.float32) for name, shape in model_layout(nbytes).items()}, str(path))


# ---- the engine's side (child process) ----------------------------------------------------


class PeakMemory:
    """This process's peak resident memory per phase, in bytes."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.hwm: dict[str, int] = {}
        self.anon: dict[str, int] = {}
        self._phase: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    @staticmethod
    def _status(field: str) -> int:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
        return int(match.group(1)) * 1024

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            phase = self._phase
            if phase is not None:
                self.anon[phase] = max(self.anon.get(phase, 0), self._status("RssAnon"))

    @contextlib.contextmanager
    def phase(self, name: str):
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        self._phase = name
        try:
            yield
        finally:
            self._phase = None
            self.hwm[name] = max(self.hwm.get(name, 0), self._status("VmHWM"))
            self.anon[name] = max(self.anon.get(name, 0), self._status("RssAnon"))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def engine_main(config_path: Path) -> None:
    """Run the rounds in this process and write what was measured to ``config["result"]``."""
    import resource

    from flare_provider.client import load_caller_kit
    from flare_provider.federation.records import RunSpec
    from flare_provider.federation.scatter_gather import ScatterGatherRun
    from flare_provider.snapshots import SnapshotStore

    config = json.loads(config_path.read_text())
    kit = load_caller_kit(config["server_kit"])
    sites = tuple(config["sites"])
    spec = RunSpec(
        federation="bench_large", run_id=config["run_id"], app_name=APP_NAME, sites=sites,
        num_rounds=config["rounds"], min_clients=len(sites), train_timeout=config["train_timeout"],
    )
    transfers: list[Transfer] = []
    memory = PeakMemory()
    rounds = []
    store = SnapshotStore(config["snapshot_uri"])
    with ScatterGatherRun(spec, kit, store, initial_model=config["initial_model"],
                      client_factory=timed_client_factory(kit, transfers)) as run:
        baseline = PeakMemory._status("VmRSS")
        with memory.phase("restore"):
            progress = run.restore()
        while progress.round < spec.num_rounds:
            times = {}
            first_transfer = len(transfers)
            started = time.perf_counter()
            with memory.phase("scatter"):
                flight = run.scatter(progress)
            times["scatter"] = time.perf_counter() - started
            with memory.phase("gather"):
                infos = run.gather(flight)
            times["gather"] = time.perf_counter() - started - times["scatter"]
            with memory.phase("finish"):
                progress = run.finish_round(progress, flight, infos)
            times["total"] = time.perf_counter() - started
            times["finish"] = times["total"] - times["scatter"] - times["gather"]
            if sorted(progress.history[-1].accepted) != sorted(sites):
                raise RuntimeError(f"round {flight.round}: not every update was accepted: {progress.history[-1]}")
            for method in ("submit", "fetch"):
                # The sites' transfers overlap: a round's window runs from the first start to the last end.
                done = [t for t in transfers[first_transfer:] if t.method == method and t.bytes]
                times[f"{method}_bytes"] = sum(t.bytes for t in done)
                times[f"{method}_seconds"] = max(t.ended for t in done) - min(t.started for t in done)
            rounds.append(times)
        expected = np.float32(0.5 + spec.num_rounds)
        if not all(np.all(v == expected) for v in progress.weights.values()):
            raise RuntimeError(f"after {spec.num_rounds} rounds of plus one the weights are not {expected}")
    memory.close()
    result = {
        "rounds": rounds,
        "peak_hwm": memory.hwm,
        "peak_anon": memory.anon,
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "baseline": baseline,
    }
    Path(config["result"]).write_text(json.dumps(result))


# ---- the benchmark (parent process) -------------------------------------------------------


def fitting_size(wanted: int, num_sites: int) -> tuple[int, str]:
    """The largest model up to ``wanted`` bytes (halving) that this machine's free memory holds, and why."""
    available = meminfo("MemAvailable")
    models = ENGINE_MODELS + WORKER_MODELS * num_sites
    nbytes = wanted
    while nbytes > 16 * MIB and nbytes * models > available:
        nbytes //= 2
    if nbytes == wanted:
        return nbytes, ""
    return nbytes, (
        f"{size(wanted)} did not fit: {available / GIB:.1f} GiB of memory were available and a round with "
        f"{num_sites} sites needs about {models}x the model here (the engine {ENGINE_MODELS}x, each site's worker "
        f"{WORKER_MODELS}x)"
    )


def run(work: Path, wanted_bytes: int, num_sites: int, rounds: int, command: str) -> Section:
    nbytes, reason = fitting_size(wanted_bytes, num_sites)
    section = Section(
        "2. Large model round",
        command,
        intro=(
            f"A float32 model of {size(nbytes)} ({len(model_layout(nbytes))} tensors of up to {size(TENSOR_BYTES)}), "
            f"{num_sites} sites on loopback running the plus-one trainer, FedAvg, a snapshot on local disk every "
            f"round; {rounds} rounds, medians over them. The engine runs in its own process; its memory is measured "
            "there. The limits are measured in the same run, after the rounds."
        ),
    )
    if reason:
        section.notes.append(f"**Model size reduced:** {reason}.")
    with local_federation(work / "federation", "bench_large", num_sites) as fed:
        fed.deploy_app(APP)
        initial = work / "initial.safetensors"
        write_model(initial, nbytes)
        config = {
            "server_kit": str(fed.server_kit), "sites": list(fed.sites), "rounds": rounds,
            "run_id": f"run-{uuid.uuid4().hex[:8]}", "initial_model": str(initial),
            "snapshot_uri": (work / "snapshots").as_uri(), "result": str(work / "engine-result.json"),
            "train_timeout": 600.0 + 300.0 * nbytes / GIB,
        }
        config_path = work / "engine-config.json"
        config_path.write_text(json.dumps(config))
        timeout = rounds * config["train_timeout"] + 300
        with MemoryWatch() as machine_memory, open(work / "engine.log", "wb") as log:
            try:
                subprocess.run(
                    [sys.executable, "-m", "bench.large_model", "--engine", str(config_path)],
                    cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True, timeout=timeout,
                    env={**os.environ, "GRPC_VERBOSITY": "ERROR"},
                )
            except subprocess.CalledProcessError:
                tail = (work / "engine.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the engine process failed:\n{tail}") from None
        result = json.loads(Path(config["result"]).read_text())
        initial.unlink()
        # The limits, with the rounds' memory given back; half a GiB shows a steady rate.
        probe = min(nbytes, LIMIT_PROBE_BYTES)
        tls_stream = limits.grpc_mtls_stream(fed, fed.sites[0], probe)
        alone_up, alone_down = single_transfers(fed, work / "probe.safetensors", probe)
    tcp = limits.tcp_loopback(2 * probe)
    aes = limits.aes_gcm(probe)
    sha = limits.sha256(probe)
    disk = limits.disk_write(work, probe)

    per_round = result["rounds"]
    up = median(r["submit_bytes"] / r["submit_seconds"] for r in per_round)
    down = median(r["fetch_bytes"] / r["fetch_seconds"] for r in per_round)
    wire = median((r["submit_bytes"] + r["fetch_bytes"]) / (r["submit_seconds"] + r["fetch_seconds"]) for r in per_round)
    peak = max(result["peak_hwm"].values())
    table = section.table(
        "One round",
        ["model", "sites", "seconds per round", "scatter / gather / finish (s)", "upload GB/s", "download GB/s",
         "wire GB/s", "limit: gRPC mTLS stream GB/s", "wire / limit", "engine peak RSS", "target"],
    )
    table.add(
        size(nbytes), num_sites, f"{median(r['total'] for r in per_round):.1f}",
        " / ".join(f"{median(r[p] for r in per_round):.1f}" for p in ("scatter", "gather", "finish")),
        gbps(up), gbps(down), gbps(wire), gbps(tls_stream),
        ratio(wire, tls_stream), f"{peak / GIB:.2f} GiB = {peak / nbytes:.2f}x model",
        f"< {TARGET_MULTIPLE:g}x: {'met' if peak / nbytes < TARGET_MULTIPLE else 'missed'}",
    )
    table.notes.append(
        "*Upload*: the global model to every site (all sites at once), from the first upload's start to the last "
        "one's end; *download*: the sites' results likewise; *wire* = all bytes moved / the time of both. Each "
        "transfer reads a file, hashes it, frames it in 1 MiB gRPC messages over TLS, and the receiver hashes, "
        "writes and fsyncs it; the sites' transfers run at once and share the machine's cores, the limit is one "
        "bare stream. *Engine peak RSS*: the kernel's high-water mark of the engine process's resident "
        f"memory (`VmHWM`; `ru_maxrss` says {result['ru_maxrss'] / GIB:.2f} GiB). Machine memory in use rose by "
        f"{(machine_memory.peak - machine_memory.start) / GIB:.1f} GiB at most during the rounds "
        "(engine, agents, workers)."
    )
    section.headline(f"large model round ({size(nbytes)}, {num_sites} sites): wire throughput", f"{gbps(wire)} GB/s",
                     f"{gbps(tls_stream)} GB/s (gRPC mTLS stream)", ratio(wire, tls_stream))
    section.headline(f"large model round ({size(nbytes)}, {num_sites} sites): engine peak memory",
                     f"{peak / nbytes:.2f}x model", f"target < {TARGET_MULTIPLE:g}x", ratio(peak / nbytes, TARGET_MULTIPLE))
    phases = section.table(
        "Engine memory by phase of a round (peak over rounds)",
        ["phase", "peak RSS (VmHWM)", "x model", "peak anonymous RSS (sampled)", "x model"],
    )
    for phase in PHASES:
        hwm, anon = result["peak_hwm"][phase], result["peak_anon"][phase]
        phases.add(phase, f"{hwm / GIB:.2f} GiB", f"{hwm / nbytes:.2f}", f"{anon / GIB:.2f} GiB", f"{anon / nbytes:.2f}")
    phases.notes.append(
        "*restore* loads the initial model; *scatter* writes the global model to a file and uploads it; *gather* "
        "downloads, checks and folds in each result; *finish* averages, commits the snapshot and acknowledges. "
        "Resident memory also counts file-backed pages (the libraries' code; safetensors files are read with plain "
        "reads, never memory-mapped); the anonymous part is the process's own arrays and buffers. Included in every "
        "figure: the engine process's footprint before it "
        f"loaded the model ({result['baseline'] / MIB:.0f} MiB: the interpreter and its libraries)."
    )
    section.notes.append(
        "**What the engine's memory is made of.** FedAvg's float64 sums are twice the model "
        "(`WeightedMeanAggregator._start_round`; they grow as results are folded in). The global model is not held "
        "during the round: *scatter* writes it to a file tensor by tensor (`flare_provider.wire.tensors.save_file`) "
        "and the round reads it back from there when needed (`ScatterGatherRun._spool`, a `TensorFile`; FedAvg needs it "
        "only at *finish*, and only if a site sent a difference). *Finish* turns the sums into the new model one "
        "tensor at a time, freeing each sum as it goes, so sums and new model overlap by one tensor. Files are read "
        "with plain reads into arrays (`TensorFile`), not memory maps, so no file's pages stay resident; *restore* "
        "holds the model it loads (1x). The rest is the interpreter and its libraries (the footprint above) and "
        "the transfers' buffers."
    )
    limit_table = section.table("Limits on this machine (same run)", ["what", "GB/s", "how"])
    limit_table.add("gRPC stream over mutual TLS, loopback", gbps(tls_stream),
                    f"raw 1 MiB messages, one stream, {size(probe)}, receiver in another process, median of 3")
    limit_table.add("TCP, loopback", gbps(tcp), f"one connection, {size(2 * probe)}, median of 3")
    limit_table.add("AES-128-GCM encryption", gbps(aes), f"`cryptography` AESGCM, 1 MiB pieces, {size(probe)}, one core")
    limit_table.add("SHA-256", gbps(sha), f"`hashlib`, 1 MiB pieces, {size(probe)}, one core")
    limit_table.add("disk: write + fsync", gbps(disk), f"{size(probe)} in 1 MiB writes, median of 3")
    limit_table.add("for comparison: one upload alone (SubmitTask), nothing else running", gbps(alone_up),
                    f"{size(probe)} to one site, the payload path of a round, median of 3")
    limit_table.add("for comparison: one download alone (FetchResult), nothing else running", gbps(alone_down),
                    f"{size(probe)} from one site, median of 3")
    section.notes.append(
        "**Why the wire runs below the limit.** One transfer alone shows what the payload path costs over a bare "
        "stream (last rows of the limits): each 1 MiB chunk is read from its file, hashed, copied into a "
        "`DataChunk` message, serialized, and on the other side parsed, copied out of the message, hashed and "
        "written (`flare_provider/wire/chunks.py`), and the file is fsynced at the end. The checksum is the "
        "dearest step per byte: SHA-256 runs at a fraction of AES-GCM's speed on one core (limits above), and "
        "every byte is hashed twice, once by each end; with 2 cores, sender and receiver also compete for "
        "them. In a round the sites' transfers share the cores with each other, the agents and the workers, "
        "and the engine hashes the global model once per site. Larger chunks (4 MiB) measured no faster."
    )
    return section


def single_transfers(fed, path: Path, nbytes: int, repeats: int = 3) -> tuple[float, float]:
    """Bytes/s of one weights upload and one result download, each alone, with the first site."""
    from flare_provider.client import load_caller_kit

    write_model(path, nbytes)
    up, down = [], []
    try:
        with load_caller_kit(fed.server_kit).client(fed.sites[0]) as client:
            for _ in range(repeats):
                task_id = f"probe-{uuid.uuid4().hex[:8]}"
                started = time.perf_counter()
                info, _ = client.submit_task(task_id, APP_NAME, path, 1)
                up.append(path.stat().st_size / (time.perf_counter() - started))
                deadline = time.time() + 600
                while not info.terminal and time.time() < deadline:
                    for info in client.watch_task(task_id, timeout=min(30.0, deadline - time.time()), after_seq=info.seq):
                        pass
                if info.status != "succeeded":
                    raise RuntimeError(f"probe task ended {info.status}: {info.error or 'timed out'}")
                result = path.with_suffix(".result")
                started = time.perf_counter()
                client.fetch_result(task_id, result)
                down.append(result.stat().st_size / (time.perf_counter() - started))
                result.unlink()
                client.acknowledge(task_id)
    finally:
        path.unlink(missing_ok=True)
    return median(up), median(down)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.large_model")
    parser.add_argument("--engine", type=Path, required=True, help="run the engine's rounds as configured in this file")
    engine_main(parser.parse_args(argv).engine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
