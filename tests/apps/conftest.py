"""Three real agents for the script-app tests: provisioned kits, mutual TLS through a relay on
loopback, non-IID digits data, custom code allowed at every site (a script is custom code),
and both digits apps deployed: the built-in trainer's and the training script's."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest

from flare_provider.poc import prepare

sys.path.insert(0, str(Path(__file__).parent))  # worker_support, imported by name

EXAMPLE_APPS = Path(__file__).resolve().parents[2] / "examples" / "apps"


@pytest.fixture(scope="module")
def script_federation(tmp_path_factory):
    federation = prepare(tmp_path_factory.mktemp("poc"), f"script_{uuid.uuid4().hex[:6]}", 3, connect="outbound")
    for site in federation.sites:
        federation.set_site_settings(site, allow_custom_code=True)
    try:
        federation.start_agents()
        for app in ("digits", "digits_script"):
            federation.deploy_app(EXAMPLE_APPS / app)
        yield federation
    finally:
        federation.stop_agents()
