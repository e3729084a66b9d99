"""Run by test_relay_listen.py, here or inside a network namespace: start ``flare relay start``
from a server kit, ask it for its status (mutual TLS, the kit's own server identity) at
127.0.0.1 and at ::1, stop it, and print as JSON what answered, the relay's "listening" line
and what this machine offers (an IPv6 loopback address, dual-stack sockets).

    listen_probe.py KIT PORT [relay start arguments...]
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flare_provider.client import load_caller_kit
from flare_provider.relay.dial import RelayEndpoint, dial_relay
from flare_provider.relay.tls import TlsIdentity

LOOPBACKS = ("127.0.0.1", "::1")


def ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def dual_stack() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            probe.bind(("::", 0))
        return True
    except OSError:
        return False


def status(kit, host: str, port: int) -> str:
    """The relay's name as it answers at ``host``, or why nothing answered."""
    identity = TlsIdentity(kit.cert_pem, kit.key_pem, kit.root_ca_pem)

    async def ask() -> str:
        _, writer, reply = await dial_relay(RelayEndpoint(kit.name, host, port), identity.context(server_side=False),
                                            {"op": "status"})
        writer.close()
        return reply["relay"]

    try:
        return asyncio.run(asyncio.wait_for(ask(), 15))
    except (OSError, asyncio.TimeoutError) as exc:
        return f"no answer: {exc or type(exc).__name__}"


def main(kit_dir: Path, port: int, extra: list[str]) -> dict:
    kit = load_caller_kit(kit_dir)
    with tempfile.TemporaryDirectory() as scratch:
        log = Path(scratch) / "relay.log"
        with open(log, "wb") as out:
            relay = subprocess.Popen([sys.executable, "-m", "flare_provider.cli", "relay", "start", "--kit",
                                      str(kit_dir), "--port", str(port), *extra], stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while "listening on" not in log.read_text():
                if relay.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the relay did not start (exit {relay.poll()}):\n{log.read_text()}")
                time.sleep(0.05)
            answers = {host: status(kit, host, port) for host in LOOPBACKS}
        finally:
            relay.send_signal(signal.SIGTERM)
            relay.wait(30)
        (listening,) = [line for line in log.read_text().splitlines() if "listening on" in line]
    return {"answers": answers, "listening": listening, "ipv6_loopback": ipv6_loopback(), "dual_stack": dual_stack()}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])))
