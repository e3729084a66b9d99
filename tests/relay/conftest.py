"""Sites that dial out: three real agents attached to two real relay processes on loopback.

The sites open no port; the test reaches them as the Airflow side does, through the
relays, with the server kit's identity and end-to-end mutual TLS.
"""

from __future__ import annotations

import uuid

import pytest
from relay_support import APP

from flare_provider.poc import prepare


@pytest.fixture(scope="module")
def relayed(tmp_path_factory):
    fed = prepare(tmp_path_factory.mktemp("relayed"), f"relayed_{uuid.uuid4().hex[:6]}", 3,
                  digits_data=False, connect="outbound", num_relays=2)
    for site in fed.sites:
        # The test app brings its own code and imports numpy only.
        fed.set_site_settings(site, allow_custom_code=True, preload_modules=[])
        fed.data_dir(site).mkdir(exist_ok=True)
    fed.start_agents()
    fed.deploy_app(APP)
    yield fed
    fed.stop_agents()
