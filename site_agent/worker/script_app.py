"""Script apps: a training script in place of a trainer class.

:class:`ScriptTrainer` has a trainer's methods (``train``, ``evaluate``, ``describe``,
``initial_weights``). Each runs the app's script in this process as ``__main__``
(``runpy``) with the task opened for :mod:`site_agent.client`, and turns what the script
sent into the trainer's result, so the worker checks, filters and saves it exactly as a
trainer's.

While the script runs: ``sys.argv`` is the script and its ``script_args``; the script's
folder and the app's ``custom/`` come first on ``sys.path``; the working directory is the
task's scratch folder. All three are put back afterwards.
"""

from __future__ import annotations

import os
import runpy
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

from flare_provider.wire.app_config import CUSTOM_DIR, AppConfig

from ..client._task import Answer, ScriptTask, open_task
from ..trainer import DataSummary, EvalResult, TaskContext, TrainResult


class ScriptError(Exception):
    """A script that did not answer its task as the task needs; the message says what happened."""


class ScriptTrainer:
    """Runs an app's training script for each task; built per task with the task's context."""

    tensor_format: ClassVar[str] = "numpy"  # how the worker loads the global model; receive() converts

    def __init__(self, app_dir: Path, config: AppConfig, ctx: TaskContext):
        self.app_dir = Path(app_dir)
        self.script = self.app_dir / config.script
        self.args = tuple(config.script_args)
        self.ctx = ctx
        if not self.script.is_file():
            raise ScriptError(f"the app's script {config.script!r} is missing")

    # ---- the trainer's methods ------------------------------------------------------

    def train(self, weights: Mapping[str, Any], ctx: TaskContext) -> TrainResult:
        answer = self._run(weights, ctx)
        if answer is None:  # a rank other than 0 that sent nothing: its result is discarded anyway
            return TrainResult(dict(weights), 0)
        return TrainResult(answer.params, answer.num_samples, answer.metrics, answer.is_difference)

    def evaluate(self, weights: Mapping[str, Any], ctx: TaskContext) -> EvalResult:
        answer = self._run(weights, ctx)
        return EvalResult({}, 0) if answer is None else EvalResult(answer.metrics, answer.num_samples)

    def describe(self, ctx: TaskContext | None = None) -> DataSummary:
        answer = self._run({}, ctx or self.ctx)
        return DataSummary(0) if answer is None else DataSummary(answer.num_samples, answer.schema or {})

    def initial_weights(self, ctx: TaskContext | None = None) -> dict[str, Any]:
        answer = self._run({}, ctx or self.ctx)
        return {} if answer is None else answer.params

    # ---- running the script -----------------------------------------------------------

    def _run(self, weights: Mapping[str, Any], ctx: TaskContext) -> Answer | None:
        """Run the script for ``ctx``'s task; what it sent. Ranks other than 0 need not send
        (their results are discarded): None where such a rank sent nothing."""
        task = ScriptTask(ctx=ctx, weights=weights)
        name = self.script.relative_to(self.app_dir).as_posix()
        with open_task(task), self._surroundings(ctx):
            try:
                runpy.run_path(str(self.script), run_name="__main__")
            except SystemExit as exc:  # the script's own sys.exit(): fine when it says success
                if exc.code not in (None, 0):
                    raise ScriptError(f"the script {name} exited with status {exc.code!r}"
                                      f"{' after answering' if task.answered else ' without answering its task'}") from None
        if not task.answered and ctx.rank == 0:
            raise ScriptError(f"the script {name} ended without answering its {ctx.kind} task "
                              f"({_ANSWERS[ctx.kind] if ctx.kind in _ANSWERS else 'no answer known for this kind'})")
        return task.answer

    @contextmanager
    def _surroundings(self, ctx: TaskContext) -> Iterator[None]:
        paths = [str(self.script.parent), str(self.app_dir / CUSTOM_DIR)]
        saved_argv, saved_path, saved_cwd = sys.argv, list(sys.path), os.getcwd()
        sys.argv = [str(self.script), *self.args]
        sys.path[:0] = list(dict.fromkeys(paths))  # the script's folder first, as `python script.py` has it
        ctx.work_dir.mkdir(parents=True, exist_ok=True)
        os.chdir(ctx.work_dir)
        try:
            yield
        finally:
            os.chdir(saved_cwd)
            sys.argv = saved_argv
            sys.path[:] = saved_path


_ANSWERS = {
    "train": "call site_agent.client.send(params=..., num_samples=...)",
    "initialize": "call site_agent.client.send(params=...)",
    "evaluate": "call site_agent.client.send_metrics(metrics)",
    "describe": "call site_agent.client.send_summary(num_samples, schema)",
}
