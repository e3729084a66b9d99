"""SCAFFOLD against the paper's equations (Karimireddy et al., 2020, option II), written out
here on their own: the server step, the sites' corrected SGD and control variates over
two rounds (one with a site missing), the site's c_i kept on disk, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file as save_torch

from flare_provider.aggregation import UpdateRejected, make_aggregator
from site_agent.trainer import TaskContext
from site_agent.trainers.pytorch import ClassifierTrainer

TOL = 1e-6


# ---- the server: x <- x + eta_g * mean(dy over S); c <- c + |S|/N * mean(dc over S) ----------


def test_server_step_matches_the_papers_equations(update_file):
    rng = np.random.default_rng(1)
    x = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=3).astype(np.float32),
         "count": np.array(10, np.int64)}
    c = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=3).astype(np.float32)}
    agg = make_aggregator("scaffold", server_lr=0.7)
    agg.load_state({"c/w": c["w"], "c/b": c["b"]}, {"algorithm": "scaffold"})
    sites = ["a", "b", "c", "d"]  # N = 4; "d" never reports, so |S| = 3
    agg.begin_round(x, 5, sites)
    sent = agg.outgoing_tensors()
    assert set(sent) == {"scaffold.c/w", "scaffold.c/b"}
    np.testing.assert_array_equal(sent["scaffold.c/w"], c["w"])

    dy = {s: {k: rng.normal(size=x[k].shape) for k in ("w", "b")} for s in "abc"}
    dc = {s: {k: rng.normal(size=x[k].shape) for k in ("w", "b")} for s in "abc"}
    counts = {"a": 100, "b": 1, "c": 7, "d": 1}  # sample counts do not weigh SCAFFOLD's plain means
    for site, kind in (("c", "weights"), ("a", "diff"), ("b", "weights")):  # out of order: c waits for a and b
        tensors = {k: (dy[site][k] + (x[k] if kind == "weights" else 0)).astype(np.float32) for k in ("w", "b")}
        tensors["count"] = np.array({"a": 12, "b": 13, "c": 14}[site] - (10 if kind == "diff" else 0), np.int64)
        tensors.update({f"scaffold.dc/{k}": dc[site][k].astype(np.float32) for k in ("w", "b")})
        agg.add(site, update_file(site, tensors), counts[site], kind)
    new = agg.finish()
    tensors, meta = agg.state()

    for k in ("w", "b"):
        sent_dy = [(dy[s][k] + (x[k] if s != "a" else 0)).astype(np.float32).astype(np.float64) - (x[k] if s != "a" else 0)
                   for s in "abc"]
        expected_x = x[k] + 0.7 * np.mean(sent_dy, axis=0)
        expected_c = c[k] + 3 / 4 * np.mean([dc[s][k].astype(np.float32) for s in "abc"], axis=0)
        np.testing.assert_allclose(new[k], expected_x, rtol=0, atol=TOL)
        np.testing.assert_allclose(tensors[f"c/{k}"], expected_c, rtol=0, atol=TOL)
        assert new[k].dtype == np.float32
    assert new["count"] == 13  # integer tensors: the plain mean of 12, 13, 14
    assert meta == {"algorithm": "scaffold", "parameters": {"server_lr": 0.7}}


# ---- sites and server together, two rounds, against a direct implementation --------------------

IN, OUT, K, LR, ETA_G = 4, 3, 4, 0.1, 0.8
MODEL = [{"layer": "Linear", "in_features": IN, "out_features": OUT}]


def site_data(tmp_path):
    rng = np.random.default_rng(7)
    folders = {}
    for i, labels in enumerate([(0, 1), (1, 2), (0, 2)]):
        n = 10 + 3 * i
        folder = tmp_path / f"data-{i}"
        folder.mkdir()
        x = rng.normal(size=(n, IN)).astype(np.float32) + i
        y = rng.choice(labels, size=n).astype(np.int64)
        np.savez(folder / "train.npz", x=x, y=y)
        folders[f"site-{i + 1}"] = folder
    return folders


def reference_site(x, c, c_i, data):
    """The paper's option II, on float64 copies: K full-batch steps on g - c_i + c."""
    features = torch.from_numpy(data["x"]).double()
    labels = torch.from_numpy(data["y"])
    y = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    for _ in range(K):
        loss = torch.nn.functional.cross_entropy(features @ y["0.weight"].T + y["0.bias"], labels)
        grads = torch.autograd.grad(loss, [y["0.weight"], y["0.bias"]])
        with torch.no_grad():
            for name, g in zip(("0.weight", "0.bias"), grads, strict=True):
                y[name] -= LR * (g - c_i[name] + c[name])
    y = {k: v.detach() for k, v in y.items()}
    new_c_i = {k: c_i[k] - c[k] + (x[k] - y[k]) / (K * LR) for k in x}
    return y, new_c_i


def train_at_site(trainer, site, round_number, weights_and_c, data_dir, tmp_path):
    ctx = TaskContext(task_id=f"{site}-{round_number}", site=site, round=round_number, kind="train", config={},
                      data_dir=data_dir, work_dir=tmp_path, app_dir=tmp_path, device="cpu",
                      state_dir=tmp_path / "state" / site)
    result = trainer.train({k: torch.from_numpy(np.array(v)) for k, v in weights_and_c.items()}, ctx)
    path = tmp_path / f"result-{site}-{round_number}.safetensors"
    save_torch(dict(result.weights), str(path))
    return path, result.num_samples


def test_sites_and_server_match_a_direct_implementation_over_two_rounds(tmp_path):
    folders = site_data(tmp_path)
    data = {s: dict(np.load(f / "train.npz")) for s, f in folders.items()}
    # Full batches: K = epochs optimizer steps, whatever order the trainer draws samples in.
    trainer = ClassifierTrainer(model=MODEL, data={"train": "train.npz", "test": ""}, epochs=K, lr=LR, batch_size=64)
    weights = {k: v.numpy() for k, v in trainer.initial_weights().items()}
    agg = make_aggregator("scaffold", server_lr=ETA_G)

    ref_x = {k: torch.from_numpy(v).double() for k, v in weights.items()}
    ref_c = {k: torch.zeros_like(v) for k, v in ref_x.items()}
    ref_c_i = {s: {k: torch.zeros_like(v) for k, v in ref_x.items()} for s in folders}
    sites = sorted(folders)
    for round_number, reporting in ((1, sites), (2, ["site-1", "site-3"])):  # site-2 drops out of round 2
        agg.begin_round(weights, round_number, sites)
        sent = {**weights, **agg.outgoing_tensors()}
        dys, dcs = [], []
        for site in reporting:
            path, n = train_at_site(trainer, site, round_number, sent, folders[site], tmp_path)
            agg.add(site, path, n, "weights")
            y, new_c_i = reference_site(ref_x, ref_c, ref_c_i[site], data[site])
            dys.append({k: y[k] - ref_x[k] for k in y})
            dcs.append({k: new_c_i[k] - ref_c_i[site][k] for k in y})
            ref_c_i[site] = new_c_i
        weights = agg.finish()
        share = len(reporting) / len(sites)  # |S| / N
        ref_x = {k: ref_x[k] + ETA_G * torch.stack([d[k] for d in dys]).mean(0) for k in ref_x}
        ref_c = {k: ref_c[k] + share * torch.stack([d[k] for d in dcs]).mean(0) for k in ref_c}

        server_c = agg.state()[0]
        for k in ref_x:
            np.testing.assert_allclose(weights[k], ref_x[k].numpy(), rtol=0, atol=TOL, err_msg=f"x {k} round {round_number}")
            np.testing.assert_allclose(server_c[f"c/{k}"], ref_c[k].numpy(), rtol=0, atol=TOL, err_msg=f"c {k}")
        for site in reporting:  # each site's c_i, as it lies on its disk
            on_disk = load_torch(str(tmp_path / "state" / site / f"scaffold-c_i-r{round_number:06d}.safetensors"))
            for k in ref_x:
                np.testing.assert_allclose(on_disk[k].numpy(), ref_c_i[site][k].numpy(), rtol=0, atol=TOL)
        assert abs(ref_c["0.weight"]).max() > 0.01  # the control variates are not trivially zero
    assert not (tmp_path / "state" / "site-2" / "scaffold-c_i-r000002.safetensors").exists()


def test_a_retried_round_starts_from_the_same_c_i_and_old_files_go(tmp_path):
    folders = site_data(tmp_path)
    trainer = ClassifierTrainer(model=MODEL, data={"train": "train.npz", "test": ""}, epochs=2, lr=LR, batch_size=4)
    weights = {k: v.numpy() for k, v in trainer.initial_weights().items()}
    c = {"scaffold.c/0.weight": np.full((OUT, IN), 0.05, np.float32), "scaffold.c/0.bias": np.full(OUT, -0.1, np.float32)}
    sent = {**weights, **c}
    state = tmp_path / "state" / "site-1"
    for round_number in (1, 2):
        train_at_site(trainer, "site-1", round_number, sent, folders["site-1"], tmp_path)
    first = load_torch(str(train_at_site(trainer, "site-1", 3, sent, folders["site-1"], tmp_path)[0]))
    first_c_i = load_torch(str(state / "scaffold-c_i-r000003.safetensors"))
    again = load_torch(str(train_at_site(trainer, "site-1", 3, sent, folders["site-1"], tmp_path)[0]))  # a retry
    for k in first:
        torch.testing.assert_close(again[k], first[k], rtol=0, atol=0)
    for k in first_c_i:
        torch.testing.assert_close(load_torch(str(state / "scaffold-c_i-r000003.safetensors"))[k], first_c_i[k], rtol=0, atol=0)
    assert sorted(p.name for p in state.iterdir()) == ["scaffold-c_i-r000002.safetensors", "scaffold-c_i-r000003.safetensors"]


# ---- bad input ---------------------------------------------------------------------------------


def test_an_update_without_control_variate_changes_is_rejected(update_file):
    agg = make_aggregator("scaffold")
    x = {"w": np.zeros(2, np.float32)}
    agg.begin_round(x, 1, ["a", "b"])
    with pytest.raises(UpdateRejected, match=r"site 'a' rejected: missing tensors 'scaffold.dc/w'"):
        agg.add("a", update_file("a", {"w": np.ones(2, np.float32)}), 1)
    with pytest.raises(UpdateRejected, match=r"tensor 'scaffold.dc/w': shape \[3\], expected \[2\]"):
        agg.add("b", update_file("b", {"w": np.ones(2, np.float32), "scaffold.dc/w": np.ones(3, np.float32)}), 1)
    # FedAvg refuses the control variate tensors of a site that thinks it runs SCAFFOLD
    fedavg = make_aggregator("fedavg")
    fedavg.begin_round(x, 1, ["a"])
    assert fedavg.outgoing_tensors() == {}
    with pytest.raises(UpdateRejected, match="unexpected tensors 'scaffold.dc/w'"):
        fedavg.add("a", update_file("a2", {"w": np.ones(2, np.float32), "scaffold.dc/w": np.ones(2, np.float32)}), 1)


def test_models_and_saved_state_that_do_not_fit_are_refused():
    agg = make_aggregator("scaffold")
    with pytest.raises(ValueError, match="reserved for control variates"):
        agg.begin_round({"scaffold.c/w": np.zeros(2, np.float32)}, 1, ["a"])
    agg.load_state({"c/w": np.zeros(3, np.float32)}, {"algorithm": "scaffold"})
    with pytest.raises(ValueError, match=r"control variate does not match this model.*other shapes \['w'\]"):
        agg.begin_round({"w": np.zeros(2, np.float32)}, 1, ["a"])
    with pytest.raises(ValueError, match="is for 'fedavg', not 'scaffold'"):
        agg.load_state({}, {"algorithm": "fedavg"})
    with pytest.raises(ValueError, match=r"only c/<tensor>"):
        agg.load_state({"m/w": np.zeros(2, np.float32)}, {"algorithm": "scaffold"})
    with pytest.raises(ValueError, match="server_lr must be > 0"):
        make_aggregator("scaffold", server_lr=0)


def test_site_refuses_a_damaged_c_i_file_adam_and_a_run_without_a_key(tmp_path):
    folders = site_data(tmp_path)
    trainer = ClassifierTrainer(model=MODEL, data={"train": "train.npz", "test": ""}, epochs=1, lr=LR)
    weights = {k: v.numpy() for k, v in trainer.initial_weights().items()}
    sent = {**weights, "scaffold.c/0.weight": np.zeros((OUT, IN), np.float32), "scaffold.c/0.bias": np.zeros(OUT, np.float32)}
    state = tmp_path / "state" / "site-1"
    state.mkdir(parents=True)
    (state / "scaffold-c_i-r000001.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=r"scaffold-c_i-r000001.safetensors: cannot read the site's SCAFFOLD control variate"):
        train_at_site(trainer, "site-1", 2, sent, folders["site-1"], tmp_path)
    save_numpy({"0.weight": np.zeros((OUT, IN + 1), np.float32), "0.bias": np.zeros(OUT, np.float32)},
               str(state / "scaffold-c_i-r000001.safetensors"))
    with pytest.raises(ValueError, match=r"r000001.safetensors: tensor '0.weight' of the site's SCAFFOLD control variate"):
        train_at_site(trainer, "site-1", 2, sent, folders["site-1"], tmp_path)

    adam = ClassifierTrainer(model=MODEL, data={"train": "train.npz", "test": ""}, optimizer="adam")
    with pytest.raises(ValueError, match="SCAFFOLD corrects SGD steps; app.yaml sets optimizer 'adam'"):
        train_at_site(adam, "site-1", 2, sent, folders["site-1"], tmp_path)
    ctx = TaskContext(task_id="t", site="site-1", round=1, kind="train", config={}, data_dir=folders["site-1"],
                      work_dir=tmp_path, app_dir=tmp_path, device="cpu")  # no state_dir: the server named no run
    with pytest.raises(ValueError, match="names no run"):
        trainer.train({k: torch.from_numpy(np.array(v)) for k, v in sent.items()}, ctx)
