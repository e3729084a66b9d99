#!/usr/bin/env python3
"""The relay container's health check: does the relay accept TCP connections on its port?

Exit status 0 when a connection to the relay's port succeeds and 1 when it does not, as
Docker's HEALTHCHECK expects. The port is ``--port``, else ``$FLARE_RELAY_PORT``, else the
one the server kit's ``startup/server.json`` gives the relay (``flare relay start`` reads
the same). A TCP connect is all that is checked, as often as Docker asks: the relay
speaks TLS only with identities of its federation, and a health check needs no key.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

DEFAULT_KIT = "/kit"


def relay_port(kit: Path) -> int:
    """The port ``startup/server.json`` tells the kit's relay to listen on."""
    from flare_provider.provisioning.kits import SERVER_CONFIG, STARTUP  # the names provisioning writes

    path = kit / STARTUP / SERVER_CONFIG
    try:
        return int(json.loads(path.read_text(encoding="utf-8"))["relay"]["port"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path} names no relay port ({exc})") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kit", type=Path, default=Path(os.environ.get("FLARE_KIT", DEFAULT_KIT)))
    parser.add_argument("--host", default="127.0.0.1", help="address to connect to (default 127.0.0.1)")
    env_port = os.environ.get("FLARE_RELAY_PORT")
    parser.add_argument("--port", type=int, default=int(env_port) if env_port else None)
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the connection")
    args = parser.parse_args(argv)
    try:
        port = args.port if args.port is not None else relay_port(args.kit)
    except (OSError, ValueError) as exc:
        print(f"unhealthy: cannot tell the relay's port: {exc}", file=sys.stderr)
        return 1
    try:
        socket.create_connection((args.host, port), timeout=args.timeout).close()
    except OSError as exc:
        print(f"unhealthy: nothing accepts connections on {args.host}:{port} ({exc})", file=sys.stderr)
        return 1
    print(f"healthy: the relay accepts connections on {args.host}:{port}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
