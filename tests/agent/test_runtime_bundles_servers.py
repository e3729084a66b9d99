"""With several server participants (HA), each is the server identity: bundles and calls from any of them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from runtime_support import EXAMPLE_APPS, REPO, kit_identity

from flare_provider.provisioning import load_project, provision
from flare_provider.provisioning.certs import PeerIdentity, describe_certificate
from flare_provider.wire.bundles import BundleError, build_bundle
from site_agent.kit_config import ConfigError, load_agent_config
from site_agent.runtime.app_store import AppStore
from site_agent.service.auth import Action, Policy

ADMIN = "admin@lead-lab.example"


@pytest.fixture(scope="module")
def kits(tmp_path_factory) -> dict[str, Path]:
    return provision(load_project(REPO / "examples" / "project-ha.yml"), tmp_path_factory.mktemp("ha")).kits


def bundle_by(kits: dict[str, Path], signer: str, folder: Path) -> Path:
    identity = kit_identity(kits[signer], signer)
    path = folder / f"digits-by-{signer}.zip"
    path.write_bytes(build_bundle(EXAMPLE_APPS / "digits", identity.cert_pem, identity.key_pem))
    return path


def site_store(kits: dict[str, Path], root: Path, servers=None) -> AppStore:
    """site-1's app store, trusting the servers its agent.json names (or ``servers``)."""
    config = load_agent_config(kits["site-1"])
    return AppStore(root, config.root_ca_file.read_bytes(), config.servers if servers is None else servers)


@pytest.mark.parametrize("signer", ["server1", "server2"])
def test_a_bundle_signed_by_either_server_is_deployed(kits, tmp_path, signer):
    store = site_store(kits, tmp_path / "apps")
    info, created = store.deploy(bundle_by(kits, signer, tmp_path))
    assert created and info.name == "digits"
    record = json.loads((info.path.parent / "deployment.json").read_text())
    assert record["signer"] == signer


@pytest.mark.parametrize("signer, kind", [(ADMIN, "admin"), ("site-2", "client")])
def test_a_bundle_signed_by_no_server_is_refused(kits, tmp_path, signer, kind):
    store = site_store(kits, tmp_path / "apps")
    refusal = f"signed by '{signer}' \\({kind}\\), not by a server identity .*'server1', 'server2'"
    with pytest.raises(BundleError, match=refusal):
        store.deploy(bundle_by(kits, signer, tmp_path))
    assert store.list() == []


def test_a_store_that_knows_one_server_refuses_the_other(kits, tmp_path):
    store = site_store(kits, tmp_path / "apps", servers="server1")  # as an agent with a kit from before HA
    with pytest.raises(BundleError, match="signed by 'server2'"):
        store.deploy(bundle_by(kits, "server2", tmp_path))


def peer(kits: dict[str, Path], name: str) -> PeerIdentity:
    return describe_certificate(kit_identity(kits[name], name).cert)


def test_the_policy_lets_every_server_deploy_and_no_one_else(kits):
    policy = Policy(server_names=frozenset(load_agent_config(kits["site-1"]).servers), site_org="hospital_a")
    for server in ("server1", "server2"):
        assert policy.decide(peer(kits, server), Action.DEPLOY).allowed
        assert not policy.decide(peer(kits, server), Action.SHUTDOWN).allowed
    impostor = PeerIdentity(name="server3", org="lead_lab", kind="server", role=None)
    refused = policy.decide(impostor, Action.SUBMIT)
    assert not refused.allowed and "'server1', 'server2'" in refused.reason
    assert not policy.decide(peer(kits, ADMIN), Action.DEPLOY).allowed
    # One name is one server, never the set of its letters.
    assert not Policy(server_names="server1", site_org="o").decide(
        PeerIdentity(name="s", org="o", kind="server", role=None), Action.STATUS
    ).allowed


def edited_kit(kits: dict[str, Path], tmp_path: Path, edit) -> Path:
    kit = Path(shutil.copytree(kits["site-1"], tmp_path / "site-1"))
    config = kit / "startup" / "agent.json"
    doc = json.loads(config.read_text())
    edit(doc)
    config.write_text(json.dumps(doc))
    return kit


def test_an_agent_json_without_servers_means_its_one_server(kits, tmp_path):
    kit = edited_kit(kits, tmp_path, lambda doc: doc.pop("servers"))
    assert load_agent_config(kit).servers == ("server1",)


@pytest.mark.parametrize("servers, message", [
    ([], "'servers' must be a non-empty list"),
    ("server1", "'servers' must be a non-empty list"),
    (["server2"], "'server' ('server1') must be one of 'servers'"),
])
def test_bad_servers_in_agent_json_are_named(kits, tmp_path, servers, message):
    kit = edited_kit(kits, tmp_path, lambda doc: doc.update(servers=servers))
    with pytest.raises(ConfigError) as excinfo:
        load_agent_config(kit)
    assert "agent.json" in str(excinfo.value) and message in str(excinfo.value)
