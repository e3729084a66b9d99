"""Central DP on the Airflow side: clipping, calibrated noise, adaptive clipping, accounting.

The aggregator is driven with real update files, the way the engine drives it; epsilon is
checked against the accountant library's own computation and against the closed form of
composed Gaussian mechanisms (Balle and Wang 2018).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from prv_accountant import GaussianMechanism, PRVAccountant
from scipy import optimize, stats

from flare_provider.aggregation import make_aggregator
from flare_provider.aggregation.central_dp import CentralDP, with_central_dp
from flare_provider.federation.records import RunSpec
from flare_provider.privacy.central import EPS_ERROR, CentralDPSettings, epsilon_spent
from flare_provider.wire.tensors import save_file

SITES = ("a", "b", "c", "d")


def one_round(agg, global_weights, updates, tmp_path, number, num_samples=None):
    """Run round ``number``: each site sends global + its change (full weights)."""
    agg.begin_round(global_weights, number, list(updates))
    for site, change in updates.items():
        path = tmp_path / f"{site}-{number}.safetensors"
        save_file({k: (global_weights[k] + change[k]).astype(np.float32) for k in global_weights}, path, durable=False)
        agg.add(site, path, (num_samples or {}).get(site, 10), "weights")
    return agg.finish()


def dp(tmp_path, **settings) -> CentralDP:
    return with_central_dp(make_aggregator("fedavg", spill_dir=tmp_path / "spill"), settings, spill_dir=tmp_path / "spill")


def test_each_update_is_clipped_and_sites_weigh_the_same(tmp_path):
    g = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(2, np.float32)}
    rs = np.random.default_rng(0)
    changes = {s: {"w": rs.normal(0, scale, (3, 4)), "b": rs.normal(0, scale, 2)} for s, scale in zip(SITES, (5, 0.01, 1, 3))}
    agg = dp(tmp_path, clip=0.5, noise_multiplier=0.0)
    new = one_round(agg, g, changes, tmp_path, 1, num_samples={"a": 1000, "b": 1, "c": 7, "d": 3})
    clipped = {}
    for site, change in changes.items():
        norm = math.sqrt(sum(float((v**2).sum()) for v in change.values()))
        clipped[site] = {k: v * min(1.0, 0.5 / norm) for k, v in change.items()}
        assert math.sqrt(sum(float((v**2).sum()) for v in clipped[site].values())) <= 0.5 + 1e-9
    for name in g:  # the unweighted mean of the clipped updates, whatever the sample counts
        expected = np.mean([clipped[s][name] for s in SITES], axis=0)
        np.testing.assert_allclose(new[name], expected, atol=1e-6)
    record = agg.round_privacy
    assert (record["clip"], record["sites"], record["clipped_sites"], record["epsilon"]) == (0.5, 4, 3, None)
    assert agg.status is None and agg.last_round.accepted == {"a": 1000, "b": 1, "c": 7, "d": 3}


def test_noise_on_the_mean_has_std_noise_multiplier_times_clip_over_sites(tmp_path):
    g = {"w": np.zeros((200, 100), np.float32), "b": np.zeros(20_000, np.float32)}
    zero = {s: {k: np.zeros_like(v, np.float64) for k, v in g.items()} for s in SITES}
    agg = dp(tmp_path, clip=0.2, noise_multiplier=1.5, seed=1)
    new = one_round(agg, g, zero, tmp_path, 1)
    noise = np.concatenate([new["w"].reshape(-1), new["b"]]).astype(np.float64)
    sigma = 1.5 * 0.2 / len(SITES)  # the documented calibration: z * C / n
    assert agg.round_privacy["noise_std"] == pytest.approx(sigma)
    assert stats.kstest(noise, "norm", args=(0, sigma)).pvalue > 1e-3
    n = noise.size
    statistic = (n - 1) * noise.var(ddof=1) / sigma**2
    assert stats.chi2.ppf(5e-5, n - 1) < statistic < stats.chi2.ppf(1 - 5e-5, n - 1)
    # noise on the sum (z * C), not on each site's update: 3 sites would give sigma * 4 / 3
    assert not stats.chi2.ppf(5e-5, n - 1) < (n - 1) * noise.var(ddof=1) / (sigma * 4 / 3) ** 2


def analytic_epsilon(mu: float, delta: float) -> float:
    """Epsilon of a Gaussian mechanism with mu = sensitivity / std (Balle and Wang 2018, Thm. 8)."""
    def gap(eps):
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2) - delta
    return optimize.brentq(gap, 0, 100)


def test_epsilon_per_round_grows_and_matches_the_accountant(tmp_path):
    g = {"w": np.zeros(50, np.float32)}
    z, delta = 1.2, 1e-5
    agg = dp(tmp_path, clip=1.0, noise_multiplier=z, delta=delta, seed=2)
    spent = []
    rs = np.random.default_rng(3)
    for number in (1, 2, 3):
        g = one_round(agg, g, {s: {"w": rs.normal(0, 1, 50)} for s in SITES}, tmp_path, number)
        record = agg.round_privacy
        assert record["rounds"] == number and record["delta"] == delta
        library = PRVAccountant(prvs=[GaussianMechanism(z)], max_self_compositions=[number],
                                eps_error=EPS_ERROR, delta_error=delta * 1e-3).compute_epsilon(delta, [number])
        assert record["epsilon"] == pytest.approx(library[2], rel=1e-9)
        # r rounds of noise z compose to one Gaussian mechanism with mu = sqrt(r) / z
        assert library[0] - 1e-6 <= analytic_epsilon(math.sqrt(number) / z, delta) <= library[2] + 1e-6
        spent.append(record["epsilon"])
    assert spent[0] < spent[1] < spent[2]
    assert epsilon_spent(z, 3, delta) == spent[2]


def test_adaptive_clipping_moves_the_clip_toward_the_target_quantile(tmp_path):
    g = {"w": np.zeros(8, np.float32)}
    norms = [1.0, 2.0, 3.0, 4.0, 5.0]
    sites = [f"s{i}" for i in range(5)]
    unit = np.ones(8) / math.sqrt(8)
    updates = {s: {"w": unit * n} for s, n in zip(sites, norms)}
    adaptive = {"target_quantile": 0.5, "learning_rate": 0.2, "count_noise_std": 0.0}
    for start, moves in ((0.1, "up"), (100.0, "down")):
        agg = dp(tmp_path, clip=start, noise_multiplier=0.0, adaptive=adaptive)
        clips = [start]
        for number in range(1, 41):
            one_round(agg, g, updates, tmp_path, number)
            clips.append(agg.clip)
            assert agg.round_privacy["next_clip"] == agg.clip
        # the geometric step of Andrew et al.: clip * exp(-lr * (unclipped fraction - target))
        first_fraction = sum(n <= start for n in norms) / 5
        assert clips[1] == pytest.approx(start * math.exp(-0.2 * (first_fraction - 0.5)))
        steps = np.diff(clips[:10])
        assert (steps > 0).all() if moves == "up" else (steps < 0).all()
        assert 2.0 <= clips[-1] <= 4.0, f"the clip settles around the median norm 3: {clips[-5:]}"


def test_adaptive_clipping_shares_the_round_noise_with_the_count():
    settings = CentralDPSettings.from_dict(
        {"clip": 1.0, "noise_multiplier": 1.0, "adaptive": {"count_noise_std": 2.0}})
    # 1 / z^2 = 1 / z_updates^2 + 1 / (2 sigma_b)^2
    assert settings.update_noise_multiplier**-2 + (2 * 2.0) ** -2 == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"count_noise_std must be more than noise_multiplier / 2"):
        CentralDPSettings.from_dict({"clip": 1.0, "noise_multiplier": 1.0, "adaptive": {"count_noise_std": 0.4}})


def test_clip_and_rounds_survive_a_resume(tmp_path):
    g = {"w": np.zeros(8, np.float32)}
    settings = {"clip": 0.5, "noise_multiplier": 1.0, "seed": 4,
                "adaptive": {"target_quantile": 0.9, "learning_rate": 0.5, "count_noise_std": 1.0}}
    first = dp(tmp_path, **settings)
    g = one_round(first, g, {s: {"w": np.full(8, 0.3)} for s in SITES}, tmp_path, 1)
    tensors, meta = first.state()
    resumed = dp(tmp_path, **settings)
    resumed.load_state(tensors, meta)
    assert (resumed.clip, resumed.rounds) == (first.clip, 1) and first.clip != 0.5
    one_round(resumed, g, {s: {"w": np.full(8, 0.3)} for s in SITES}, tmp_path, 2)
    assert resumed.round_privacy["rounds"] == 2 and resumed.round_privacy["epsilon"] == epsilon_spent(1.0, 2, 1e-5)


def test_central_dp_is_checked_before_any_site_is_contacted():
    with pytest.raises(ValueError, match="central_dp needs a mean-based aggregator"):
        with_central_dp(make_aggregator("median"), {"clip": 1.0, "noise_multiplier": 1.0})
    base = dict(federation="f", run_id="r", app_name="a", sites=("s1", "s2"), num_rounds=1, min_clients=1)
    with pytest.raises(ValueError, match=r"central_dp: 'noise_multiplier' is required"):
        RunSpec(**base, central_dp={"clip": 1.0})
    with pytest.raises(ValueError, match=r"central_dp: delta must be in \(0, 1\)"):
        RunSpec(**base, central_dp={"clip": 1.0, "noise_multiplier": 1.0, "delta": 2})
    plain = RunSpec(**base)
    assert RunSpec(**base, central_dp={"clip": 1.0, "noise_multiplier": 1.0}).config_hash != plain.config_hash
    # a run without central DP keeps the hash it had before the setting existed
    import hashlib
    import json
    from dataclasses import asdict

    later = ("central_dp", "num_processes")  # settings added since; unset, they leave the hash alone
    doc = {k: v for k, v in asdict(plain).items() if k not in ("run_id", "connect_grace", "status_poll_interval", *later)}
    doc["round_configs"] = {}
    assert plain.config_hash == hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def test_operator_refuses_a_bad_central_dp_at_parse_time():
    from flare_provider.operators.scatter_gather import ScatterGatherOperator

    with pytest.raises(ValueError, match=r"central_dp: unknown key\(s\) \['sigma'\]"):
        ScatterGatherOperator(task_id="train", app_name="digits", central_dp={"clip": 1.0, "noise_multiplier": 1.0, "sigma": 2})
    op = ScatterGatherOperator(task_id="train2", app_name="digits", central_dp={"clip": 1.0, "noise_multiplier": 1.0})
    assert op.central_dp == {"clip": 1.0, "noise_multiplier": 1.0}
