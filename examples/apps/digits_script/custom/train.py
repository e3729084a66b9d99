"""Train a small CNN on the 8x8 digits: an ordinary PyTorch script.

The lines marked ``# FL`` make it federated: it starts from the global model, trains on
this site's data and sends the new weights back. Run by the site agent for each task.
"""

import argparse

import numpy as np
import torch
from torch import nn

import site_agent.client as flare  # FL


class Net(nn.Module):
    def __init__(self, channels: int = 8):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(channels * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.view(-1, 1, 8, 8)).flatten(1))


def load(path, device):
    arrays = np.load(path)
    return torch.from_numpy(arrays["x"]).to(device), torch.from_numpy(arrays["y"]).to(device)


def evaluate(net, x, y) -> dict:
    with torch.no_grad():
        logits = net.eval()(x)
    return {"loss": float(nn.functional.cross_entropy(logits, y)), "accuracy": float((logits.argmax(1) == y).float().mean())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    flare.init(tensor_format="torch")  # FL
    model = flare.receive()  # FL: the global model and this round's config
    device, data = flare.device(), flare.data_dir()  # FL
    torch.manual_seed(args.seed)
    net = Net()
    if model.params:  # FL: start from the global model (empty before round 1)
        net.load_state_dict(model.params)
    net.to(device)
    if flare.is_initialize():  # FL: the starting model, seeded, no data touched
        flare.send(params=net.state_dict())
        return

    x_test, y_test = load(data / "test.npz", device)
    if flare.is_evaluate():  # FL: only measure the global model on this site's data
        flare.send_metrics(evaluate(net, x_test, y_test), num_samples=len(y_test))
        return

    x, y = load(data / "train.npz", device)
    if flare.is_describe():  # FL: the data's size and layout, for the server's data check
        schema = {name: {"shape": list(t.shape[1:]), "dtype": str(t.dtype).removeprefix("torch.")} for name, t in (("x", x), ("y", y))}
        flare.send_summary(num_samples=len(y), schema=schema)
        return
    epochs, lr = int(model.config.get("epochs", args.epochs)), float(model.config.get("lr", args.lr))
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=args.momentum)
    shuffle = torch.Generator().manual_seed(args.seed + model.round)
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(y), generator=shuffle).to(device)
        for start in range(0, len(y), args.batch_size):
            batch = order[start : start + args.batch_size]
            loss = nn.functional.cross_entropy(net(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        flare.report((epoch + 1) / epochs, train_loss=float(loss))  # FL: progress to Airflow

    metrics = {f"val_{name}": value for name, value in evaluate(net, x_test, y_test).items()}
    flare.send(params=net.state_dict(), num_samples=len(y), metrics=metrics)  # FL


if __name__ == "__main__":
    main()
