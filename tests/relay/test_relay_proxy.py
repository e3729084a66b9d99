"""A site behind an HTTP CONNECT proxy: a real tinyproxy, started here, with Basic authentication."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from relay_support import RELAYS, attached, relay_endpoint, relay_status, run_rounds, wait_attached

from flare_provider.poc import free_port

SITE = "site-3"
USER, PASSWORD = "flare-site", "proxy-s3cret"
PROXY_VARIABLES = {"https_proxy", "http_proxy", "all_proxy", "no_proxy"}  # either case


def wait_listening(proxy: subprocess.Popen, host: str, port: int) -> None:
    """Until tinyproxy accepts connections (its log says nothing of listening at LogLevel Connect)."""
    deadline = time.monotonic() + 10
    while True:
        assert proxy.poll() is None, f"tinyproxy exited with {proxy.returncode}"
        with socket.socket() as probe:
            probe.settimeout(0.5)
            if probe.connect_ex((host, port)) == 0:
                return
        assert time.monotonic() < deadline, f"tinyproxy not accepting on {host}:{port} after 10 s"
        time.sleep(0.05)


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
    try:
        wait_listening(proc, "127.0.0.1", port)
        yield port, log
    finally:
        proc.terminate()
        proc.wait(10)


def restart_with_proxy(relayed, url: str | None, relay_data: str = "plain") -> None:
    agent = relayed.agent(SITE)
    agent.stop()
    relayed.set_site_settings(SITE, proxy=url, relay_data=relay_data)
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


def test_a_site_whose_proxy_passes_only_tls_keeps_its_data_connections_in_tls(relayed, tinyproxy, tmp_path):
    """relay_data: tls wraps the site's ends of paths in TLS to the relay too; the others stay plain."""
    port, _ = tinyproxy
    started = time.time()
    restart_with_proxy(relayed, f"http://{USER}:{PASSWORD}@127.0.0.1:{port}", relay_data="tls")
    try:
        for server in RELAYS:
            wait_attached(relayed, server, [SITE], since=started)
        before = {server: relay_status(relayed, server)["site_ends"] for server in RELAYS}
        assert run_rounds(relayed, tmp_path).history[-1].accepted == list(relayed.sites)
        after = {server: relay_status(relayed, server)["site_ends"] for server in RELAYS}
        tls = sum(after[s]["tls"] - before[s]["tls"] for s in RELAYS)
        plain = sum(after[s]["plain"] - before[s]["plain"] for s in RELAYS)
        assert tls >= 1 and plain >= len(relayed.sites) - 1, (before, after)
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


def connects(log: Path, port: int) -> int:
    """How many CONNECT requests for the relay at 127.0.0.1:``port`` the proxy has logged."""
    return len(re.findall(rf"Request \(file descriptor \d+\): CONNECT 127\.0\.0\.1:{port} HTTP/", log.read_text()))


def start_with_environment(relayed, variables: dict[str, str], log_path: Path) -> subprocess.Popen:
    """The site's agent started again with ``variables`` in its environment and no proxy in site.yaml."""
    relayed.agent(SITE).stop()
    relayed.set_site_settings(SITE, proxy=None)
    env = {k: v for k, v in os.environ.items() if k.lower() not in PROXY_VARIABLES}
    env.update(GRPC_VERBOSITY="ERROR", **variables)
    with open(log_path, "wb") as agent_log:
        return subprocess.Popen(relayed.agent(SITE).command(), env=env, stdout=agent_log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)


def restore(relayed, agent: subprocess.Popen) -> None:
    agent.terminate()
    agent.wait(30)
    relayed.agent(SITE).start()


def test_a_site_takes_its_proxy_from_https_proxy_in_its_environment(relayed, tinyproxy, tmp_path):
    port, log = tinyproxy
    relay_ports = {server: relay_endpoint(relayed, server).port for server in RELAYS}
    before = {server: connects(log, relay_ports[server]) for server in RELAYS}
    started = time.time()
    agent = start_with_environment(relayed, {"https_proxy": f"http://{USER}:{PASSWORD}@127.0.0.1:{port}"},
                                   tmp_path / "env-agent.log")
    try:
        for server in RELAYS:
            wait_attached(relayed, server, [SITE], since=started)
        attaching = {server: connects(log, relay_ports[server]) for server in RELAYS}
        carried = {server: relay_status(relayed, server)["bytes"] for server in RELAYS}
        assert run_rounds(relayed, tmp_path).history[-1].accepted == list(relayed.sites)
        after = {server: connects(log, relay_ports[server]) for server in RELAYS}
        used = [s for s in RELAYS if relay_status(relayed, s)["bytes"] > carried[s]]
        assert all(attaching[s] > before[s] for s in RELAYS), (before, attaching)  # each attachment
        assert used and all(after[s] > attaching[s] for s in used), (attaching, after, used)  # the round's paths
        agent_log = (tmp_path / "env-agent.log").read_text()
        for server in RELAYS:
            assert (f"attached to relay {server} at 127.0.0.1:{relay_ports[server]} through proxy 127.0.0.1:{port}"
                    in agent_log), agent_log
    finally:
        restore(relayed, agent)


def test_a_relay_named_in_no_proxy_is_dialled_directly_and_the_other_through_the_proxy(relayed, tinyproxy, tmp_path):
    """HA with one relay on the site's side of the proxy: NO_PROXY (upper case) names it, with its port."""
    port, log = tinyproxy
    direct, proxied = RELAYS  # the Airflow side opens paths through the first relay: the direct one
    relay_ports = {server: relay_endpoint(relayed, server).port for server in RELAYS}
    before = {server: connects(log, relay_ports[server]) for server in RELAYS}
    started = time.time()
    agent = start_with_environment(relayed, {"HTTPS_PROXY": f"http://{USER}:{PASSWORD}@127.0.0.1:{port}",
                                             "NO_PROXY": f"relay.example.invalid, 127.0.0.1:{relay_ports[direct]}"},
                                   tmp_path / "env-agent.log")
    try:
        for server in RELAYS:
            wait_attached(relayed, server, [SITE], since=started)
        carried = relay_status(relayed, direct)["bytes"]
        assert run_rounds(relayed, tmp_path).history[-1].accepted == list(relayed.sites)
        assert relay_status(relayed, direct)["bytes"] > carried  # the round's paths went through the direct relay
        after = {server: connects(log, relay_ports[server]) for server in RELAYS}
        assert after[direct] == before[direct], (before, after)  # neither its attachment nor its paths
        assert after[proxied] > before[proxied], (before, after)
        agent_log = (tmp_path / "env-agent.log").read_text()
        assert f"attached to relay {direct} at 127.0.0.1:{relay_ports[direct]} directly" in agent_log, agent_log
        assert (f"attached to relay {proxied} at 127.0.0.1:{relay_ports[proxied]} through proxy 127.0.0.1:{port}"
                in agent_log), agent_log
    finally:
        restore(relayed, agent)


def test_a_malformed_no_proxy_stops_the_agent_naming_the_entry(relayed, tmp_path):
    agent = start_with_environment(relayed, {"https_proxy": f"http://{USER}:{PASSWORD}@127.0.0.1:9",
                                             "no_proxy": "relay lan"}, tmp_path / "env-agent.log")
    try:
        assert agent.wait(60) == 2
        agent_log = (tmp_path / "env-agent.log").read_text()
        assert "error: environment variable no_proxy: no_proxy entry 'relay lan' is not a host name" in agent_log
        assert PASSWORD not in agent_log
    finally:
        restore(relayed, agent)


@pytest.fixture
def site_namespace(relayed, tmp_path):
    """A network namespace joined to this machine by one veth pair, with a tinyproxy on the host
    side: from inside, the proxy is the only thing reachable (not even the host's loopback)."""
    tag = uuid.uuid4().hex[:6]
    ns, host_if, site_if = f"flare-{tag}", f"fh{tag}", f"fs{tag}"
    octet = 1 + int(tag[:2], 16) % 250
    host_ip, site_ip = f"169.254.{octet}.1", f"169.254.{octet}.2"
    steps = [
        ["ip", "netns", "add", ns],
        ["ip", "link", "add", host_if, "type", "veth", "peer", "name", site_if],
        ["ip", "link", "set", site_if, "netns", ns],
        ["ip", "addr", "add", f"{host_ip}/30", "dev", host_if],
        ["ip", "link", "set", host_if, "up"],
        ["ip", "netns", "exec", ns, "ip", "addr", "add", f"{site_ip}/30", "dev", site_if],
        ["ip", "netns", "exec", ns, "ip", "link", "set", site_if, "up"],
        ["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"],
    ]
    try:
        for step in steps:
            subprocess.run(step, check=True, capture_output=True)
        port = free_port()
        log, conf = tmp_path / "ns-tinyproxy.log", tmp_path / "ns-tinyproxy.conf"
        lines = [f"Port {port}", f"Listen {host_ip}", "Timeout 600", f'LogFile "{log}"', "LogLevel Connect",
                 "MaxClients 64", f"Allow {site_ip}", f"BasicAuth {USER} {PASSWORD}",
                 f'PidFile "{tmp_path}/ns-tinyproxy.pid"']
        lines += [f"ConnectPort {relay_endpoint(relayed, server).port}" for server in RELAYS]
        conf.write_text("\n".join(lines) + "\n")
        proxy = subprocess.Popen([shutil.which("tinyproxy") or "/usr/bin/tinyproxy", "-d", "-c", str(conf)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            wait_listening(proxy, host_ip, port)
            yield ns, f"http://{USER}:{PASSWORD}@{host_ip}:{port}", log
        finally:
            proxy.terminate()
            proxy.wait(10)
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_a_site_whose_only_route_is_the_proxy_attaches_and_trains(relayed, site_namespace, tmp_path):
    ns, proxy_url, log = site_namespace
    relay_port = relay_endpoint(relayed, RELAYS[0]).port
    probe = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c",
                            f"import socket; print(socket.socket().connect_ex(('127.0.0.1', {relay_port})))"],
                           capture_output=True, text=True, check=True)
    assert probe.stdout.strip() != "0"  # the relay is not reachable from the namespace but through the proxy
    relayed.agent(SITE).stop()
    relayed.set_site_settings(SITE, proxy=proxy_url)
    started = time.time()
    with open(tmp_path / "ns-agent.log", "wb") as agent_log:
        inside = subprocess.Popen(["ip", "netns", "exec", ns, *relayed.agent(SITE).command()],
                                  stdout=agent_log, stderr=subprocess.STDOUT)
    try:
        for server in RELAYS:
            wait_attached(relayed, server, [SITE], since=started)
        assert run_rounds(relayed, tmp_path).history[-1].accepted == list(relayed.sites)
        proxied = log.read_text()
        assert all(f"127.0.0.1:{relay_endpoint(relayed, server).port}" in proxied for server in RELAYS), proxied
    finally:
        inside.terminate()
        inside.wait(30)
        relayed.set_site_settings(SITE, proxy=None)
        relayed.agent(SITE).start()
