"""The relay's first lines: whatever a peer sends, a refusal with a reason, and the relay keeps serving.

One real relay process (a poc federation's server kit) with one real site agent attached
to it. Hostile first lines arrive over TLS with the server's identity (an authenticated but
buggy or hostile caller) and over plain data connections (anyone who can reach the port);
after each, the relay still answers status and the site is still attached, as itself, from
the same attachment.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import uuid

import pytest
from hostile_support import hostile_text, hostile_values, json_safe
from hypothesis import example, given, settings
from hypothesis import strategies as st

from flare_provider.client import load_caller_kit
from flare_provider.poc import prepare
from flare_provider.relay.dial import connect_socket, dial_relay
from flare_provider.relay.protocol import MAX_LINE, RelayProtocolError, decode, read_message_from
from flare_provider.relay.tls import TlsIdentity

OPS = ["attach", "open", "status", "data", "join", "ping", "launch", "", None, 7, ["open"]]


@pytest.fixture(scope="module")
def relay_fed(tmp_path_factory):
    fed = prepare(tmp_path_factory.mktemp("relayprops"), f"relayprops_{uuid.uuid4().hex[:6]}", 1,
                  digits_data=False, connect="outbound")
    fed.set_site_settings("site-1", preload_modules=[])
    fed.data_dir("site-1").mkdir(exist_ok=True)
    fed.start_agents()
    kit = load_caller_kit(fed.server_kit)
    fed.endpoint = kit.relays[0]
    fed.identity = TlsIdentity(kit.cert_pem, kit.key_pem, kit.root_ca_pem)
    fed.attached_since = _status(fed)["site-1"]["since"]
    yield fed
    fed.stop_agents()


def _status(fed) -> dict[str, dict]:
    async def ask():
        _, writer, reply = await dial_relay(fed.endpoint, fed.identity.context(server_side=False), {"op": "status"})
        writer.close()
        return reply

    return {s["site"]: s for s in asyncio.run(ask())["sites"]}


def _still_serving(fed) -> None:
    sites = _status(fed)
    assert sites["site-1"]["since"] == fed.attached_since, "the site's attachment was cut or replaced"
    log = fed.relay().log_path.read_text(errors="replace")
    assert "Traceback" not in log and "exception was never retrieved" not in log, log[-2000:]


def _is_refusal(reply: dict) -> bool:
    return reply.get("ok") is False and isinstance(reply.get("error"), str) and reply["error"]


@settings(max_examples=200)
@given(st.binary(max_size=MAX_LINE + 20))
@example(b"")
@example(b"{}")
@example(b"[1]\n")
@example(b'{"op": "join"' + b" " * MAX_LINE + b"}\n")
def test_a_first_line_is_a_message_or_a_protocol_error(line):
    try:
        doc = decode(line)
    except RelayProtocolError as exc:
        assert str(exc)
    else:
        assert isinstance(doc, dict)


hello = st.fixed_dictionaries(
    {"op": st.sampled_from(OPS)},
    optional={"site": st.one_of(st.just("site-1"), hostile_values(3)), "conn": hostile_values(2),
              "token": hostile_values(2)},
).map(json_safe)


@settings(max_examples=30)
@given(hello)
@example({"op": "attach", "site": ["site-1"]})
@example({"op": "open", "site": {"site-1": 1}})
@example({"op": "data", "conn": [1]})
@example({"op": "attach", "site": "site-1"})  # a server identity attaching as a site
def test_an_authenticated_caller_gets_an_answer_for_any_first_line(relay_fed, hello):
    async def send():
        try:
            _, writer, reply = await dial_relay(relay_fed.endpoint, relay_fed.identity.context(server_side=False),
                                                hello)
        except RelayProtocolError as exc:
            return {"ok": False, "error": str(exc)}
        writer.close()
        return reply

    reply = asyncio.run(send())
    if reply.get("ok") is True:  # only what the server identity may do: status, or a path to the attached site
        assert hello["op"] in ("status", "open"), (hello, reply)
        assert hello["op"] == "status" or hello.get("site") == "site-1"
    else:
        assert _is_refusal(reply), reply
    _still_serving(relay_fed)


@settings(max_examples=30)
@given(st.one_of(
    hello.map(lambda doc: json.dumps(doc).encode() + b"\n"),
    st.binary(min_size=1, max_size=200).filter(lambda b: b[0] != 0x16).map(lambda b: b + b"\n"),
    hostile_text.map(lambda t: t.encode("utf-8", "surrogatepass") + b"\n").filter(lambda b: b[0] != 0x16),
))
@example(b'{"op": "join", "token": "made-up"}\n')
@example(b'{"op": "join", "token": null}\n')
@example(b"GET / HTTP/1.1\r\n\r\n")
def test_a_plain_connection_is_refused_unless_it_joins_with_a_live_token(relay_fed, line):
    async def send():
        sock = await connect_socket(relay_fed.endpoint)
        try:
            await asyncio.get_running_loop().sock_sendall(sock, line)
            try:
                return await asyncio.wait_for(read_message_from(sock), 20)
            except (RelayProtocolError, ConnectionError, ssl.SSLError):
                return {"ok": False, "error": "closed"}  # closed without a line: nothing was granted
        finally:
            sock.close()

    reply = asyncio.run(send())
    assert _is_refusal(reply), reply
    _still_serving(relay_fed)
