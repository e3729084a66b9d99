"""Real agents for the admin commands: two sites on loopback, four admins of different roles.

The agents are ``flare-agent start`` child processes with signed kits and mutual TLS; the
commands run as ``flare`` runs them (its ``main``), with each admin's own kit, so every
decision is the agent's, made from the certificate's role and org.
"""

from __future__ import annotations

import os
import uuid

import pytest
from admin_support import APP, allow_test_app

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from flare_provider.poc import prepare

# name: (org, role); site-N is of org org-site-N
ADMINS = {
    "boss@lead": ("lead", "project_admin"),
    "it@site-1": ("org-site-1", "org_admin"),
    "chief@site-2": ("org-site-2", "lead"),
    "viewer@site-1": ("org-site-1", "member"),
}


@pytest.fixture(scope="module")
def role_federation(tmp_path_factory):
    """Two listening sites with the test app deployed, and one kit per admin of :data:`ADMINS`."""
    fed = prepare(tmp_path_factory.mktemp("admin"), f"admin_{uuid.uuid4().hex[:6]}", 2, digits_data=False,
                  connect="listen", admins=ADMINS)
    allow_test_app(fed, fed.sites)
    fed.start_agents()
    fed.deploy_app(APP)
    yield fed
    fed.stop_agents()
