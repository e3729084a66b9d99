"""A custom trainer: a small CNN for 8x8 digits that sends back weight differences.

Anything importable from the site's environment can be used here; the data files
are read with the built-in trainer's helper.
"""

from __future__ import annotations

import torch
from torch import nn

from site_agent.trainer import DataSummary, EvalResult, TaskContext, Trainer, TrainResult
from site_agent.trainers.pytorch import load_split


class DigitsCnn(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(channels * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.view(-1, 1, 8, 8)).flatten(1))


class DigitsCnnTrainer(Trainer):
    tensor_format = "torch"

    def __init__(self, channels: int = 8, epochs: int = 1, lr: float = 0.05, batch_size: int = 32, seed: int = 0):
        self.channels, self.epochs, self.lr, self.batch_size, self.seed = channels, epochs, lr, batch_size, seed

    def _model(self, weights, device: str) -> DigitsCnn:
        torch.manual_seed(self.seed)
        model = DigitsCnn(self.channels)
        if weights:
            model.load_state_dict(weights)
        return model.to(device)

    def train(self, weights, ctx: TaskContext) -> TrainResult:
        x, y = (torch.from_numpy(a).to(ctx.device) for a in load_split(ctx.data_dir, "train.npz"))
        model = self._model(weights, ctx.device)
        start = {k: v.detach().clone() for k, v in model.state_dict().items()}
        epochs = int(ctx.config.get("epochs", self.epochs))
        opt = torch.optim.SGD(model.parameters(), lr=float(ctx.config.get("lr", self.lr)))
        shuffle = torch.Generator().manual_seed(self.seed + ctx.round)
        for epoch in range(epochs):
            order = torch.randperm(len(y), generator=shuffle).to(ctx.device)
            for i in range(0, len(y), self.batch_size):
                batch = order[i : i + self.batch_size]
                loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
                opt.zero_grad()
                loss.backward()
                opt.step()
            ctx.report((epoch + 1) / epochs, train_loss=float(loss))
        if not weights:  # first round: the site's initial model becomes the global one
            return TrainResult({k: v.cpu() for k, v in model.state_dict().items()}, len(y), {"train_loss": float(loss)})
        diff = {k: (v - start[k]).cpu() for k, v in model.state_dict().items()}
        return TrainResult(diff, len(y), {"train_loss": float(loss)}, is_difference=True)

    def evaluate(self, weights, ctx: TaskContext) -> EvalResult:
        x, y = (torch.from_numpy(a).to(ctx.device) for a in load_split(ctx.data_dir, "test.npz"))
        model = self._model(weights, ctx.device).eval()
        with torch.no_grad():
            logits = model(x)
        accuracy = float((logits.argmax(1) == y).float().mean())
        return EvalResult({"loss": float(nn.functional.cross_entropy(logits, y)), "accuracy": accuracy}, len(y))

    def describe(self, ctx: TaskContext) -> DataSummary:
        """The training split's size and layout, for a data check before a run (nothing trains)."""
        from site_agent.datasets.digits import summarize_split

        return summarize_split(ctx.data_dir, "train.npz")
