"""Rounds through relays: sites that open no port, a relay lost mid-round, cut and restored attachments."""

from __future__ import annotations

import subprocess
import threading
import time

import psutil
from relay_support import RELAYS, attached, relay_endpoint, run_rounds, wait_attached


def listening_inet_sockets(pid: int) -> list:
    """TCP and UDP sockets a process (and its children) listen on."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return [c for p in procs for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN or not c.raddr]


def test_sites_listen_on_nothing_and_train_through_the_relays(relayed, tmp_path):
    for site in relayed.sites:
        assert listening_inet_sockets(relayed.agent(site).proc.pid) == [], f"{site} opened a port"
    for server in RELAYS:
        assert set(wait_attached(relayed, server, relayed.sites)) == set(relayed.sites)
    with relayed.client("site-1") as client:  # the site's own view of its attachments
        attachments = client.status().attachments
    assert sorted(a.relay for a in attachments) == sorted(RELAYS) and all(a.attached for a in attachments)
    assert all(a.last_ping >= a.connected_since > 0 and a.error == "" for a in attachments)
    progress = run_rounds(relayed, tmp_path, rounds=2)
    assert [r.accepted for r in progress.history] == [list(relayed.sites)] * 2
    assert float(progress.weights["w"][0]) == 2.0  # two rounds of +1


def test_one_relay_killed_mid_round_the_round_completes_through_the_other(relayed, tmp_path):
    wait_attached(relayed, RELAYS[1], relayed.sites)
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(progress=run_rounds(relayed, tmp_path, sleep_s=3.0)))
    worker.start()
    time.sleep(1.5)  # scattered through the first relay; the sites are training
    relayed.relay(RELAYS[0]).kill()
    worker.join(120)
    relayed.relay(RELAYS[0]).start().wait_ready()
    (record,) = outcome["progress"].history
    assert record.accepted == list(relayed.sites), record.dropped
    wait_attached(relayed, RELAYS[0], relayed.sites)


def test_a_cut_attachment_is_dialled_again(relayed, tmp_path):
    before = wait_attached(relayed, RELAYS[0], relayed.sites)
    port = relay_endpoint(relayed, RELAYS[0]).port
    # Kill every TCP connection to the relay's port from this machine (the sites' attachments).
    subprocess.run(["ss", "-K", "dst", "127.0.0.1", "dport", "=", f":{port}"], check=True, capture_output=True)
    after = wait_attached(relayed, RELAYS[0], relayed.sites, since=max(a["since"] for a in before.values()))
    assert all(after[s]["since"] > before[s]["since"] for s in relayed.sites)
    log = relayed.agent("site-1").log_tail(200)
    assert f"lost relay {RELAYS[0]}" in log and f"attached to relay {RELAYS[0]}" in log
    assert run_rounds(relayed, tmp_path).history[-1].accepted == list(relayed.sites)


def test_relay_killed_and_restarted_sites_attach_again(relayed):
    wait_attached(relayed, RELAYS[1], relayed.sites)
    relayed.relay(RELAYS[1]).kill()
    assert attached(relayed, RELAYS[1]) == {}
    restarted = time.time()
    relayed.relay(RELAYS[1]).start().wait_ready()
    wait_attached(relayed, RELAYS[1], relayed.sites, since=restarted)
    assert "cannot attach to relay" in relayed.agent("site-2").log_tail(400)


def test_a_site_attached_to_no_relay_is_dropped_by_the_quorum_rule(relayed, tmp_path):
    site = "site-3"
    agent = relayed.agent(site)
    agent.stop()
    # Its proxy does not exist: it can reach no relay.
    relayed.set_site_settings(site, proxy="http://127.0.0.1:9")
    agent.start(wait=False)
    try:
        time.sleep(2)
        assert site not in attached(relayed, RELAYS[0]) and site not in attached(relayed, RELAYS[1])
        progress = run_rounds(relayed, tmp_path, min_clients=2, connect_grace=2.0)
        (record,) = progress.history
        assert record.accepted == ["site-1", "site-2"]
        assert site in record.dropped and "site-3" in record.dropped[site], record.dropped
        assert "proxy 127.0.0.1:9" in agent.log_tail(100)
    finally:
        agent.stop()
        relayed.set_site_settings(site, proxy=None)
        agent.start()
