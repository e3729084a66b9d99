"""2. Large model round: models of 256 MiB (2 sites) and 1 GiB (4 sites) of float32 weights.

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
TARGET_MULTIPLE = 2.5  # engine peak memory, in models, for any number of sites
# Round time over the time its bytes take over one bare mutual-TLS stream, per (model, sites).
ROUND_TARGET = {(256 * MIB, 2): 1.5, (GIB, 4): 2.0}
ROUND_TARGET_DEFAULT = 2.0
ALONE_TARGET = 0.8  # one upload or download alone over the bare stream
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


def measure(work: Path, wanted_bytes: int, num_sites: int, rounds: int, *, alone: bool) -> dict:
    """One model size and federation: the engine's rounds, then the bare mutual-TLS stream
    of the same federation (and, with ``alone``, one upload and one download each alone)."""
    nbytes, reason = fitting_size(wanted_bytes, num_sites)
    work.mkdir(parents=True, exist_ok=True)
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
        result["tls_stream"] = limits.grpc_mtls_stream(fed, fed.sites[0], probe)
        if alone:
            result["alone"] = single_transfers(fed, work / "probe.safetensors", probe)
    result.update(nbytes=nbytes, sites=num_sites, reason=reason, probe=probe,
                  machine_rise=machine_memory.peak - machine_memory.start)
    return result


def run(work: Path, configs: list[tuple[int, int]], rounds: int, command: str) -> Section:
    """``configs``: (model bytes wanted, sites) of each row."""
    measured = [measure(work / f"config-{i}", wanted, sites, rounds, alone=i == len(configs) - 1)
                for i, (wanted, sites) in enumerate(configs)]
    shown = ", ".join(f"{size(m['nbytes'])} x {m['sites']} sites" for m in measured)
    section = Section(
        "2. Large model round",
        command,
        intro=(
            f"Float32 models ({shown}; tensors of up to {size(TENSOR_BYTES)}) on sites on loopback running the "
            f"plus-one trainer, FedAvg, a snapshot on local disk every round; {rounds} rounds per row, medians over "
            "them. The engine runs in its own process; its memory is measured there. Each row's limit is one bare "
            "gRPC mutual-TLS stream measured on the same federation right after its rounds."
        ),
    )
    for m in measured:
        if m["reason"]:
            section.notes.append(f"**Model size reduced:** {m['reason']}.")
    table = section.table(
        "One round",
        ["model", "sites", "seconds per round", "bytes moved", "the same bytes over one bare mTLS stream (s)",
         "round / bare stream", "target", "upload GB/s", "download GB/s", "limit: gRPC mTLS stream GB/s",
         "engine peak RSS", "memory target"],
    )
    split = section.table("Where a round's time goes (seconds, median over rounds)",
                          ["model", "sites", "scatter (upload to all sites)", "gather (train, download, check, fold)",
                           "finish (average, commit, acknowledge)", "of which moving bytes: upload", "download"])
    phases = section.table(
        "Engine memory by phase of a round (peak over rounds)",
        ["model", "sites", "phase", "peak RSS (VmHWM)", "x model", "peak anonymous RSS (sampled)", "x model"],
    )
    for m in measured:
        nbytes, per_round, label = m["nbytes"], m["rounds"], size(m["nbytes"])
        moved = median(r["submit_bytes"] + r["fetch_bytes"] for r in per_round)
        bare = moved / m["tls_stream"]
        seconds = median(r["total"] for r in per_round)
        target = ROUND_TARGET.get((nbytes, m["sites"]), ROUND_TARGET_DEFAULT)
        peak = max(m["peak_hwm"].values())
        table.add(
            label, m["sites"], f"{seconds:.1f}", f"{moved / GIB:.2f} GiB", f"{bare:.2f}", ratio(seconds, bare),
            f"<= {target:g}x: {'met' if seconds / bare <= target else 'missed'}",
            gbps(median(r["submit_bytes"] / r["submit_seconds"] for r in per_round)),
            gbps(median(r["fetch_bytes"] / r["fetch_seconds"] for r in per_round)), gbps(m["tls_stream"]),
            f"{peak / GIB:.2f} GiB = {peak / nbytes:.2f}x model",
            f"<= {TARGET_MULTIPLE:g}x: {'met' if peak / nbytes <= TARGET_MULTIPLE else 'missed'}",
        )
        split.add(label, m["sites"], *(f"{median(r[p] for r in per_round):.2f}" for p in
                                        ("scatter", "gather", "finish", "submit_seconds", "fetch_seconds")))
        section.headline(f"large model round ({label}, {m['sites']} sites): round / its bytes over a bare mTLS stream",
                         f"{seconds:.1f} s", f"{bare:.1f} s (target {target:g}x)", ratio(seconds, bare))
        section.headline(f"large model round ({label}, {m['sites']} sites): engine peak memory",
                         f"{peak / nbytes:.2f}x model", f"target <= {TARGET_MULTIPLE:g}x", ratio(peak / nbytes, TARGET_MULTIPLE))
        for phase in PHASES:
            hwm, anon = m["peak_hwm"][phase], m["peak_anon"][phase]
            phases.add(label, m["sites"], phase, f"{hwm / GIB:.2f} GiB", f"{hwm / nbytes:.2f}", f"{anon / GIB:.2f} GiB",
                       f"{anon / nbytes:.2f}")
    table.notes.append(
        "*Bytes moved*: the global model to every site and every site's result back. *The same bytes over one bare "
        "mTLS stream*: those bytes at the rate of one raw gRPC stream of 1 MiB messages over mutual TLS on the same "
        "machine (the round moves them over one stream per site, at once, and also trains, checks, averages and "
        "commits). *Upload* / *download* GB/s: all sites' transfers of a round, from the first start to the last end. "
        "*Engine peak RSS*: the kernel's high-water mark of the engine process's resident memory (`VmHWM`)."
    )
    phases.notes.append(
        "*restore* loads the initial model; *scatter* writes the global model to a file (hashed on the way) and "
        "uploads it to every site; *gather* downloads and checks each result, which then waits on disk (handed to "
        "FedAvg, not copied); *finish* sums the results in one pass on every core into the new model, commits the "
        "snapshot and acknowledges. Resident memory also counts file-backed pages (the libraries' code); files are "
        "read with plain reads, never memory-mapped. Included in every figure: the engine process's footprint "
        f"before it loaded the model ({measured[-1]['baseline'] / MIB:.0f} MiB: the interpreter and its libraries)."
    )
    last = measured[-1]
    probe, (alone_up, alone_down) = last["probe"], last["alone"]
    transfers = section.table("One transfer alone against the bare stream (same federation, same run)",
                              ["transfer", "GB/s", "limit: gRPC mTLS stream GB/s", "ratio", "target"])
    for what, rate in (("one upload (SubmitTask)", alone_up), ("one download (FetchResult)", alone_down)):
        transfers.add(what, gbps(rate), gbps(last["tls_stream"]), ratio(rate, last["tls_stream"]),
                      f">= {ALONE_TARGET:g}x: {'met' if rate / last['tls_stream'] >= ALONE_TARGET else 'missed'}")
        section.headline(f"{what} alone, {size(probe)}", f"{gbps(rate)} GB/s",
                         f"{gbps(last['tls_stream'])} GB/s (bare gRPC mTLS stream)", ratio(rate, last["tls_stream"]))
    transfers.notes.append(
        f"{size(probe)} to or from the first site of the last row's federation, nothing else running, median of 3. "
        "The payload path: the file read in 1 MiB chunks, each framed by hand as a `DataChunk` message (one copy) "
        "over TLS; the receiver takes a view of the data in the delivered message (no copy), writes and hashes it "
        "(XXH3-128) on a second thread while the next one arrives, has the kernel write each 8 MiB to disk as it "
        "comes and fsyncs the file once; a sender that knows the digest (the engine, which hashes the global "
        "model once for all sites, as it writes it) does not hash again."
    )
    tcp, aes, sha, xxh, disk = (limits.tcp_loopback(2 * probe), limits.aes_gcm(probe), limits.sha256(probe),
                                limits.xxh3(probe), limits.disk_write(work, probe))
    limit_table = section.table("Limits on this machine (same run)", ["what", "GB/s", "how"])
    limit_table.add("gRPC stream over mutual TLS, loopback", gbps(last["tls_stream"]),
                    f"raw 1 MiB messages, one stream, {size(probe)}, receiver in another process, median of 3")
    limit_table.add("TCP, loopback", gbps(tcp), f"one connection, {size(2 * probe)}, median of 3")
    limit_table.add("AES-128-GCM encryption", gbps(aes), f"`cryptography` AESGCM, 1 MiB pieces, {size(probe)}, one core")
    limit_table.add("XXH3-128 (weights and results in transit)", gbps(xxh), f"`xxhash`, 1 MiB pieces, {size(probe)}, one core")
    limit_table.add("SHA-256 (bundles, snapshots, older peers)", gbps(sha), f"`hashlib`, 1 MiB pieces, {size(probe)}, one core")
    limit_table.add("disk: write + fsync", gbps(disk), f"{size(probe)} in 1 MiB writes, median of 3")
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
