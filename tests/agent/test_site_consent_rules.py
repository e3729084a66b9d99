"""The site's consent rules on their own: ``custom_code`` and ``python`` in site.yaml, how a
version is judged, and the data-check verdict on the sites' summaries (no agents needed;
tests/federation/test_site_consent.py runs them through real agents and Airflow)."""

from __future__ import annotations

import pytest

from flare_provider.federation.data_check import DataCheck, check_problems, judge
from flare_provider.wire.app_config import parse_app_config
from flare_provider.wire.bundles import BundleError
from site_agent.consent.policy import ALLOWED, PENDING, REFUSED, REJECTED, decide
from site_agent.errors import SettingsError
from site_agent.site_settings import parse_site_settings

V1, V2 = "a" * 64, "b" * 64
BASE = {"data_dir": "d", "work_dir": "w"}


def settings(tmp_path, **extra):
    return parse_site_settings({**BASE, **extra}, tmp_path, source="site.yaml")


def test_custom_code_settings(tmp_path):
    policy = settings(tmp_path, custom_code={"allow": [{"app": "cnn", "version": V1}], "signers": ["airflow-server"],
                                             "require_approval": True}).custom_code
    assert (policy.configured, policy.require_approval, policy.signers) == (True, True, ("airflow-server",))
    assert settings(tmp_path, allow_custom_code=True).custom_code.allow_all
    # a provisioned site.yaml says allow_custom_code: false; custom_code is added beside it
    assert settings(tmp_path, allow_custom_code=False, custom_code={"require_approval": True}).custom_code.require_approval
    assert not settings(tmp_path).custom_code.may_run_any


@pytest.mark.parametrize(("extra", "message"), [
    ({"allow_custom_code": True, "custom_code": {}}, "give either allow_custom_code: true .* or custom_code"),
    ({"custom_code": ["cnn"]}, "custom_code must be a mapping"),
    ({"custom_code": {"approve": True}}, r"unknown key\(s\) \['approve'\]"),
    ({"custom_code": {"allow": [{"app": "cnn"}]}}, r"custom_code.allow\[0\] must be \{app: NAME, version: DIGEST\}"),
    ({"custom_code": {"allow": [{"app": "cnn", "version": "abc"}]}}, "full version digest"),
    ({"custom_code": {"allow": [{"app": "../x", "version": V1}]}}, r"allow\[0\].app must be an app name"),
    ({"custom_code": {"signers": "airflow-server"}}, "signers must be a list of server participant names"),
    ({"custom_code": {"require_approval": "yes"}}, "require_approval must be true or false"),
    ({"python": "/no/such/python"}, "'python' must name a Python interpreter"),
])
def test_bad_consent_settings_name_the_field(tmp_path, extra, message):
    with pytest.raises(SettingsError, match=message) as caught:
        settings(tmp_path, **extra)
    assert str(caught.value).startswith("site.yaml: ")


def test_how_a_version_is_judged(tmp_path):
    listed = settings(tmp_path, custom_code={"allow": [{"app": "cnn", "version": V1}], "signers": ["srv-2"]}).custom_code
    held = settings(tmp_path, custom_code={"require_approval": True}).custom_code
    closed = settings(tmp_path).custom_code

    def status(policy, version=V1, signer="srv-1", custom=True, decision=None):
        return decide(policy, "cnn", version, signer, custom, decision, "site-a").status

    assert status(closed, custom=False) == ALLOWED  # built-in trainers always run
    assert status(closed) == REFUSED
    assert status(listed) == ALLOWED and status(listed, V2) == REFUSED and status(listed, V2, "srv-2") == ALLOWED
    assert status(held, V2) == PENDING
    assert status(held, V2, decision={"decision": "approved", "by": "it"}) == ALLOWED
    assert status(listed, decision={"decision": "rejected", "by": "it"}) == REJECTED  # the operator's no wins
    reason = decide(listed, "cnn", V2, "srv-1", True, None, "site-a").reason
    assert "not in custom_code.allow" in reason and "'srv-1' is not in custom_code.signers" in reason


def test_app_requirements_are_checked_when_the_app_is_read():
    config = parse_app_config("name: a\ntrainer: {path: m.T}\nrequirements: ['scikit-learn>=1.3', \"x; os_name == 'nt'\"]\n")
    assert config.requirements == ("scikit-learn>=1.3", "x; os_name == 'nt'")
    with pytest.raises(BundleError, match="requirement 'scikit learn' is not valid"):
        parse_app_config("name: a\ntrainer: {path: m.T}\nrequirements: ['scikit learn']\n")
    with pytest.raises(BundleError, match="'requirements' must be a list"):
        parse_app_config("name: a\ntrainer: {path: m.T}\nrequirements: scikit-learn\n")


def test_data_check_verdict():
    check = DataCheck.from_argument({"schema": "equal", "min_samples": 100})
    same = {"x": {"shape": [64]}, "y": {"shape": []}}
    summaries = {"a": {"num_samples": 200, "schema": same}, "b": {"num_samples": 150, "schema": same},
                 "c": {"num_samples": 90, "schema": {"x": {"shape": [63]}, "label": {}}}}
    assert judge(check, summaries, {"d": "ended failed: no describe()"}) == [
        "d: no data summary (ended failed: no describe())",
        "c: 90 samples, fewer than min_samples=100",
        "c: schema differs from a, b's: y missing; label not expected; x.shape is [63] where expected [64]",
    ]
    assert judge(check, {k: v for k, v in summaries.items() if k != "c"}, {}) == []
    assert DataCheck.from_argument(None) is None
    assert check_problems({"schema": "same"}) == ["check_data: schema must be one of ['equal'] (or left out), got 'same'"]
    assert "min_samples must be a whole number" in check_problems({"min_samples": -1})[0]
