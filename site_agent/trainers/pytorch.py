"""A built-in PyTorch classifier trainer, configured entirely from ``app.yaml``.

Example ``app.yaml``::

    name: digits
    trainer:
      path: site_agent.trainers.pytorch.ClassifierTrainer
      args:
        model:                      # torch.nn layers, in order (an allow-list, see LAYERS)
          - {layer: Linear, in_features: 64, out_features: 32}
          - ReLU
          - {layer: Linear, in_features: 32, out_features: 10}
        data: {train: train.npz, test: test.npz}   # in the site's data folder: arrays x and y
        epochs: 2
        lr: 0.1
        batch_size: 32
        seed: 0

The round config from the server may override ``epochs``, ``lr``, ``batch_size``,
``momentum``, ``weight_decay``, ``fedprox_mu`` and ``lr_schedule``. With ``fedprox_mu``
> 0 the loss gains the FedProx term mu/2 * ||w - w_global||^2, which keeps sites with
skewed data close to the global model. ``lr_schedule: cosine`` lowers the learning rate
step by step along a cosine that spans the whole run, its place read from the round
config's ``round`` and ``num_rounds`` (see :mod:`site_agent.trainers.schedules`).
When the global model comes with SCAFFOLD's server control
variate (the ``scaffold`` aggregator), each SGD step is corrected by the site's control
variate and the result carries its change (see :mod:`site_agent.trainers.scaffold`).
Given the same inputs, training on CPU gives the same weights.

A task that runs as several ranks (``ctx.world_size`` > 1: one per GPU, or several
processes on CPU) trains one model with DistributedDataParallel: each epoch's shuffled
order is the same at every rank, each global batch of ``batch_size`` samples is split
between the ranks (rank r takes every world_size-th sample of it, from the r-th on), and
the ranks' gradients are averaged so that each step equals the single-process step on the
whole batch. ``batch_size`` must be a multiple of the number of ranks. The reported
``num_samples`` and metrics are the site's whole, summed over the ranks. Batch-norm
statistics are those of each rank's part of the batch.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from ..trainer import DataSummary, EvalResult, TaskContext, Trainer, TrainResult
from .scaffold import ScaffoldCorrection, split_server_control
from .schedules import check_schedule, run_steps, scheduled_lr

LAYERS = frozenset({
    "Linear", "Conv1d", "Conv2d", "MaxPool1d", "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d",
    "BatchNorm1d", "BatchNorm2d", "LayerNorm", "Dropout", "Flatten", "Unflatten",
    "ReLU", "LeakyReLU", "GELU", "SiLU", "Tanh", "Sigmoid",
})
OPTIMIZERS = ("sgd", "adam")
ROUND_OVERRIDES = ("epochs", "lr", "batch_size", "momentum", "weight_decay", "fedprox_mu", "lr_schedule")
_EVAL_BATCH = 1024


def build_model(spec: list[Any]):
    """An ``nn.Sequential`` from a list of layers: a name, or ``{layer: Name, **kwargs}``."""
    from torch import nn

    if not isinstance(spec, list) or not spec:
        raise ValueError("'model' must be a non-empty list of layers")
    layers = []
    for index, item in enumerate(spec):
        if isinstance(item, str):
            name, kwargs = item, {}
        elif isinstance(item, dict) and isinstance(item.get("layer"), str):
            kwargs = dict(item)
            name = kwargs.pop("layer")
        else:
            raise ValueError(f"model layer {index}: expected a layer name or {{layer: Name, ...}}, got {item!r}")
        if name not in LAYERS:
            raise ValueError(f"model layer {index}: {name!r} is not an allowed layer ({', '.join(sorted(LAYERS))})")
        try:
            layers.append(getattr(nn, name)(**kwargs))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"model layer {index} ({name}): {exc}") from None
    return nn.Sequential(*layers)


def load_split(data_dir: Path, file_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Arrays ``x`` (float32) and ``y`` (int64) from an ``.npz`` file inside ``data_dir``."""
    rel = PurePosixPath(file_name)
    if rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"data file {file_name!r} must be a path inside the site's data folder")
    path = Path(data_dir) / rel
    try:
        with np.load(path, allow_pickle=False) as npz:
            x, y = npz["x"], npz["y"]
    except FileNotFoundError:
        raise FileNotFoundError(f"data file {file_name!r} not found in the site's data folder") from None
    except KeyError:
        raise ValueError(f"data file {file_name!r} must hold arrays named 'x' and 'y'") from None
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"data file {file_name!r}: x and y must be non-empty and of equal length")
    return x.astype(np.float32, copy=False), y.astype(np.int64, copy=False)


class ClassifierTrainer(Trainer):
    """Trains a classifier with cross-entropy; see the module docstring for ``app.yaml``."""

    tensor_format = "torch"

    def __init__(
        self,
        model: list[Any],
        data: dict[str, str] | None = None,
        epochs: int = 1,
        lr: float = 0.01,
        batch_size: int = 32,
        optimizer: str = "sgd",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        fedprox_mu: float = 0.0,
        seed: int = 0,
        lr_schedule: str = "constant",
    ):
        build_model(model)  # fail early on a bad spec, before any data is read
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        self.model_spec = model
        self.data = {"train": "train.npz", "test": "test.npz", **(data or {})}
        self.defaults = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "momentum": momentum,
                         "weight_decay": weight_decay, "fedprox_mu": fedprox_mu,
                         "lr_schedule": check_schedule(lr_schedule)}
        self.optimizer = optimizer
        self.seed = int(seed)

    def initial_weights(self) -> dict[str, Any]:
        """The model's seeded initial weights (CPU tensors): a starting global model."""
        import torch

        torch.manual_seed(self.seed)
        return {k: v.detach().clone() for k, v in build_model(self.model_spec).state_dict().items()}

    def _settings(self, config: dict[str, Any]) -> dict[str, Any]:
        settings = dict(self.defaults)
        settings.update({k: config[k] for k in ROUND_OVERRIDES if k in config})
        for name in ("epochs", "batch_size"):
            if isinstance(settings[name], bool) or not isinstance(settings[name], int) or settings[name] < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {settings[name]!r}")
        for name in ("lr", "momentum", "weight_decay", "fedprox_mu"):
            if isinstance(settings[name], bool) or not isinstance(settings[name], (int, float)) or settings[name] < 0:
                raise ValueError(f"{name} must be a number >= 0, got {settings[name]!r}")
        check_schedule(settings["lr_schedule"])
        return settings

    def _model(self, weights: dict[str, Any], device: str):
        import torch

        torch.manual_seed(self.seed)
        model = build_model(self.model_spec)
        if weights:
            try:
                model.load_state_dict(weights, strict=True)
            except RuntimeError as exc:
                raise ValueError(f"the global weights do not fit the model in app.yaml: {exc}") from None
        return model.to(device)

    def train(self, weights: dict[str, Any], ctx: TaskContext) -> TrainResult:
        import torch
        from torch import nn

        settings = self._settings(ctx.config)
        weights, server_c = split_server_control(weights)
        if server_c and self.optimizer != "sgd":
            raise ValueError(f"SCAFFOLD corrects SGD steps; app.yaml sets optimizer {self.optimizer!r}")
        world, rank = ctx.world_size, ctx.rank
        if settings["batch_size"] % world:
            raise ValueError(f"batch_size {settings['batch_size']} must be a multiple of the task's {world} ranks "
                             "(each rank trains on batch_size / ranks samples of every batch)")
        if ctx.device == "cpu":
            torch.use_deterministic_algorithms(True)
        x, y = (torch.from_numpy(a).to(ctx.device) for a in load_split(ctx.data_dir, self.data["train"]))
        model = self._model(weights, ctx.device)
        net = _data_parallel(model, ctx)  # the model itself when the task runs as one rank
        loss_sum = nn.CrossEntropyLoss(reduction="sum")
        scaffold = ScaffoldCorrection(model, server_c, ctx.state_dir, ctx.round, settings["lr"]) if server_c else None
        global_params = [p.detach().clone() for p in model.parameters()]
        if self.optimizer == "adam":
            opt = torch.optim.Adam(model.parameters(), lr=settings["lr"], weight_decay=settings["weight_decay"])
        else:
            opt = torch.optim.SGD(model.parameters(), lr=settings["lr"], momentum=settings["momentum"],
                                  weight_decay=settings["weight_decay"])
        loss_fn = nn.CrossEntropyLoss()
        mu = float(settings["fedprox_mu"])
        shuffle = torch.Generator().manual_seed(self.seed * 1_000_003 + ctx.round)
        n, epochs, batch_size = len(y), settings["epochs"], settings["batch_size"]
        step, total_steps = run_steps(ctx.config, epochs * -(-n // batch_size))
        for epoch in range(epochs):
            model.train()
            order = torch.randperm(n, generator=shuffle).to(ctx.device)
            total_loss, correct = 0.0, 0
            for start in range(0, n, batch_size):
                batch = order[start : start + batch_size]
                if world > 1:  # this rank's share; DDP averages the ranks' gradients,
                    whole = len(batch)  # so each rank's loss is its sum over the whole batch's size, times world
                    batch = batch[rank::world]
                    logits = net(x[batch])
                    summed = loss_sum(logits, y[batch])
                    total_loss += summed.item()
                    loss = summed * (world / whole)
                else:
                    logits = net(x[batch])
                    loss = loss_fn(logits, y[batch])
                    total_loss += loss.item() * len(batch)
                correct += int((logits.argmax(1) == y[batch]).sum())
                if mu > 0:  # FedProx: stay near the global model
                    drift = sum(((p - g) ** 2).sum() for p, g in zip(model.parameters(), global_params, strict=True))
                    loss = loss + mu / 2 * drift
                opt.zero_grad()
                loss.backward()
                step_lr = scheduled_lr(settings["lr_schedule"], settings["lr"], step, total_steps)
                if scaffold is not None:  # SCAFFOLD: step along g - c_i + c
                    scaffold.correct(step_lr)
                for group in opt.param_groups:
                    group["lr"] = step_lr
                opt.step()
                step += 1
            total_loss, correct = _sum_over_ranks(ctx, total_loss, correct)
            ctx.report((epoch + 1) / epochs, train_loss=total_loss / n, train_accuracy=correct / n)

        metrics = {"train_loss": total_loss / n, "train_accuracy": correct / n}
        if self._has_test(ctx):
            val = self._evaluate(model, ctx)
            metrics.update({"val_loss": val.metrics["loss"], "val_accuracy": val.metrics["accuracy"]})
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        if scaffold is not None:
            state.update(scaffold.finish(save=rank == 0))  # saves c_i+; the result carries dc = c_i+ - c_i
        return TrainResult(weights=state, num_samples=n, metrics=metrics)

    def evaluate(self, weights: dict[str, Any], ctx: TaskContext) -> EvalResult:
        if not weights:
            raise ValueError("evaluate needs global weights")
        return self._evaluate(self._model(weights, ctx.device), ctx)

    def describe(self, ctx: TaskContext) -> DataSummary:
        """The training split's size and layout, for a data check before a run (nothing trains)."""
        from ..datasets.digits import summarize_split  # the x/y .npz layout this trainer reads

        return summarize_split(ctx.data_dir, self.data["train"])

    def _has_test(self, ctx: TaskContext) -> bool:
        return bool(self.data.get("test")) and (Path(ctx.data_dir) / self.data["test"]).is_file()

    def _evaluate(self, model, ctx: TaskContext) -> EvalResult:
        import torch
        from torch import nn

        x, y = load_split(ctx.data_dir, self.data["test"])
        n = len(y)
        # each rank evaluates its share of the samples; the sums are added up over the ranks
        x, y = (torch.from_numpy(a[ctx.rank :: ctx.world_size]).to(ctx.device) for a in (x, y))
        model.eval()
        total_loss, correct = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(y), _EVAL_BATCH):
                logits = model(x[start : start + _EVAL_BATCH])
                target = y[start : start + _EVAL_BATCH]
                total_loss += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
                correct += int((logits.argmax(1) == target).sum())
        total_loss, correct = _sum_over_ranks(ctx, total_loss, correct)
        return EvalResult(metrics={"loss": total_loss / n, "accuracy": correct / n}, num_samples=n)


def _data_parallel(model, ctx: TaskContext):
    """``model`` wrapped in DistributedDataParallel when the task runs as several ranks, else itself."""
    if ctx.world_size == 1:
        return model
    import torch
    from torch.nn.parallel import DistributedDataParallel

    device = torch.device(ctx.device)
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def _sum_over_ranks(ctx: TaskContext, *values: float) -> tuple[float, ...]:
    """``values`` summed over the task's ranks (as they are when it runs as one)."""
    if ctx.world_size == 1:
        return values
    import torch
    import torch.distributed as dist

    summed = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(summed)
    return tuple(summed.tolist())
