"""The child process that runs one task: ``python -m site_agent.worker TASK_DIR [--progress-fd N]``.

It loads the app's trainer, reads the global weights, calls ``train`` or ``evaluate``,
checks what comes back and writes the result atomically (``result.safetensors`` first,
then ``result.json``). Progress, metrics and a failure's message go to the agent as
JSON lines on the pipe ``--progress-fd``, never mixed with what user code prints.

The agent starts it in its own process group; if the agent dies, the worker notices
its parent is gone and ends its whole group, so no orphan keeps a GPU busy.

A task given several ranks (``world_size`` in ``worker.json``) is run by :mod:`.ranks`:
this process supervises one child per rank, and each child runs :func:`run_task` as
its rank, having joined the task's PyTorch process group.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

from flare_provider.files import safe_name
from flare_provider.wire.app_config import APP_CONFIG, BUILTIN_TRAINERS, CUSTOM_DIR, custom_modules, load_app_config
from flare_provider.wire.task_state import SHARE_LOCAL_MODEL_KEY
from flare_provider.wire.tensors import RESULT_KIND_KEY, RESULT_PRIVACY_KEY

from ..privacy import PrivacyConfigError
from ..privacy.apply import filter_result, record_metadata
from ..privacy.policy import task_policy
from ..runtime.task_folder import TaskPaths, weights_record, write_json_atomic
from ..trainer import EvalResult, TaskContext, TrainResult
from ..trainers.scaffold import result_layout
from . import ranks
from .describe import describe_info
from .script_app import ScriptError, ScriptTrainer
from .weights import (
    WeightsError,
    check_update,
    finite_metrics,
    load_weights,
    save_weights,
    tensor_layout,
)

_MAX_ERROR_CHARS = 2000
SITE_STATE_DIR = "state"  # beside tasks/ in the agent's work folder


class TaskFailure(Exception):
    """A problem the worker found itself (bad app, bad result), reported as is."""


class ProgressChannel:
    """JSON lines to the agent over an inherited pipe."""

    def __init__(self, fd: int | None):
        self._file = os.fdopen(fd, "w", buffering=1) if fd is not None else None
        self._lock = threading.Lock()

    def send(self, event: str, **fields: Any) -> None:
        if self._file is None:
            return
        line = json.dumps({"event": event, **fields}, allow_nan=True)
        with self._lock:
            try:
                self._file.write(line + "\n")
            except BrokenPipeError:  # the agent is gone; nobody will collect this task
                os._exit(3)


def _pick_device(gpus: list[int]) -> str:
    if not gpus:
        return "cpu"
    try:
        import torch
    except ImportError:
        return "cpu"
    # CUDA_VISIBLE_DEVICES holds the assigned GPUs, so the first of them is cuda:0 here.
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def check_custom_code(app_dir: Path, allow_custom_code: bool) -> list[str]:
    """The app's files under custom/; raises where it has some and the site does not allow custom code."""
    custom = app_dir / CUSTOM_DIR
    custom_files = [p.relative_to(app_dir).as_posix() for p in custom.rglob("*") if p.is_file()] if custom.is_dir() else []
    if custom_files and not allow_custom_code:
        raise TaskFailure("this app brings custom code, which this site does not allow (site.yaml: allow_custom_code)")
    return custom_files


def load_trainer_class(trainer_path: str, app_dir: Path, allow_custom_code: bool) -> type:
    custom = app_dir / CUSTOM_DIR
    custom_files = check_custom_code(app_dir, allow_custom_code)
    module_name, _, attr = trainer_path.rpartition(".")
    if module_name.split(".", 1)[0] in custom_modules(custom_files):
        sys.path.insert(0, str(custom))
    elif not trainer_path.startswith(BUILTIN_TRAINERS):
        raise TaskFailure(f"trainer {trainer_path!r} is neither built in ({BUILTIN_TRAINERS}*) nor in the app's custom code")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr)
    except AttributeError:
        raise TaskFailure(f"trainer {trainer_path!r}: module {module_name!r} has no {attr!r}") from None
    except ModuleNotFoundError as exc:
        raise TaskFailure(f"trainer {trainer_path!r} cannot be imported: {exc}") from None


def run_task(paths: TaskPaths, channel: ProgressChannel, rank: int = 0, world_size: int = 1) -> None:
    """Run the task described in ``paths.worker_input`` (as ``rank`` of ``world_size``); raises on any failure."""
    job = json.loads(paths.worker_input.read_text())
    gpus = job["gpus"][rank : rank + 1] if world_size > 1 and job["gpus"] else job["gpus"]  # a rank has one GPU
    app_dir = Path(job["app_dir"])
    config = load_app_config(app_dir)
    if config.script:  # a script app (always custom code): its adapter is called as a trainer would be
        check_custom_code(app_dir, bool(job["allow_custom_code"]))
        trainer_cls: type = ScriptTrainer
    else:
        trainer_cls = load_trainer_class(config.trainer_path, app_dir, bool(job["allow_custom_code"]))
    try:  # before any training: a malformed privacy request fails the task, costing nothing
        policy, refused = task_policy(job, app_dir / APP_CONFIG)
    except PrivacyConfigError as exc:
        raise TaskFailure(str(exc)) from None
    # A SCAFFOLD result carries the change of the site's control variate where the global
    # file carried the server's: the names the result must have follow from the global ones.
    expected = result_layout(tensor_layout(paths.global_weights))
    weights = load_weights(paths.global_weights, getattr(trainer_cls, "tensor_format", "numpy"))
    paths.scratch.mkdir(exist_ok=True)
    ctx = TaskContext(
        task_id=job["task_id"],
        site=job["site"],
        round=int(job["round"]),
        kind=job["kind"],
        config=dict(job["config"]),
        data_dir=Path(job["data_dir"]),
        work_dir=paths.scratch,
        app_dir=app_dir,
        device=_pick_device(gpus),
        gpus=tuple(gpus),
        state_dir=_site_state_dir(paths, config.name, job["config"].get("run_key")),
        rank=rank,
        world_size=world_size,
        _reporter=lambda progress, metrics, step: channel.send("progress", progress=progress, metrics=metrics, step=step),
    )
    channel.send("started", device=ctx.device)
    if world_size > 1:
        ranks.join_process_group(ctx.device)
    trainer = ScriptTrainer(app_dir, config, ctx) if config.script else trainer_cls(**config.trainer_args)

    if ctx.kind == "evaluate":
        outcome = trainer.evaluate(weights, ctx)
        if not isinstance(outcome, EvalResult):
            raise TaskFailure(f"evaluate() returned {type(outcome).__name__}, expected EvalResult")
        info = {"kind": "metrics", "num_samples": _count(outcome.num_samples),
                "metrics": finite_metrics(outcome.metrics, "evaluate() metrics")}
    elif ctx.kind == "describe":  # the site's data summarized for a data check; nothing trains
        info = describe_info(trainer, ctx)
    elif ctx.kind == "initialize":
        make_initial = getattr(trainer, "initial_weights", None)
        if make_initial is None:
            raise TaskFailure(f"trainer {config.trainer_path!r} has no initial_weights(); give the run an initial model")
        initial = make_initial()
        if ctx.rank != 0:
            return  # only rank 0's result leaves the site (and is checked)
        check_update({}, initial, is_difference=False)
        # Built by the app's code, not from the site's data: the site's filters do not apply.
        privacy = {"applied": [], "refused": refused, "unfiltered": "initial model"}
        info = {"kind": "weights", "num_samples": 0, "metrics": {}, "privacy": privacy}
        info["weights"] = weights_record(save_weights(
            paths.result_weights, initial,
            {RESULT_KIND_KEY: "weights", "flare.task_id": ctx.task_id, RESULT_PRIVACY_KEY: record_metadata(privacy)},
        ))
    else:
        outcome = trainer.train(weights, ctx)
        if not isinstance(outcome, TrainResult):
            raise TaskFailure(f"train() returned {type(outcome).__name__}, expected TrainResult")
        if ctx.rank != 0:
            return  # only rank 0's result leaves the site (and is checked)
        check_update(expected, outcome.weights, outcome.is_difference)
        kind = "difference" if outcome.is_difference else "weights"
        # The site's privacy filters run here, before the result is written, hashed or fetched.
        update, privacy = filter_result(policy, refused, paths.global_weights, getattr(trainer_cls, "tensor_format", "numpy"),
                                        outcome.weights, outcome.is_difference, ctx.task_id)
        info = {"kind": kind, "num_samples": _count(outcome.num_samples),
                "metrics": finite_metrics(outcome.metrics, "train() metrics"), "privacy": privacy}
        # The site's word on passing this model on to other sites travels with the model itself.
        share = "true" if job.get("share_local_model") is True else "false"
        info["weights"] = weights_record(save_weights(
            paths.result_weights, update,
            {RESULT_KIND_KEY: kind, "flare.task_id": ctx.task_id, RESULT_PRIVACY_KEY: record_metadata(privacy),
             SHARE_LOCAL_MODEL_KEY: share},
        ))
    if ctx.rank != 0:
        return
    write_json_atomic(paths.result_info, info, durable=True)  # the commit point of the result


def _site_state_dir(paths: TaskPaths, app_name: str, run_key: Any) -> Path | None:
    """``<work_dir>/state/<app>/<run>/``: what a trainer keeps of a run across rounds and restarts
    (the task folder, ``<work_dir>/tasks/<task_id>/``, goes once the server has the result)."""
    if not isinstance(run_key, str) or not run_key:
        return None
    return paths.dir.parents[1] / SITE_STATE_DIR / safe_name(app_name) / safe_name(run_key)


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) and not hasattr(value, "__index__"):
        raise TaskFailure(f"num_samples must be a whole number, got {value!r}")
    value = int(value)
    if value < 0:
        raise TaskFailure(f"num_samples must not be negative, got {value}")
    return value


def _message(exc: BaseException) -> str:
    if isinstance(exc, (TaskFailure, WeightsError, ScriptError)):
        text = str(exc)
    elif isinstance(exc, SystemExit):
        text = f"the trainer called sys.exit({exc.code!r})"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return text[:_MAX_ERROR_CHARS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m site_agent.worker", description=__doc__.splitlines()[0])
    parser.add_argument("task_dir", type=Path)
    parser.add_argument("--progress-fd", type=int, default=None)
    parser.add_argument("--parent-pid", type=int, default=None, help="end when this process is gone")
    args = parser.parse_args(argv)
    paths = TaskPaths(args.task_dir.resolve())
    world_size, gpus = _ranks_of(paths)
    if world_size > 1:  # this process supervises the task's ranks (see .ranks)
        return ranks.supervise(paths.dir, world_size, gpus, args.progress_fd, args.parent_pid,
                               lambda fd, rank, size: _run_rank(paths, fd, rank, size))
    if args.parent_pid is not None:
        threading.Thread(target=ranks.watch_parent, args=(args.parent_pid,), daemon=True).start()
    return _run_reporting(paths, ProgressChannel(args.progress_fd))


def _run_reporting(paths: TaskPaths, channel: ProgressChannel, rank: int = 0, world_size: int = 1) -> int:
    """Run the task (or one rank of it), telling the agent how it ended; returns the exit code."""
    try:
        run_task(paths, channel, rank, world_size)
    except BaseException as exc:  # user code may raise anything, SystemExit included
        traceback.print_exc()
        channel.send("failed", error=_message(exc))
        return 1
    channel.send("finished")
    return 0


def _run_rank(paths: TaskPaths, fd: int, rank: int, world_size: int) -> int:
    """One rank of a task: the task itself, then (when it succeeded) leaving the process group."""
    code = _run_reporting(paths, ProgressChannel(fd), rank, world_size)
    if code == 0:
        ranks.leave_process_group()  # after a failure the watchdog ends the ranks: no need to wait for peers
    return code


def _ranks_of(paths: TaskPaths) -> tuple[int, list[int]]:
    """(world size, GPUs) the agent gave the task; (1, []) when worker.json cannot say (run_task reports why)."""
    try:
        job = json.loads(paths.worker_input.read_text())
        return ranks.world_size_of(job), list(job.get("gpus") or [])
    except (OSError, ValueError, AttributeError):
        return 1, []


if __name__ == "__main__":
    sys.exit(main())
