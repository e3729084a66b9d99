"""SCAFFOLD at a site: its control variate ``c_i``, kept on disk, and the gradient correction.

The server sends its control variate ``c`` in the global model file as tensors named
``scaffold.c/<tensor>`` (see :mod:`flare_provider.aggregation.scaffold` for the whole
algorithm). From the global weights ``x`` the trainer takes ``K`` SGD steps of rate
``lr`` on the corrected gradient ``g_i(y) - c_i + c``, then (the paper's option II)::

    c_i+ = c_i - c + (x - y) / (K * lr)

and returns ``dc = c_i+ - c_i`` as ``scaffold.dc/<tensor>`` beside its weights. Only the
model's parameters take corrected steps; its floating-point buffers (batch-norm
statistics) have no gradient, so their ``c_i`` stays 0 and their ``dc`` is 0.

``c_i`` outlives the task (whose folder goes once the server has the result) and the
agent: it lives in the run's site state folder (``<work_dir>/state/<app>/<run>/``), one
file per round, ``scaffold-c_i-r<round>.safetensors``, written atomically and flushed to
disk. A round reads the newest file of an *earlier* round, so a round trained again
(a retried task) starts from the same ``c_i`` as the first try. Before its first round
a site's ``c_i`` is 0.

Torch is imported only when a SCAFFOLD round trains.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flare_provider.aggregation.names import SCAFFOLD_DELTA_C, SCAFFOLD_SERVER_C
from flare_provider.files import write_atomic
from flare_provider.wire.tensors import TensorSpec

_FILE = re.compile(r"scaffold-c_i-r(\d{6})\.safetensors")


def split_server_control(weights: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model's weights, and the server control variate ``c`` by model tensor name."""
    model = {k: v for k, v in weights.items() if not k.startswith(SCAFFOLD_SERVER_C)}
    control = {k[len(SCAFFOLD_SERVER_C) :]: v for k, v in weights.items() if k.startswith(SCAFFOLD_SERVER_C)}
    return model, control


def result_layout(global_layout: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
    """The tensors a result must hold, given the global model file's: the model's, and a
    ``scaffold.dc/`` change for each ``scaffold.c/`` control variate that came in."""
    return {
        (SCAFFOLD_DELTA_C + name[len(SCAFFOLD_SERVER_C) :] if name.startswith(SCAFFOLD_SERVER_C) else name): spec
        for name, spec in global_layout.items()
    }


class ControlVariateStore:
    """One site's ``c_i`` for one run: a file per round that produced it."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def path(self, round_number: int) -> Path:
        return self.folder / f"scaffold-c_i-r{round_number:06d}.safetensors"

    def rounds(self) -> list[int]:
        """Rounds with a saved ``c_i``, oldest first."""
        if not self.folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.folder.iterdir() if (m := _FILE.fullmatch(p.name)))

    def load_before(self, round_number: int, like: Mapping[str, Any]) -> tuple[dict[str, Any], int | None]:
        """The newest ``c_i`` saved by a round before ``round_number`` (zeros shaped ``like``
        when there is none), and that round. A file that does not fit ``like`` is an error."""
        import torch
        from safetensors.torch import load_file

        earlier = [r for r in self.rounds() if r < round_number]
        if not earlier:
            return {name: torch.zeros_like(t, device="cpu") for name, t in like.items()}, None
        path = self.path(earlier[-1])
        try:
            saved = load_file(str(path))
        except Exception as exc:
            raise ValueError(f"{path}: cannot read the site's SCAFFOLD control variate ({exc})") from None
        if set(saved) != set(like):
            raise ValueError(
                f"{path}: the site's SCAFFOLD control variate has tensors {sorted(saved)[:5]}, "
                f"the model {sorted(like)[:5]}"
            )
        for name, tensor in saved.items():
            if tensor.shape != like[name].shape or tensor.dtype != like[name].dtype:
                raise ValueError(
                    f"{path}: tensor {name!r} of the site's SCAFFOLD control variate is {tensor.dtype}"
                    f"{list(tensor.shape)}, the server's {like[name].dtype}{list(like[name].shape)}"
                )
        return saved, earlier[-1]

    def save(self, round_number: int, c_i: Mapping[str, Any], keep_from: int | None) -> Path:
        """Write round ``round_number``'s ``c_i`` (atomically, flushed), then drop the files
        of rounds before ``keep_from`` (the round this one started from)."""
        from safetensors.torch import save

        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(round_number)
        write_atomic(path, save({k: v.detach().cpu().contiguous() for k, v in c_i.items()}), durable=True)
        for old in self.rounds():
            if old < (keep_from if keep_from is not None else round_number):
                self.path(old).unlink(missing_ok=True)
        return path


class ScaffoldCorrection:
    """One SCAFFOLD round of local training: call :meth:`correct` after each
    ``backward()`` (before the optimizer's step), then :meth:`finish` once.

    :param model: the model, loaded with the global weights ``x``.
    :param server_c: the server's ``c`` by tensor name (every floating tensor of the model).
    :param state_dir: the site's state folder of this run (``TaskContext.state_dir``).
    :param lr: the local learning rate ``lr`` of the SGD steps.
    """

    def __init__(self, model: Any, server_c: Mapping[str, Any], state_dir: Path | None, round_number: int, lr: float):
        import torch

        if state_dir is None:
            raise ValueError("this round sends a SCAFFOLD control variate but names no run (run_key) to keep c_i for")
        if not lr > 0:
            raise ValueError(f"SCAFFOLD needs a learning rate > 0, got {lr!r}")
        state = model.state_dict()
        floating = {name for name, t in state.items() if t.is_floating_point()}
        if set(server_c) != floating:
            raise ValueError(
                f"the server's SCAFFOLD control variate does not fit the model: missing for {sorted(floating - set(server_c))[:5]}, "
                f"unknown tensors {sorted(set(server_c) - floating)[:5]}"
            )
        for name, c in server_c.items():
            if tuple(c.shape) != tuple(state[name].shape):
                raise ValueError(f"the server's SCAFFOLD control variate of {name!r} has shape {list(c.shape)}, "
                                 f"the model {list(state[name].shape)}")
        self.round = round_number
        self.lr = float(lr)
        self.steps = 0
        self.lr_sum = 0.0  # sum of the step rates: K * lr at a constant rate
        self._model = model
        self._store = ControlVariateStore(state_dir)
        self._c = {name: c.detach().cpu() for name, c in server_c.items()}
        self._c_i, self._started_from = self._store.load_before(round_number, self._c)
        self._params = dict(model.named_parameters())
        self._x = {name: p.detach().to("cpu", torch.float64, copy=True) for name, p in self._params.items()}
        # The correction -c_i + c is the same at every step of the round.
        self._correction = {
            name: (self._c[name].double() - self._c_i[name].double()).to(p.device, p.dtype)
            for name, p in self._params.items()
        }

    def correct(self, step_lr: float | None = None) -> None:
        """Turn each parameter's gradient ``g`` into ``g - c_i + c`` (one optimizer step at ``step_lr``).

        With a learning-rate schedule the steps differ: ``K * lr`` in the update of ``c_i``
        becomes the sum of the rates actually stepped with (equal to it at a constant rate).
        """
        for name, param in self._params.items():
            if param.grad is None:  # a parameter the loss does not reach still moves by -c_i + c
                param.grad = self._correction[name].clone()
            else:
                param.grad.add_(self._correction[name])
        self.steps += 1
        self.lr_sum += self.lr if step_lr is None else float(step_lr)

    def finish(self, save: bool = True) -> dict[str, Any]:
        """Save ``c_i+`` for the next round; the ``scaffold.dc/`` tensors for the result.

        ``save=False``: the ``dc`` tensors only (the ranks of a task other than rank 0,
        whose ``c_i+`` is the same as rank 0's, which saves it)."""
        import torch

        if self.steps == 0:
            raise ValueError("SCAFFOLD: no optimizer step was taken, so c_i cannot be updated")
        new_c_i, delta = {}, {}
        for name, c in self._c.items():
            c_i = self._c_i[name].double()
            if name in self._params:
                y = self._params[name].detach().to("cpu", torch.float64)
                updated = c_i - c.double() + (self._x[name] - y) / self.lr_sum
            else:
                updated = c_i
            new_c_i[name] = updated.to(c.dtype)
            delta[SCAFFOLD_DELTA_C + name] = (updated - c_i).to(c.dtype)
        if save:
            self._store.save(self.round, new_c_i, self._started_from)
        return delta
