"""A site behind an HTTP CONNECT proxy: a real tinyproxy, started here, with Basic authentication."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest
from relay_support import RELAYS, attached, relay_endpoint, run_rounds, wait_attached

from flare_provider.poc import free_port

SITE = "site-3"
USER, PASSWORD = "flare-site", "proxy-s3cret"


@pytest.fixture
def tinyproxy(relayed, tmp_path):
    binary = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
    port = free_port()
    log = tmp_path / "tinyproxy.log"
    conf = tmp_path / "tinyproxy.conf"
    lines = [f"Port {port}", "Listen 127.0.0.1", "Timeout 600", f'LogFile "{log}"', "LogLevel Connect",
             "MaxClients 64", "Allow 127.0.0.1", f"BasicAuth {USER} {PASSWORD}", f'PidFile "{tmp_path}/tinyproxy.pid"']
    lines += [f"ConnectPort {relay_endpoint(relayed, server).port}" for server in RELAYS]
    conf.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen([binary, "-d", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.time() + 10
    while not (log.exists() and "listening" in log.read_text().lower()) and time.time() < deadline:
        time.sleep(0.1)
    yield port, log
    proc.terminate()
    proc.wait(10)


def restart_with_proxy(relayed, url: str | None) -> None:
    agent = relayed.agent(SITE)
    agent.stop()
    relayed.set_site_settings(SITE, proxy=url)
    agent.start(wait=False)


def test_a_site_attaches_and_trains_through_the_proxy(relayed, tinyproxy, tmp_path):
    port, log = tinyproxy
    started = time.time()
    restart_with_proxy(relayed, f"http://{USER}:{PASSWORD}@127.0.0.1:{port}")
    try:
        for server in RELAYS:
            wait_attached(relayed, server, [SITE], since=started)
        assert run_rounds(relayed, tmp_path).history[-1].accepted == list(relayed.sites)
        proxied = log.read_text()
        for server in RELAYS:  # the attachments and the round's data paths went through the proxy
            assert f"127.0.0.1:{relay_endpoint(relayed, server).port}" in proxied
        assert proxied.count("CONNECT") >= len(RELAYS) + 1
        assert f"through proxy 127.0.0.1:{port}" in relayed.agent(SITE).log_tail(100)
    finally:
        restart_with_proxy(relayed, None)
        relayed.agent(SITE).wait_ready()


def test_a_wrong_proxy_password_is_reported_and_the_site_stays_detached(relayed, tinyproxy):
    port, _ = tinyproxy
    restart_with_proxy(relayed, f"http://{USER}:wrong@127.0.0.1:{port}")
    try:
        time.sleep(3)
        assert SITE not in attached(relayed, RELAYS[0])
        log = relayed.agent(SITE).log_tail(100)
        # tinyproxy answers a wrong password with 401 (others say 407): either way the site says why
        assert f"proxy 127.0.0.1:{port} refused CONNECT" in log and ("401" in log or "407" in log), log
    finally:
        restart_with_proxy(relayed, None)
        relayed.agent(SITE).wait_ready()
