"""1. Round overhead: what a round costs besides training.

The model is four floats and the trainer adds one to them (``bench/apps/plus_one``), so
a round is almost all overhead: scatter, a worker process per site, gather, FedAvg and a
committed snapshot. The time each site spends inside ``train()`` (which the trainer
reports) is subtracted; the worker's start-up is shown on its own.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flare_provider.client import load_caller_kit
from flare_provider.federation.records import RunSpec
from flare_provider.federation.scatter_gather import ScatterGatherRun
from flare_provider.snapshots import SnapshotStore
from flare_provider.wire.tensors import save_file

from . import limits
from .common import APPS, Section, local_federation, median, ms, ratio

APP = APPS / "plus_one"
APP_NAME = "bench_plus_one"
FEDERATION = "bench_overhead"
TRAIN_TIMEOUT = 120.0


@dataclass
class RoundTimes:
    """One round, in seconds."""

    total: float
    scatter: float
    gather: float
    finish: float  # aggregate, commit the snapshot, acknowledge
    training: float  # the longest time a site spent in train()
    startup: list[float]  # per site: worker launched -> train() entered
    exit: list[float]  # per site: train() returned -> result recorded by the agent


def run_rounds(fed, sites: tuple[str, ...], rounds: int, store: SnapshotStore, initial: Path) -> list[RoundTimes]:
    """``rounds`` rounds of the plus-one app on ``sites``, each phase timed."""
    kit = load_caller_kit(fed.server_kit)
    spec = RunSpec(
        federation=FEDERATION, run_id=f"run-{uuid.uuid4().hex[:8]}", app_name=APP_NAME, sites=sites,
        num_rounds=rounds, min_clients=len(sites), train_timeout=TRAIN_TIMEOUT,
    )
    times = []
    with ScatterGatherRun(spec, kit, store, initial_model=str(initial)) as run:
        progress = run.restore()
        for _ in range(rounds):
            started = time.perf_counter()
            flight = run.scatter(progress)
            scattered = time.perf_counter()
            infos = run.gather(flight)
            gathered = time.perf_counter()
            progress = run.finish_round(progress, flight, infos)
            finished = time.perf_counter()
            if sorted(progress.history[-1].accepted) != sorted(sites):
                raise RuntimeError(f"round {flight.round}: not every site's update was accepted: {progress.history[-1]}")
            times.append(RoundTimes(
                total=finished - started, scatter=scattered - started, gather=gathered - scattered,
                finish=finished - gathered,
                training=max(i.metrics["t_train_end"] - i.metrics["t_train_start"] for i in infos.values()),
                startup=[i.metrics["t_train_start"] - i.started_at for i in infos.values()],
                exit=[i.finished_at - i.metrics["t_train_end"] for i in infos.values()],
            ))
        if not np.array_equal(progress.weights["w"], np.full(4, rounds, np.float32)):
            raise RuntimeError(f"after {rounds} rounds of plus one the model is {progress.weights['w']}")
    return times


def run(
    work: Path, s3, site_counts: list[int], rounds: int, stores: list[str], command: str, startup_runs: int = 10
) -> Section:
    section = Section(
        "1. Round overhead",
        command,
        intro=(
            f"A model of four float32 values, a trainer that adds one (`bench/apps/plus_one`, custom code the sites "
            f"opt in to), FedAvg, {rounds} rounds per row driven by the run engine (`ScatterGatherRun`: scatter, gather, "
            "finish_round, as `ScatterGatherOperator` does), a snapshot committed every round. Agents are real "
            "`flare-agent` processes on loopback with mutual TLS; every task runs in its own worker process, forked "
            "by the agent's warm launcher (`site_agent/runtime/launcher.py`). "
            f"Figures are medians over the {rounds} rounds (over every site of every round for the per-site columns)."
        ),
    )
    with local_federation(work / "federation", "bench_overhead", max(site_counts)) as fed:
        fed.deploy_app(APP)
        initial = work / "initial.safetensors"
        save_file({"w": np.zeros(4, np.float32)}, initial)
        kit = load_caller_kit(fed.server_kit)
        table = section.table(
            "Milliseconds per round",
            ["sites", "snapshots", "round", "in train()", "overhead", "worker start-up (per site)",
             "worker exit (per site)", "scatter", "gather", "aggregate + commit + ack",
             "limit: status() round trip x sites", "overhead / limit"],
        )
        for count in site_counts:
            sites = fed.sites[:count]
            rtts = limits.status_round_trips(kit, list(sites))
            limit = sum(rtts.values())
            for kind in stores:
                uri = s3.uri("overhead") if kind == "s3" else (work / "snapshots").as_uri()
                store = SnapshotStore(uri, s3_settings=s3.settings if kind == "s3" else None)
                times = run_rounds(fed, sites, rounds, store, initial)
                overhead = median(t.total - t.training for t in times)
                table.add(
                    count, "moto S3 server" if kind == "s3" else "local disk",
                    ms(median(t.total for t in times)), ms(median(t.training for t in times)), ms(overhead),
                    ms(median(s for t in times for s in t.startup)), ms(median(s for t in times for s in t.exit)),
                    ms(median(t.scatter for t in times)), ms(median(t.gather for t in times)),
                    ms(median(t.finish for t in times)),
                    f"{ms(limit)} ({count} x {ms(median(rtts.values()))})", ratio(overhead, limit),
                )
                section.headline(
                    f"round overhead, {count} sites, snapshots on {'S3' if kind == 's3' else 'local disk'}",
                    f"{ms(overhead)} ms", f"{ms(limit)} ms (one status() round trip per site)", ratio(overhead, limit),
                )
        table.notes.append(
            "*overhead* = round - the longest time a site spent inside `train()`. *Worker start-up*: from the agent "
            "starting the task's process to `train()` being entered (the fork, loading the app, the trainer and "
            "the weights). *Worker exit*: from `train()` returning to the agent recording the result "
            "(checking the result, writing it and its record, the record fsynced, process exit). Scatter, gather "
            "and aggregate + commit + ack add up to the round. The limit is one `GetStatus` round trip to each "
            "site, one after the other, measured on the same agents in the same run."
        )
        startup = section.table("A task's process start-up, piece by piece", ["how a worker process starts", "ms"])
        for label, seconds in limits.process_startup(startup_runs).items():
            startup.add(f"a new interpreter: {label}", ms(seconds))
        startup.add(
            "a fork of the warm launcher, which has imported all of the above (what a task pays)",
            ms(limits.fork_of_warm_worker(2 * startup_runs)),
        )
        startup.notes.append(
            f"Median of {startup_runs} fresh processes of each kind, taking turns ({2 * startup_runs} forks), with "
            "the worker's environment. A new interpreter per task is what the agent would pay without its "
            "launcher, every round; the launcher pays it once."
        )
    section.notes.append(
        "**Why the overhead is what it is.** Each site's task crosses the wire three times (`SubmitTask` with the "
        "global model, `WatchTask` until it ends, `FetchResult`) and once more to be acknowledged, and the agent "
        "records each step durably (the task's state file written and fsynced on submit, start, finish and "
        "acknowledgement) so that a restarted agent loses no result. The task runs in its own process, forked "
        "from the agent's warm launcher (`site_agent/runtime/launcher.py`) in a few milliseconds (last row of the table "
        "above) instead of a new interpreter importing the worker and PyTorch every round; the worker loads the "
        "app and the weights, and writes its result (hashed as it is written) and an fsynced record of it. "
        "Snapshots to S3 add their requests (commit "
        "check, model, state, commit marker) to every round. With 8 sites, 8 agents and their workers share 2 "
        "cores with the engine, so the per-site steps queue for the CPU."
    )
    return section
