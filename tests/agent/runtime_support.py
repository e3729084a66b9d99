"""Helpers shared by the runtime tests: real provisioned kits, signed bundles, a probe app."""

from __future__ import annotations

import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flare_provider.provisioning import load_project, provision
from flare_provider.provisioning.certs import Identity
from flare_provider.wire.bundles import build_bundle
from flare_provider.wire.task_state import TERMINAL_STATUSES, TaskState
from site_agent.runtime.app_store import AppStore
from site_agent.runtime.task_manager import TaskManager
from site_agent.runtime.task_records import TaskSpec
from site_agent.site_settings import SiteSettings
from site_agent.worker.weights import save_weights

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_APPS = REPO / "examples" / "apps"
SERVER = "airflow-server"
SITE = "hospital-a"
OTHER_SITE = "hospital-b"


@dataclass
class Federation:
    """One provisioned project: its kits and the identities that matter to the tests."""

    kits: dict[str, Path]
    root_ca_pem: bytes
    server: Identity
    site: Identity



def kit_identity(kit: Path, name: str) -> Identity:
    startup = kit / "startup"
    return Identity.from_pem((startup / f"{name}.crt").read_bytes(), (startup / f"{name}.key").read_bytes())


def provision_federation(workspace: Path) -> Federation:
    kits = provision(load_project(REPO / "examples" / "project.yml"), workspace).kits
    return Federation(
        kits=kits,
        root_ca_pem=(kits[SITE] / "startup" / "rootCA.pem").read_bytes(),
        server=kit_identity(kits[SERVER], SERVER),
        site=kit_identity(kits[SITE], SITE),
    )


def bundle_file(fed: Federation, app_dir: Path, dest: Path) -> Path:
    """Build ``app_dir`` into a bundle signed by the federation's server identity."""
    dest.write_bytes(build_bundle(app_dir, fed.server.cert_pem, fed.server.key_pem))
    return dest


def new_store(fed: Federation, root: Path, **kwargs) -> AppStore:
    return AppStore(root, fed.root_ca_pem, SERVER, **kwargs)


PROBE_TRAINER = '''
"""A test trainer whose behaviour the round config chooses; it logs each call to events.jsonl."""
import gc, json, os, signal, subprocess, sys, time
import numpy as np
from site_agent.trainer import EvalResult, Trainer, TrainResult


def _event(ctx, what, **extra):
    record = {"event": what, "task_id": ctx.task_id, "pid": os.getpid(), "time": time.time(),
              "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "device": ctx.device,
              "ppid": os.getppid(), "torch_threads": sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None,
              "gc_frozen": gc.get_freeze_count(), **extra}
    with open(ctx.data_dir / "events.jsonl", "a") as f:
        f.write(json.dumps(record) + "\\n")


class Probe(Trainer):
    def __init__(self, step=1.0):
        self.step = step

    def train(self, weights, ctx):
        config = ctx.config
        _event(ctx, "start")
        if config.get("grandchild"):
            child = subprocess.Popen(["sleep", "600"])
            _event(ctx, "grandchild", child_pid=child.pid)
        steps = int(config.get("steps", 2))
        for i in range(steps):
            time.sleep(float(config.get("sleep", 0.0)) / steps)
            ctx.report((i + 1) / steps, step=i + 1, done=i + 1)
        if "fail" in config:
            raise RuntimeError(config["fail"])
        if config.get("crash"):  # as a segfault in native code would
            os.kill(os.getpid(), signal.SIGSEGV)
        new = {name: value + self.step for name, value in weights.items()}
        if config.get("nan"):
            name = sorted(new)[0]
            new[name] = new[name].copy()
            new[name].flat[0] = np.nan
        if config.get("drop"):
            new.pop(sorted(new)[0])
        _event(ctx, "end")
        return TrainResult(new, num_samples=7, metrics={"score": 1.5})

    def evaluate(self, weights, ctx):
        return EvalResult({"mean_weight": float(np.mean([v.mean() for v in weights.values()]))}, num_samples=3)
'''


def write_probe_app(folder: Path, name: str = "probe") -> Path:
    """An app with custom code: the probe trainer above."""
    (folder / "custom").mkdir(parents=True, exist_ok=True)
    (folder / "app.yaml").write_text(
        textwrap.dedent(
            f"""\
            name: {name}
            trainer:
              path: probe_trainer.Probe
              args: {{step: 1.0}}
            """
        )
    )
    (folder / "custom" / "probe_trainer.py").write_text(PROBE_TRAINER)
    return folder


def probe_weights(path: Path) -> Path:
    save_weights(path, {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)})
    return path


def site_settings(base: Path, gpus: tuple[int, ...] = (), allow_custom_code: bool = True, **kwargs) -> SiteSettings:
    (base / "data").mkdir(parents=True, exist_ok=True)
    return SiteSettings(
        data_dir=base / "data", work_dir=base / "work", gpus=gpus, allow_custom_code=allow_custom_code, **kwargs
    )


def wait_until(tasks: TaskManager, task_id: str, statuses: tuple[str, ...], timeout: float = 60) -> TaskState:
    """Follow a task's state changes until its status is one of ``statuses`` (bounded)."""
    deadline = time.monotonic() + timeout
    state = tasks.get(task_id)
    while state.status not in statuses:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"task {task_id} still {state.status} after {timeout}s (error: {state.error})")
        state = tasks.wait(task_id, state.seq, remaining)
    return state


def wait_finished(tasks: TaskManager, task_id: str, timeout: float = 60) -> TaskState:
    return wait_until(tasks, task_id, TERMINAL_STATUSES, timeout)


def read_events(data_dir: Path) -> list[dict]:
    import json

    path = data_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def pid_alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_pid_gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return not pid_alive(pid)


def submit(tasks: TaskManager, task_id: str, tmp_path, **spec):
    """Submit a probe task with fresh weights; (state, created)."""
    spec.setdefault("round", 0)
    weights = probe_weights(tmp_path / f"{task_id}.safetensors")
    return tasks.submit(TaskSpec(task_id=task_id, app_name="probe", app_version=None, **spec), weights)
