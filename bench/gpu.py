"""5. Training throughput: a site's training task run by the agent against the same loop run bare.

The app is the built-in PyTorch trainer (``ClassifierTrainer``, an MLP on synthetic data
in the site's data folder). The agent runs it as a task in its worker process; the bare
run calls the same trainer's ``train()`` in a fresh Python process with no agent. Both
report each epoch's end, so the steady-state throughput (samples/s between the first and
the last epoch's end) leaves out start-up, which is shown separately (end to end).

``python -m bench gpu --gpu`` measures on CUDA (a site with ``gpus: [0]``);
without ``--gpu`` the same comparison runs on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from flare_provider.client import load_caller_kit
from flare_provider.wire.tensors import save_file

from .common import REPO, Section, local_federation, median, ratio

TARGET_RATIO = 0.95
APP_NAME = "bench_mlp"
TASK_TIMEOUT = 1800.0


@dataclass(frozen=True)
class Workload:
    samples: int
    features: int
    hidden: int
    epochs: int
    batch_size: int
    classes: int = 10

    def describe(self) -> str:
        return (f"MLP {self.features}-{self.hidden}-{self.hidden}-{self.classes}, {self.samples} samples, "
                f"batch {self.batch_size}, {self.epochs} epochs, SGD")

    def trainer_args(self) -> dict:
        return {
            "model": [
                {"layer": "Linear", "in_features": self.features, "out_features": self.hidden}, "ReLU",
                {"layer": "Linear", "in_features": self.hidden, "out_features": self.hidden}, "ReLU",
                {"layer": "Linear", "in_features": self.hidden, "out_features": self.classes},
            ],
            "data": {"train": "train.npz", "test": ""},
            "epochs": self.epochs, "batch_size": self.batch_size, "lr": 0.01, "seed": 0,
        }


GPU_WORKLOAD = Workload(samples=131072, features=512, hidden=4096, epochs=6, batch_size=512)
CPU_WORKLOAD = Workload(samples=32768, features=128, hidden=384, epochs=6, batch_size=128)


def write_app(folder: Path, workload: Workload) -> Path:
    folder.mkdir(parents=True)
    doc = {"name": APP_NAME, "description": "benchmark MLP on synthetic data",
           "trainer": {"path": "site_agent.trainers.pytorch.ClassifierTrainer", "args": workload.trainer_args()}}
    (folder / "app.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return folder


def write_data(data_dir: Path, workload: Workload) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((workload.samples, workload.features), dtype=np.float32)
    y = rng.integers(0, workload.classes, workload.samples)
    np.savez(data_dir / "train.npz", x=x, y=y)


@dataclass
class Throughput:
    steady: float  # samples/s between the first and the last epoch's end
    end_to_end: float  # samples/s over the whole task or process


def steady_rate(reports: dict[float, float], workload: Workload) -> float:
    """Samples/s between the first and the last progress report (progress -> when it was first seen)."""
    if len(reports) < 2:
        raise RuntimeError(f"need at least two epochs' progress reports to measure a steady rate, saw {len(reports)}")
    first, last = min(reports), max(reports)
    return workload.samples * workload.epochs * (last - first) / (reports[last] - reports[first])


def agent_run(fed, site: str, workload: Workload, empty_weights: Path) -> Throughput:
    """One training task through the agent; epoch ends as the server sees them (progress events)."""
    kit = load_caller_kit(fed.server_kit)
    task_id = f"bench-{uuid.uuid4().hex[:8]}"
    reports: dict[float, float] = {}
    with kit.client(site) as client:
        info, _ = client.submit_task(task_id, APP_NAME, empty_weights, 1)
        deadline = time.time() + TASK_TIMEOUT
        while not info.terminal and time.time() < deadline:
            for info in client.watch_task(task_id, timeout=min(30.0, deadline - time.time()), after_seq=info.seq):
                if info.status == "running" and info.progress > 0:
                    reports.setdefault(info.progress, time.time())
        if info.status != "succeeded":
            raise RuntimeError(f"the training task ended {info.status}: {info.error or 'timed out'}")
        client.acknowledge(task_id)
    return Throughput(steady_rate(reports, workload),
                      workload.samples * workload.epochs / (info.finished_at - info.started_at))


def bare_run(work: Path, data_dir: Path, app_dir: Path, workload: Workload, device: str) -> Throughput:
    """The same trainer in a fresh process with no agent (``python -m bench.gpu --bare``)."""
    config = work / f"bare-{uuid.uuid4().hex[:8]}.json"
    result = config.with_suffix(".result.json")
    config.write_text(json.dumps({"app_dir": str(app_dir), "data_dir": str(data_dir), "work_dir": str(work),
                                  "device": device, "result": str(result)}))
    env = dict(os.environ)
    if device == "cpu":
        # The thread count the agent gives a CPU task (site_agent.runtime.processes: cores /
        # max_concurrent_cpu_tasks, 2 by default), so that both runs train with the same threads.
        threads = str(max(1, (os.cpu_count() or 1) // 2))
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    started = time.time()
    subprocess.run([sys.executable, "-m", "bench.gpu", "--bare", str(config)], cwd=REPO, env=env, check=True,
                   timeout=TASK_TIMEOUT)
    seconds = time.time() - started
    reports = {float(p): t for p, t in json.loads(result.read_text())["reports"]}
    return Throughput(steady_rate(reports, workload), workload.samples * workload.epochs / seconds)


def bare_main(config_path: Path) -> None:
    from flare_provider.wire.app_config import load_app_config
    from site_agent.trainer import TaskContext
    from site_agent.worker.task_runner import load_trainer_class

    config = json.loads(config_path.read_text())
    app_dir = Path(config["app_dir"])
    app = load_app_config(app_dir)
    trainer = load_trainer_class(app.trainer_path, app_dir, allow_custom_code=False)(**app.trainer_args)
    reports: list[tuple[float, float]] = []
    ctx = TaskContext(
        task_id="bare", site="bare", round=1, kind="train", config={}, data_dir=Path(config["data_dir"]),
        work_dir=Path(config["work_dir"]), app_dir=app_dir, device=config["device"],
        _reporter=lambda progress, metrics, step: reports.append((progress, time.time())),
    )
    trainer.train({}, ctx)  # no global weights: the seeded initialisation, as the agent's task
    Path(config["result"]).write_text(json.dumps({"reports": reports}))


def measure(work: Path, device: str, workload: Workload, repeats: int) -> tuple[Throughput, Throughput]:
    """Median agent and bare throughput on ``device`` ("cuda" or "cpu"), runs alternating."""
    with local_federation(work / "federation", "bench_train", 1, gpus=(0,) if device == "cuda" else ()) as fed:
        site = fed.sites[0]
        app_dir = write_app(work / "app", workload)
        fed.deploy_app(app_dir)
        write_data(fed.data_dir(site), workload)
        empty = work / "empty.safetensors"
        save_file({}, empty)  # no global weights: the trainer starts from its seeded initialisation
        agent, bare = [], []
        for _ in range(repeats):
            agent.append(agent_run(fed, site, workload, empty))
            bare.append(bare_run(work, fed.data_dir(site), app_dir, workload, "cuda:0" if device == "cuda" else "cpu"))
    return _median(agent), _median(bare)


def _median(runs: list[Throughput]) -> Throughput:
    return Throughput(median(r.steady for r in runs), median(r.end_to_end for r in runs))


def run(work: Path, gpu: bool, repeats: int, cpu_workload: Workload, gpu_workload: Workload, command: str) -> Section:
    section = Section(
        "5. Training throughput (GPU)",
        command,
        intro=(
            "A site's training task run by the agent (built-in `ClassifierTrainer`, worker process, progress "
            "streamed to the server) against the same trainer's `train()` in a fresh Python process with no agent. "
            f"Target: agent / bare >= {TARGET_RATIO} in steady state. Median of {repeats} runs each, alternating."
        ),
    )
    table = section.table(
        "Samples per second",
        ["device", "workload", "agent, steady", "bare, steady", "agent / bare (target >= 0.95)",
         "agent, end to end", "bare, end to end", "agent / bare"],
    )
    if gpu:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("--gpu was given but PyTorch sees no CUDA device on this machine")
        agent, bare = measure(work / "cuda", "cuda", gpu_workload, repeats)
        _add(section, table, f"GPU ({torch.cuda.get_device_name(0)})", gpu_workload, agent, bare)
    else:
        table.add("GPU", "-", "not measured: no GPU in this run", "", "", "", "", "")
        section.headline("training on a GPU: agent / bare samples/s", "not measured: no GPU in this run",
                         f"target >= {TARGET_RATIO}", "")
    agent, bare = measure(work / "cpu", "cpu", cpu_workload, repeats)
    _add(section, table, f"CPU ({os.cpu_count()} cores)", cpu_workload, agent, bare)
    table.notes.append(
        "*Steady*: samples/s between the first and the last epoch's end (the agent's as the server sees its "
        "progress events, the bare run's inside the process). *End to end*: all epochs' samples over the whole "
        "task (the agent's started_at to finished_at: the fork from its launcher, which has imported PyTorch "
        "already, CUDA set-up, weights in and out) or the whole bare process, which imports PyTorch itself: the "
        "agent is ahead end to end by that import. On the CPU the agent gives a task `cores / max_concurrent_cpu_tasks` threads "
        "(site.yaml; 2 tasks at once by default), and the bare run gets the same."
    )
    return section


def _add(section: Section, table, device: str, workload: Workload, agent: Throughput, bare: Throughput) -> None:
    section.headline(f"training on {device}: agent / bare samples/s (steady)", f"{agent.steady:,.0f} samples/s",
                     f"{bare.steady:,.0f} samples/s bare, target >= {TARGET_RATIO}", ratio(agent.steady, bare.steady))
    table.add(device, workload.describe(), f"{agent.steady:,.0f}", f"{bare.steady:,.0f}",
              ratio(agent.steady, bare.steady), f"{agent.end_to_end:,.0f}", f"{bare.end_to_end:,.0f}",
              ratio(agent.end_to_end, bare.end_to_end))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu")
    parser.add_argument("--bare", type=Path, required=True, help="run the trainer bare as configured in this file")
    bare_main(parser.parse_args(argv).bare)
    return 0


if __name__ == "__main__":
    sys.exit(main())
