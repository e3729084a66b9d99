"""Real PyTorch trainers' state dicts, aggregated on the numpy-only side and loaded back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file

from flare_provider.aggregation import UpdateRejected, make_aggregator


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def train_at_site(global_state: dict, seed: int, samples: int) -> dict[str, torch.Tensor]:
    """A few SGD steps on the site's own synthetic data, starting from the global model."""
    model = make_model()
    model.load_state_dict(global_state)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 6, generator=generator) + seed
    y = (x.sum(dim=1) > seed * 6).long()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["weights", "diff"])
def test_fedavg_of_torch_state_dicts(kind, tmp_path):
    global_model = make_model()
    save_file(global_model.state_dict(), str(tmp_path / "global.safetensors"))
    global_weights = load_file(str(tmp_path / "global.safetensors"))  # the Airflow side: numpy only
    assert global_weights["1.num_batches_tracked"].dtype == np.int64

    samples = {"site-a": 40, "site-b": 25, "site-c": 10}
    trained = {s: train_at_site(global_model.state_dict(), i + 1, n) for i, (s, n) in enumerate(samples.items())}
    agg = make_aggregator("fedavg")
    agg.begin_round(global_weights, 1, list(samples))
    for site, state in trained.items():
        if kind == "diff":
            state = {k: v - global_model.state_dict()[k] for k, v in state.items()}
        path = tmp_path / f"{site}.safetensors"
        save_file(state, str(path))
        agg.add(site, path, samples[site], kind=kind)
    new = agg.finish()

    total = sum(samples.values())
    for name, tensor in global_model.state_dict().items():
        expected = sum(n * trained[s][name].double() for s, n in samples.items()) / total
        if not tensor.is_floating_point():
            expected = expected.round()
        np.testing.assert_allclose(new[name], expected.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)
    assert new["1.num_batches_tracked"] == 3

    # The result loads straight back into the model, every dtype and shape intact.
    model = make_model()
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in new.items()}, strict=True)
    model.eval()
    assert torch.isfinite(model(torch.randn(4, 6))).all()


def test_a_site_with_a_different_architecture_is_rejected(tmp_path):
    global_model = make_model()
    save_file(global_model.state_dict(), str(tmp_path / "global.safetensors"))
    wrong = torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 2)
    )
    save_file(wrong.state_dict(), str(tmp_path / "wrong.safetensors"))
    agg = make_aggregator("fedavg")
    agg.begin_round(load_file(str(tmp_path / "global.safetensors")), 0, ["odd-site"])
    with pytest.raises(UpdateRejected, match=r"tensor '0.bias': shape \[16\], expected \[8\]"):
        agg.add("odd-site", tmp_path / "wrong.safetensors", 5)
