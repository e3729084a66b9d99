"""The ``flare`` Airflow connection: each field as an imported file or the UI's form may hold it.

``FlareHook.kit_from_connection`` gives a server kit whose every site and relay is well
formed, or a :class:`FlareConnectionError` naming the connection and the field. A site
entry alone (``SiteEndpoint.from_dict``) raises only the errors its callers turn into theirs.
"""

from __future__ import annotations

import copy
import json

import pytest
from airflow.sdk import Connection
from hostile_support import broken_bytes, examples, hostile_values, json_safe
from hypothesis import example, given
from hypothesis import strategies as st

from flare_provider.client import CallerKit, SiteEndpoint
from flare_provider.hooks.flare import FlareConnectionError, FlareHook
from flare_provider.provisioning import parse_project, provision

PROJECT = """
api_version: 3
name: conn
participants:
  - {name: server1, type: server, org: lead, host_names: [relay.example]}
  - {name: site-1, type: client, org: a}
"""
EXTRA_FIELDS = ["project", "cert_pem", "root_ca_pem", "sites", "relays"]
SITE_FIELDS = ["host", "port", "org", "gpus", "connect"]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict:
    """The connection provisioning writes for the server identity: login, password, extra (parsed)."""
    result = provision(parse_project(PROJECT), tmp_path_factory.mktemp("conn") / "workspace")
    (fields,) = json.loads((result.kits["server1"] / "startup" / "connections.json").read_text()).values()
    return {"login": fields["login"], "password": fields["password"], "extra": json.loads(fields["extra"])}


def kit_or_error(login, password, extra: str, *named: str) -> None:
    conn = Connection(conn_id="flare_prop", conn_type="flare", login=login, password=password, extra=extra)
    try:
        kit = FlareHook.kit_from_connection(conn)
    except FlareConnectionError as exc:
        assert "'flare_prop'" in str(exc), exc
        for name in named:
            assert name in str(exc), f"{name!r} not named in {exc}"
        if isinstance(password, str) and "PRIVATE KEY" in password:
            assert password.split("\n")[1] not in str(exc), "the private key appeared in an error"
        return
    assert isinstance(kit, CallerKit) and kit.cert_pem and kit.key_pem and kit.root_ca_pem
    for name, site in kit.sites.items():
        assert isinstance(site.host, str) and site.host and 1 <= site.port <= 65535, site
        assert site.connect in ("listen", "outbound") and all(isinstance(g, int) and g >= 0 for g in site.gpus)
        assert isinstance(site.address, str)
    for relay in kit.relays:
        assert isinstance(relay.host, str) and relay.host and 1 <= relay.port <= 65535


@examples(120)
@given(field=st.sampled_from(EXTRA_FIELDS), value=hostile_values().map(json_safe), form=st.booleans())
@example(field="sites", value="{not json", form=False).via("was JSONDecodeError")
@example(field="cert_pem", value=["-----BEGIN CERTIFICATE-----"], form=False).via("was TypeError")
@example(field="relays", value=[{"name": "r", "host": "h", "port": 1e400}], form=False).via("was OverflowError")
@example(field="cert_pem", value="-----BEGIN X-----\udcff-----END X-----", form=False).via("was UnicodeEncodeError")
def test_one_hostile_extra_field_is_named(good, field, value, form):
    extra = copy.deepcopy(good["extra"])
    extra[field] = value
    if form:  # the UI's form keeps each field under a prefix, and the sites as JSON text
        extra = {f"extra__flare__{k}": (json.dumps(v) if k == "sites" else v) for k, v in extra.items()}
    kit_or_error(good["login"], good["password"], json.dumps(extra), field.split("_pem")[0])


@examples(120)
@given(field=st.sampled_from(SITE_FIELDS), value=hostile_values().map(json_safe))
@example(field="port", value=float("inf")).via("was OverflowError")
@example(field="port", value=70000).via("was accepted")
@example(field="port", value=1.9).via("was taken as port 1")
@example(field="host", value=["h"]).via("was accepted")
@example(field="gpus", value="01").via("was taken as GPUs '0' and '1'")
def test_one_hostile_site_field_is_named(good, field, value):
    extra = copy.deepcopy(good["extra"])
    extra["sites"]["site-1"][field] = value
    kit_or_error(good["login"], good["password"], json.dumps(extra), "sites", field)
    try:
        SiteEndpoint.from_dict("site-1", extra["sites"]["site-1"])
    except (KeyError, TypeError, ValueError) as exc:
        assert "site-1" in str(exc) or field in str(exc)


@examples(60)
@given(login=st.one_of(st.none(), st.text(max_size=10)), password=st.one_of(st.none(), st.text(max_size=60)))
def test_hostile_login_and_password_are_named(good, login, password):
    kit_or_error(login, password, json.dumps(good["extra"]))


@examples(60)
@given(doc=hostile_values(max_leaves=10).map(json_safe))
def test_any_extra_document_gives_a_kit_or_a_connection_error(good, doc):
    kit_or_error(good["login"], good["password"], json.dumps(doc))


@examples(40)
@given(raw=broken_bytes)
def test_broken_extra_text_gives_a_connection_error(good, raw):
    kit_or_error(good["login"], good["password"], raw.decode("utf-8", "replace"))


def test_the_provisioned_connection_gives_its_kit(good):
    kit = FlareHook.kit_from_connection(
        Connection(conn_id="flare_prop", conn_type="flare", login=good["login"], password=good["password"],
                   extra=json.dumps(good["extra"])))
    assert (kit.name, sorted(kit.sites), [r.name for r in kit.relays]) == ("server1", ["site-1"], ["server1"])

