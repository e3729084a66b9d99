"""A local federation whose sites set privacy filters: real agents (mutual TLS on loopback)
training the digits app with real PyTorch, as in ``tests/federation`` (``poc.prepare``).

- site-1 keeps the bias of the last layer home: ``exclude_vars: {names: [2.bias]}``;
- site-2 keeps it home by pattern and sends the rest clipped with Gaussian noise
  (``clip: 0.05, noise_multiplier: 2.0``, per-value std 0.1), a fixed seed so that the
  statistical checks are reproducible.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import yaml

from flare_provider.poc import prepare
from flare_provider.wire.tensors import save_file
from site_agent.service.audit import AUDIT_FILE, read_audit_log
from site_agent.site_settings import load_site_settings

REPO = Path(__file__).resolve().parents[2]
DIGITS_APP = REPO / "examples" / "apps" / "digits"
SITE_PRIVACY = {
    "site-1": {"exclude_vars": {"names": ["2.bias"]}},
    "site-2": {"exclude_vars": {"patterns": [r"2\.b.*"]}, "gaussian": {"clip": 0.05, "noise_multiplier": 2.0}, "seed": 7},
}
NOISE_STD = {"site-2": 0.1}  # noise_multiplier * clip


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    """Two sites with their filters in ``local/site.yaml``, agents running, digits deployed."""
    federation = prepare(tmp_path_factory.mktemp("privacy"), f"privacy_{uuid.uuid4().hex[:6]}", 2)
    for site, privacy in SITE_PRIVACY.items():
        federation.set_site_settings(site, privacy=privacy)
    try:
        federation.start_agents()
        federation.deploy_app(DIGITS_APP)
        yield federation
    finally:
        federation.stop_agents()


@pytest.fixture(scope="module")
def digits_app() -> dict:
    return yaml.safe_load((DIGITS_APP / "app.yaml").read_text())


@pytest.fixture(scope="module")
def initial_model(tmp_path_factory, digits_app) -> Path:
    """The digits app's seeded initial model, built with its own trainer."""
    from site_agent.trainers.pytorch import ClassifierTrainer

    weights = ClassifierTrainer(**digits_app["trainer"]["args"]).initial_weights()
    path = tmp_path_factory.mktemp("initial") / "digits.safetensors"
    save_file({k: v.numpy() for k, v in weights.items()}, path)
    return path


@pytest.fixture
def audit_log(fed):
    """``audit_log(site)``: the entries of the site agent's audit log."""

    def read(site: str) -> list[dict]:
        return read_audit_log(load_site_settings(fed.kits[site]).work_dir / AUDIT_FILE)

    return read
