"""The Federation page's view of sites that dial out: which relays each is attached to, and a relay that is down."""

from __future__ import annotations

from relay_support import RELAYS, wait_attached

from flare_provider.plugins.app import _dag_link, _dag_run_link, _run_link, _template
from flare_provider.plugins.dashboard import connection_sites


def render(view) -> str:
    return _template("federation.html").render(
        connections=[view], hidden_connections=0, store_uri="file:///x", store_error="", runs=[], selected=None,
        charts=[], site_colors={}, now="", run_link=_run_link, dag_run_link=_dag_run_link, dag_link=_dag_link,
    )


def test_each_site_shows_the_relays_it_is_attached_to(relayed, monkeypatch):
    monkeypatch.setenv(f"AIRFLOW_CONN_{relayed.conn_id.upper()}", relayed.connection_json())
    for server in RELAYS:
        wait_attached(relayed, server, relayed.sites)
    view = connection_sites(relayed.conn_id, 5.0)
    assert [s.name for s in view.sites] == list(relayed.sites) and view.relay_errors == {}
    for site in view.sites:
        assert site.reachable and site.connect == "outbound"
        assert sorted(a["relay"] for a in site.attachments) == sorted(RELAYS)
        assert all(a["since"].endswith("UTC") and a["last_ping"].endswith("UTC") for a in site.attachments)
    html = render(view)
    assert html.count('class="attachment" data-relay="airflow-server-2"') == len(relayed.sites)

    relayed.relay(RELAYS[1]).kill()
    try:
        view = connection_sites(relayed.conn_id, 5.0)
        assert set(view.relay_errors) == {RELAYS[1]}
        assert all([a["relay"] for a in s.attachments] == [RELAYS[0]] for s in view.sites)
        assert all(s.reachable for s in view.sites)  # through the other relay
        assert f'data-relay="{RELAYS[1]}">Relay <b>{RELAYS[1]}</b> did not answer' in render(view)
    finally:
        relayed.relay(RELAYS[1]).start().wait_ready()
        wait_attached(relayed, RELAYS[1], relayed.sites)
