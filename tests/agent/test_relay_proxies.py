"""Which relays a dialling-out site reaches through its proxy: no_proxy read as curl and requests
read it, decided relay by relay, and bad settings refused with the entry or variable named."""

from __future__ import annotations

import pytest

from flare_provider.relay.dial import HttpProxy, RelayEndpoint
from site_agent.errors import SettingsError
from site_agent.relay_proxies import NoProxy, relay_proxies
from site_agent.site_settings import parse_site_settings

PROXY_URL = "http://flare:s3cret@proxy.hospital.example:3128"
PROXY = HttpProxy("proxy.hospital.example", 3128, "flare", "s3cret")
LAN_RELAY = RelayEndpoint("server1", "relay.lan.hospital.example", 8002)
REMOTE_RELAY = RelayEndpoint("server2", "relay.lead.example", 8102)


@pytest.mark.parametrize("no_proxy, host, port", [
    ("*", "relay.lead.example", 8002),
    ("relay.lead.example", "relay.lead.example", 8002),
    ("lead.example", "relay.lead.example", 8002),  # a name covers the names under it
    (".lead.example", "relay.lead.example", 8002),
    (".lead.example", "lead.example", 8002),  # a leading dot covers the name itself too
    ("*.lead.example", "relay.lead.example", 8002),
    ("LEAD.Example", "Relay.LEAD.example", 8002),  # case-insensitive
    ("lead.example.", "relay.lead.example.", 8002),  # a fully qualified name's final dot
    (" other.example , lead.example ", "relay.lead.example", 8002),  # spaces around entries
    ("other.example,,lead.example", "relay.lead.example", 8002),  # an empty entry is skipped
    ("other.example,*", "relay.lead.example", 8002),
    ("relay.lead.example:8002", "relay.lead.example", 8002),
    ("10.1.2.3", "10.1.2.3", 8002),
    ("10.0.0.0/8", "10.1.2.3", 8002),
    ("10.0.0.0/8:8002", "10.1.2.3", 8002),
    ("::1", "::1", 8002),
    ("[::1]", "::1", 8002),
    ("[::1]:8002", "::1", 8002),
    ("fd00::/8", "fd12:3456::1", 8002),
    ("0:0:0:0:0:0:0:1", "::1", 8002),  # addresses compare as addresses, not as text
    ("localhost", "localhost", 8002),
])
def test_a_listed_host_is_dialled_directly(no_proxy, host, port):
    assert NoProxy.parse(no_proxy).matches(host, port)


@pytest.mark.parametrize("no_proxy, host, port", [
    ("", "relay.lead.example", 8002),
    ("lead.example", "relay.lead.example.org", 8002),
    ("lead.example", "badlead.example", 8002),  # a suffix counts at a dot only
    ("relay.lead.example:8002", "relay.lead.example", 8102),  # another port
    ("[::1]:8002", "::1", 8102),
    ("10.0.0.0/8", "11.1.2.3", 8002),
    ("0.0.1", "10.0.0.1", 8002),  # an address is no name suffix
    ("10.1.2.3", "relay.lead.example", 8002),  # names are not resolved
    ("relay.lead.example", "10.1.2.3", 8002),
    ("::1", "127.0.0.1", 8002),
    ("127.0.0.0/8", "::1", 8002),
])
def test_a_host_not_listed_goes_through_the_proxy(no_proxy, host, port):
    assert not NoProxy.parse(no_proxy).matches(host, port)


@pytest.mark.parametrize("no_proxy, named", [
    ("relay lan", "'relay lan' is not a host name"),
    ("relay.lan:http", "the port must be a number from 1 to 65535, found 'http'"),
    ("relay.lan:0", "found '0'"),
    ("relay.lan:70000", "found '70000'"),
    ("relay.lan:", "found ''"),
    ("10.0.0.0/33", "'10.0.0.0/33' is not an address range"),
    ("[::1", "'[::1': an IPv6 address in brackets"),
    ("[::1]8002", "'[::1]8002': an IPv6 address in brackets"),
    ("relay.*.example", "'relay.*.example' is not a host name"),
    ("*.", "'*.' is not a host name"),
    ("-relay.lan", "'-relay.lan' is not a host name"),
    ("ok.example, http://relay.lan", "'http://relay.lan' is a URL"),
])
def test_a_malformed_entry_is_named(no_proxy, named):
    with pytest.raises(ValueError, match="no_proxy entry") as refused:
        NoProxy.parse(no_proxy)
    assert named in str(refused.value)


def test_each_relay_is_decided_on_its_own():
    environ = {"https_proxy": PROXY_URL, "no_proxy": "localhost,.lan.hospital.example"}
    assert relay_proxies([LAN_RELAY, REMOTE_RELAY], None, None, environ) == {"server1": None, "server2": PROXY}


def test_the_upper_case_variables_serve_when_the_lower_case_ones_are_unset():
    environ = {"HTTPS_PROXY": PROXY_URL, "NO_PROXY": "relay.lead.example:8102"}
    assert relay_proxies([LAN_RELAY, REMOTE_RELAY], None, None, environ) == {"server1": PROXY, "server2": None}


def test_the_lower_case_variables_win_over_the_upper_case_ones():
    environ = {"https_proxy": PROXY_URL, "HTTPS_PROXY": "http://elsewhere.example:8080",
               "no_proxy": "lan.hospital.example", "NO_PROXY": "*"}
    assert relay_proxies([LAN_RELAY, REMOTE_RELAY], None, None, environ) == {"server1": None, "server2": PROXY}


def test_without_a_proxy_every_relay_is_dialled_directly():
    assert relay_proxies([LAN_RELAY, REMOTE_RELAY], None, None, {"no_proxy": "relay.lan"}) == {
        "server1": None, "server2": None}


def test_site_yaml_proxy_goes_with_site_yaml_no_proxy_not_the_environments():
    environ = {"https_proxy": "http://elsewhere.example:8080", "no_proxy": "*"}
    chosen = relay_proxies([LAN_RELAY, REMOTE_RELAY], PROXY_URL, "lan.hospital.example", environ)
    assert chosen == {"server1": None, "server2": PROXY}
    assert relay_proxies([LAN_RELAY, REMOTE_RELAY], PROXY_URL, None, environ) == {"server1": PROXY, "server2": PROXY}


@pytest.mark.parametrize("environ, named", [
    ({"https_proxy": "http://flare:s3cret@proxy.example:99999"}, "environment variable https_proxy: proxy"),
    ({"HTTPS_PROXY": "https://flare:s3cret@proxy.example:3128"}, "environment variable HTTPS_PROXY: proxy"),
    ({"https_proxy": "http://flare:s3cret@[::1"}, "is not a URL"),
    ({"https_proxy": "http://flare:s3cret@proxy.example:3128/path"}, "with no path"),
    ({"https_proxy": "http://:3128"}, "names no host"),
])
def test_a_bad_proxy_url_is_named_without_its_password(environ, named):
    with pytest.raises(SettingsError) as refused:
        relay_proxies([REMOTE_RELAY], None, None, environ)
    assert named in str(refused.value) and "s3cret" not in str(refused.value)


def test_a_bad_no_proxy_variable_is_named():
    with pytest.raises(SettingsError, match=r"environment variable NO_PROXY: no_proxy entry 'relay lan'"):
        relay_proxies([REMOTE_RELAY], None, None, {"https_proxy": PROXY_URL, "NO_PROXY": "relay lan"})


SETTINGS = {"data_dir": "data", "work_dir": "work", "proxy": PROXY_URL}


@pytest.mark.parametrize("value, stored", [
    ("relay.lan, 10.0.0.0/8", "relay.lan, 10.0.0.0/8"),
    (["relay.lan", "10.0.0.0/8"], "relay.lan,10.0.0.0/8"),
    (None, None),
])
def test_site_yaml_takes_no_proxy_as_text_or_a_list(tmp_path, value, stored):
    assert parse_site_settings({**SETTINGS, "no_proxy": value}, tmp_path).no_proxy == stored


@pytest.mark.parametrize("doc, named", [
    ({**SETTINGS, "no_proxy": "relay lan"}, "site.yaml: 'no_proxy': no_proxy entry 'relay lan'"),
    ({**SETTINGS, "no_proxy": {"relay": "lan"}}, "'no_proxy' must be a list of hosts"),
    ({**SETTINGS, "no_proxy": [1, 2]}, "'no_proxy' must be a list of hosts"),
    ({**SETTINGS, "proxy": None, "no_proxy": "relay.lan"}, "there is no 'proxy' here"),
])
def test_site_yaml_refuses_a_bad_no_proxy(tmp_path, doc, named):
    with pytest.raises(SettingsError) as refused:
        parse_site_settings(doc, tmp_path)
    assert named in str(refused.value)
