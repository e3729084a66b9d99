"""The site's privacy filters on known inputs, and the policy merge: the site sets the floor.

No agent here: each filter's documented behaviour, checked exactly where it is exact and
statistically (fixed seeds, wide tolerances) where it draws noise.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from site_agent.errors import SettingsError
from site_agent.privacy import PrivacyConfigError, parse_policy, tighten
from site_agent.privacy.apply import filter_update, privacy_record, task_rng
from site_agent.privacy.gaussian import GaussianFilter
from site_agent.privacy.percentile import PercentileFilter
from site_agent.privacy.svt import SVTFilter
from site_agent.site_settings import parse_site_settings


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---- percentile -----------------------------------------------------------------------


def test_percentile_keeps_the_largest_changes_clipped_to_gamma():
    values = np.arange(1, 101, dtype=np.float64) * np.where(np.arange(100) % 2, -1.0, 1.0)  # +-1..100
    deltas = {"a": values[:60].reshape(6, 10).copy(), "b": values[60:].copy()}
    PercentileFilter(percentile=50, gamma=60).apply(deltas, rng())
    out = np.concatenate([deltas["a"].reshape(-1), deltas["b"]])
    cutoff = np.percentile(np.abs(values), 50)  # 50.5
    expected = np.where(np.abs(values) <= cutoff, 0.0, np.clip(values, -60, 60))
    np.testing.assert_array_equal(out, expected)
    assert np.count_nonzero(out) == 50 and np.abs(out).max() == 60
    assert deltas["a"].shape == (6, 10), "tensors keep their shapes"


def test_percentile_parameters_are_checked():
    with pytest.raises(PrivacyConfigError, match=r"percentile\.percentile must be in \(0, 100\)"):
        PercentileFilter(percentile=100, gamma=1)
    with pytest.raises(PrivacyConfigError, match=r"percentile\.gamma must be > 0"):
        PercentileFilter(percentile=10, gamma=0)


# ---- sparse vector technique ---------------------------------------------------------


def test_svt_without_noise_releases_the_changes_above_tau_clipped():
    # A huge epsilon makes every Laplace draw negligible: the choice is the threshold's alone.
    values = np.zeros(20)
    values[[2, 7, 11]] = [0.5, -3.0, 0.8]  # above tau = 0.4; the rest below
    values[[1, 4]] = [0.1, -0.3]
    deltas = {"w": values.copy()}
    SVTFilter(fraction=0.25, epsilon=1e12, tau=0.4, gamma=1.0).apply(deltas, rng(1))  # c = 5
    expected = np.zeros(20)
    expected[[2, 7, 11]] = [0.5, -1.0, 0.8]
    np.testing.assert_allclose(deltas["w"], expected, atol=1e-9)


def test_svt_releases_at_most_its_budget():
    values = np.linspace(1.0, 2.0, 40)  # all above tau
    filt = SVTFilter(fraction=0.1, epsilon=1e12, tau=0.5, gamma=1.5)
    deltas = {"w": values.copy()}
    filt.apply(deltas, rng(2))
    released = np.flatnonzero(deltas["w"])
    assert filt.budget(40) == 4 and released.size == 4
    np.testing.assert_allclose(deltas["w"][released], np.minimum(values[released], 1.5), atol=1e-9)
    # the choice among equals follows the random scan order, not the position in the model
    other = {"w": values.copy()}
    filt.apply(other, rng(3))
    assert set(np.flatnonzero(other["w"])) != set(released)


def test_svt_with_a_real_budget_stays_within_its_bounds():
    values = rng(4).normal(0, 0.01, 5000)
    deltas = {"w": values.copy()}
    filt = SVTFilter(fraction=0.02, epsilon=1.0, tau=0.001, gamma=0.005)
    filt.apply(deltas, rng(5))
    out = deltas["w"]
    assert 0 < np.count_nonzero(out) <= filt.budget(5000) == 100
    assert np.abs(out).max() <= 0.005


# ---- Gaussian (local DP) ----------------------------------------------------------------


def test_gaussian_noise_has_the_documented_scale():
    """With a zero update the output is the noise: N(0, (noise_multiplier * clip)^2) per value."""
    filt = GaussianFilter(clip=0.5, noise_multiplier=1.5)
    deltas = {"a": np.zeros((100, 100)), "b": np.zeros(10_000)}
    filt.apply(deltas, rng(6))
    noise = np.concatenate([deltas["a"].reshape(-1), deltas["b"]])
    sigma = 0.75
    assert filt.noise_std == sigma
    assert stats.kstest(noise, "norm", args=(0, sigma)).pvalue > 1e-3
    # chi-square on the variance: (n - 1) s^2 / sigma^2 ~ chi2(n - 1), two-sided at 1e-4
    n = noise.size
    statistic = (n - 1) * noise.var(ddof=1) / sigma**2
    assert stats.chi2.ppf(5e-5, n - 1) < statistic < stats.chi2.ppf(1 - 5e-5, n - 1)
    # a scale 10% off is far outside that interval: the test can tell
    assert not stats.chi2.ppf(5e-5, n - 1) < (n - 1) * noise.var(ddof=1) / (1.1 * sigma) ** 2


def test_gaussian_clips_the_whole_update_to_its_norm():
    deltas = {"a": np.full(300, 1.0), "b": np.full((10, 10), -2.0)}  # norm sqrt(300 + 400) ~ 26
    GaussianFilter(clip=1.0, noise_multiplier=1e-12).apply(deltas, rng(7))
    flat = np.concatenate([deltas["a"], deltas["b"].reshape(-1)])
    assert np.linalg.norm(flat) == pytest.approx(1.0, abs=1e-6)
    assert flat[0] / flat[-1] == pytest.approx(-0.5), "clipping scales, it keeps the direction"


# ---- exclusion and the result as a whole ------------------------------------------------------


def test_excluded_and_integer_tensors_stay_home():
    sent = {"fc.weight": np.ones((2, 3), np.float32), "fc.bias": np.zeros(2, np.float32),
            "bn.count": np.array(5, np.int64), "scaffold.dc/fc.bias": np.zeros(2, np.float32)}
    trained = {"fc.weight": np.full((2, 3), 3.0, np.float32), "fc.bias": np.full(2, 7.0, np.float32),
               "bn.count": np.array(9, np.int64), "scaffold.dc/fc.bias": np.full(2, 0.25, np.float32)}
    policy = parse_policy({"exclude_vars": {"patterns": [r"fc\.b.*"]}, "gaussian": {"clip": 1e3, "noise_multiplier": 1e-9}})
    out, held = filter_update(policy, sent, trained, False, rng(8))
    np.testing.assert_array_equal(out["fc.bias"], sent["fc.bias"])  # what the site received
    np.testing.assert_array_equal(out["scaffold.dc/fc.bias"], 0)  # a change of an excluded tensor: none
    assert out["bn.count"] == 5 and out["bn.count"].dtype == np.int64  # integer: no calibrated noise possible
    np.testing.assert_allclose(out["fc.weight"], 3.0, atol=1e-3)  # trained, noise negligible
    assert out["fc.weight"].dtype == np.float32
    assert held == {"exclude_vars": ["fc.bias", "scaffold.dc/fc.bias"], "not_float": ["bn.count"]}
    record = privacy_record(policy, [], held)
    assert [a["filter"] for a in record["applied"]] == ["exclude_vars", "gaussian"]
    assert record["applied"][0]["excluded"] == ["fc.bias", "scaffold.dc/fc.bias"] and record["kept_home"] == ["bn.count"]
    # a difference result: the excluded tensor's change is zero
    diff, _ = filter_update(policy, sent, {"fc.weight": trained["fc.weight"] - 1, "fc.bias": trained["fc.bias"]}, True, rng(8))
    np.testing.assert_array_equal(diff["fc.bias"], 0)


def test_no_policy_leaves_the_result_as_it_is():
    weights = {"w": np.arange(4.0)}
    out, held = filter_update(parse_policy(None), {"w": np.zeros(4)}, weights, False, rng())
    assert out["w"] is weights["w"] and held == {}


def test_noise_streams_are_per_task_and_reproducible_only_with_a_site_seed():
    seeded = parse_policy({"seed": 3, "gaussian": {"clip": 1, "noise_multiplier": 1}})
    a, b = task_rng(seeded, "t1").normal(size=4), task_rng(seeded, "t1").normal(size=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, task_rng(seeded, "t2").normal(size=4))
    unseeded = parse_policy({"gaussian": {"clip": 1, "noise_multiplier": 1}})
    assert not np.array_equal(task_rng(unseeded, "t1").normal(size=4), task_rng(unseeded, "t1").normal(size=4))


# ---- the policy: the site's floor, a request may only tighten ---------------------------------------

SITE = {"exclude_vars": {"names": ["fc.bias"]}, "gaussian": {"clip": 1.0, "noise_multiplier": 1.0},
        "percentile": {"percentile": 80, "gamma": 0.1}}


def test_a_request_tightens_and_adds():
    policy, refused = tighten(parse_policy(SITE), {
        "exclude_vars": {"patterns": ["conv.*"]},
        "gaussian": {"noise_multiplier": 2.0, "clip": 0.5},
        "svt": {"fraction": 0.1, "epsilon": 1.0, "tau": 0.0, "gamma": 0.01},
    }, "task", "task config: privacy")
    assert refused == []
    assert policy.filters["exclude_vars"].params() == {"names": ["fc.bias"], "patterns": ["conv.*"]}
    assert policy.filters["gaussian"].params() == {"clip": 0.5, "noise_multiplier": 2.0}
    assert policy.sources["gaussian"] == ("site", "task") and policy.sources["svt"] == ("task",)
    assert [f.family for f in policy.ordered()] == ["exclude_vars", "percentile", "svt", "gaussian"]


def test_a_request_to_drop_or_loosen_is_refused_and_the_site_setting_stays():
    site = parse_policy({**SITE, "seed": 5})
    policy, refused = tighten(site, {
        "exclude_vars": None, "percentile": False,
        "gaussian": {"noise_multiplier": 0.1, "clip": 3.0}, "seed": 1,
    }, "task", "task config: privacy")
    assert policy.filters == site.filters and policy.seed == 5
    assert len(refused) == 5
    joined = "\n".join(refused)
    for text in ("dropping the site's 'exclude_vars'", "dropping the site's 'percentile'",
                 "gaussian.noise_multiplier = 0.1 is looser than the site's 1.0",
                 "gaussian.clip = 3.0 is looser than the site's 1.0", "seed is the site's alone"):
        assert text in joined
    assert all(r.startswith("task config: privacy: ") for r in refused)


def test_a_mixed_request_keeps_the_stricter_of_each_parameter():
    policy, refused = tighten(parse_policy(SITE), {"percentile": {"percentile": 95, "gamma": 0.5}}, "app", "app.yaml: privacy")
    assert policy.filters["percentile"].params() == {"percentile": 95.0, "gamma": 0.1}
    assert refused == ["app.yaml: privacy: percentile.gamma = 0.5 is looser than the site's 0.1; the site's value stays"]


@pytest.mark.parametrize("request_doc, message", [
    ({"blur": {}}, r"task config: privacy: unknown filter\(s\) \['blur'\]"),
    ({"gaussian": {"sigma": 3}}, r"'gaussian' has no parameter\(s\) \['sigma'\]"),
    ({"gaussian": {"noise_multiplier": -1}}, r"gaussian\.noise_multiplier must be > 0"),
    ({"svt": {"fraction": 0.1}}, r"'svt' takes exactly .*missing \['epsilon', 'gamma', 'tau'\]"),
    ({"exclude_vars": {"patterns": ["("]}}, r"not a regular expression"),
    ("strict please", r"expected a mapping of filters"),
])
def test_a_malformed_request_is_an_error_naming_it(request_doc, message):
    with pytest.raises(PrivacyConfigError, match=message):
        tighten(parse_policy(SITE), request_doc, "task", "task config: privacy")


def test_site_yaml_privacy_is_parsed_and_bad_values_name_the_file(tmp_path):
    doc = {"data_dir": "data", "work_dir": "work", "privacy": {**SITE, "seed": 11}}
    settings = parse_site_settings(doc, tmp_path, source="kit/local/site.yaml")
    assert settings.privacy.to_dict() == parse_policy(settings.privacy.to_dict()).to_dict()
    assert settings.privacy.seed == 11 and set(settings.privacy.filters) == {"exclude_vars", "gaussian", "percentile"}
    assert not parse_site_settings({"data_dir": "d", "work_dir": "w"}, tmp_path).privacy
    bad = {"data_dir": "data", "work_dir": "work", "privacy": {"gaussian": {"clip": "big", "noise_multiplier": 1}}}
    with pytest.raises(SettingsError, match=r"kit/local/site.yaml: privacy: gaussian\.clip must be a finite number"):
        parse_site_settings(bad, tmp_path, source="kit/local/site.yaml")
    with pytest.raises(SettingsError, match=r"site.yaml: privacy: unknown filter\(s\) \['noise'\]"):
        parse_site_settings({"data_dir": "d", "work_dir": "w", "privacy": {"noise": 1}}, tmp_path)
