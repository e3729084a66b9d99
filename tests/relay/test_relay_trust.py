"""Who may do what at a relay, and what a relay can see: refusals, and no plaintext in what it copies."""

from __future__ import annotations

import asyncio
import ssl

import numpy as np
import pytest
from relay_support import RELAYS, InProcessRelay, attached, relay_endpoint, run_rounds, server_identity, wait_attached

from flare_provider.client import load_caller_kit
from flare_provider.poc import prepare
from flare_provider.provisioning.certs import issue_certificate
from flare_provider.provisioning.project import Participant
from flare_provider.provisioning.workspace import Workspace
from flare_provider.relay.dial import connect_socket, dial_relay, join_path
from flare_provider.relay.protocol import RelayProtocolError, read_message_from, send_message
from flare_provider.relay.tls import TlsIdentity
from flare_provider.wire.tensors import load_file


def site_identity(fed, site: str) -> TlsIdentity:
    startup = fed.kits[site] / "startup"
    return TlsIdentity((startup / f"{site}.crt").read_bytes(), (startup / f"{site}.key").read_bytes(),
                       (startup / "rootCA.pem").read_bytes())


def project_root(fed):
    workspace = Workspace(fed.root / "workspace", fed.name)
    root, _ = workspace.load_state()
    return root


def issued(fed, participant: Participant) -> TlsIdentity:
    """A certificate of the project's own root CA, for a participant provisioning would not make."""
    root = project_root(fed)
    identity = issue_certificate(root, participant)
    return TlsIdentity(identity.cert_pem, identity.key_pem, root.cert_pem)


def ask(fed, identity: TlsIdentity, hello: dict, server: str = RELAYS[0]):
    async def go():
        reader, writer, reply = await dial_relay(relay_endpoint(fed, server), identity.context(server_side=False), hello)
        writer.close()
        return reply

    return asyncio.run(go())


@pytest.mark.parametrize(
    "who, hello, refusal",
    [
        ("site-1", {"op": "attach", "site": "site-2"}, "client 'site-1' may not attach as site 'site-2'"),
        ("site-1", {"op": "open", "site": "site-2"}, "client 'site-1' (role None) may not open paths to sites"),
        ("site-1", {"op": "status"}, "may not open paths to sites"),
        ("roleless-admin", {"op": "open", "site": "site-1"}, "admin 'nobody@lab' (role None) may not open paths"),
        ("site-1", {"op": "data", "conn": "1-guess"}, "no path '1-guess' is waiting"),
        ("site-1", {"op": "launch"}, "unknown request 'launch'"),
    ],
)
def test_refused_with_a_reason_and_nothing_changes(relayed, who, hello, refusal):
    before = set(wait_attached(relayed, RELAYS[0], relayed.sites))
    identity = (issued(relayed, Participant("nobody@lab", "admin", "lab")) if who == "roleless-admin"
                else site_identity(relayed, who))
    with pytest.raises(RelayProtocolError, match=refusal.replace("(", r"\(").replace(")", r"\)")):
        ask(relayed, identity, hello)
    assert set(attached(relayed, RELAYS[0])) == before  # site-2 is still attached, as itself


def plain_line(fed, line: dict, server: str = RELAYS[0]) -> dict:
    """What a relay answers a plain (non-TLS) connection that opens with ``line``."""

    async def go():
        sock = await connect_socket(relay_endpoint(fed, server))
        try:
            await send_message(sock, line)
            return await read_message_from(sock)
        finally:
            sock.close()

    return asyncio.run(go())


@pytest.mark.parametrize(
    "line, refusal",
    [
        ({"op": "join", "token": "made-up"}, "no path is waiting for this token"),
        ({"op": "join"}, "no path is waiting for this token"),
        ({"op": "attach", "site": "site-1"}, "a plain connection may only join a path, not 'attach'"),
        ({"op": "open", "site": "site-1"}, "a plain connection may only join a path, not 'open'"),
    ],
)
def test_a_plain_connection_without_a_valid_token_gets_nothing(relayed, line, refusal):
    before = set(wait_attached(relayed, RELAYS[0], relayed.sites))
    reply = plain_line(relayed, line)
    assert reply["ok"] is False and refusal in reply["error"]
    assert set(attached(relayed, RELAYS[0])) == before


def test_a_path_token_is_good_for_one_join_only(relayed):
    wait_attached(relayed, RELAYS[0], relayed.sites)
    relay, identity = relay_endpoint(relayed, RELAYS[0]), server_identity(relayed)

    async def go():
        _, writer, reply = await dial_relay(relay, identity.context(server_side=False), {"op": "open", "site": "site-1"})
        writer.close()
        first = await join_path(relay, reply["token"])  # the site joined its end: a path to site-1's agent
        try:
            with pytest.raises(RelayProtocolError, match="no path is waiting for this token"):
                await join_path(relay, reply["token"])
        finally:
            first.close()

    asyncio.run(go())


def test_a_certificate_of_another_project_gets_nothing(relayed, tmp_path):
    other = prepare(tmp_path / "other", "other_project", 1, digits_data=False, connect="outbound")
    stranger = site_identity(other, "site-1")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        ask(relayed, stranger, {"op": "attach", "site": "site-1"})
    # ... and a relay of another project is not taken for ours by the server identity either.
    with pytest.raises((ssl.SSLError, ConnectionError)):
        ask(other, server_identity(relayed), {"op": "status"}, server="airflow-server")
    assert set(attached(relayed, RELAYS[0])) == set(relayed.sites)


def test_an_admin_with_a_role_may_ask_for_status(relayed):
    kit = load_caller_kit(relayed.admin_kit)
    reply = ask(relayed, TlsIdentity(kit.cert_pem, kit.key_pem, kit.root_ca_pem), {"op": "status"})
    assert {s["site"] for s in reply["sites"]} == set(relayed.sites)


def test_a_relay_copies_only_ciphertext(relayed, tmp_path):
    """Every byte a relay copied during a round, searched for the model's own bytes."""
    port = relay_endpoint(relayed, RELAYS[1]).port
    relayed.relay(RELAYS[0]).stop()  # all paths through the second relay ...
    relayed.relay(RELAYS[1]).stop()
    relay = InProcessRelay(RELAYS[1], TlsIdentity(*_server_pems(relayed, RELAYS[1])), port)  # ... which runs here
    try:
        wait_attached(relayed, RELAYS[1], relayed.sites)
        progress = run_rounds(relayed, tmp_path)
    finally:
        relay.stop()
        for server in RELAYS:
            relayed.relay(server).start().wait_ready()
    assert progress.history[-1].accepted == list(relayed.sites)
    copied = b"".join(relay.copied)
    assert len(copied) > 2 * 4096 * 4 * len(relayed.sites)  # the model went out and came back through it
    sent = load_file(tmp_path / "initial.safetensors")["w"]
    returned = np.asarray(progress.weights["w"])
    for tensor in (sent, returned):
        needle = tensor[1000:1016].tobytes()  # 64 bytes of known values
        assert needle not in copied
    assert b"slow_plus_one" not in copied and b"safetensors" not in copied
    for site in relayed.sites:
        wait_attached(relayed, RELAYS[0], [site])


def _server_pems(fed, server: str) -> tuple[bytes, bytes, bytes]:
    startup = fed.kits[server] / "startup"
    return ((startup / f"{server}.crt").read_bytes(), (startup / f"{server}.key").read_bytes(),
            (startup / "rootCA.pem").read_bytes())

