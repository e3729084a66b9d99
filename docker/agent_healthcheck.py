#!/usr/bin/env python3
"""The agent container's health check: does the site agent accept connections?

Exit status 0 when a connection to the agent succeeds and 1 when it does not, as
Docker's HEALTHCHECK expects. An agent that dials out to relays (``connect: outbound``)
serves on a Unix socket whose path it records in its work folder; one that listens
serves on ``--port``, else ``$FLARE_AGENT_PORT``, else the kit's ``startup/agent.json``.
A connect is all that can be checked from inside: the agent accepts TLS only from
identities of its federation, and the container holds none but the site's own.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

DEFAULT_KIT = "/kit"


def agent_port(kit: Path) -> int:
    """The port the kit's ``agent.json`` tells the agent to listen on."""
    from site_agent.kit_config import (
        load_agent_config,  # the agent's own reader, so both agree
    )

    return load_agent_config(kit).port


def outbound_socket(kit: Path) -> Path | None:
    """The Unix socket of an agent that dials out, or None for one that listens."""
    from site_agent.kit_config import load_agent_config
    from site_agent.service.server import SOCKET_RECORD
    from site_agent.site_settings import load_site_settings

    settings = load_site_settings(kit)
    if (settings.connect or ("outbound" if load_agent_config(kit).relays else "listen")) != "outbound":
        return None
    return Path((settings.work_dir / SOCKET_RECORD).read_text().strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kit", type=Path, default=Path(os.environ.get("FLARE_KIT", DEFAULT_KIT)))
    parser.add_argument("--host", default="127.0.0.1", help="address to connect to (default 127.0.0.1)")
    env_port = os.environ.get("FLARE_AGENT_PORT")
    parser.add_argument("--port", type=int, default=int(env_port) if env_port else None)
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the connection")
    args = parser.parse_args(argv)
    if args.port is None:
        try:
            path = outbound_socket(args.kit)
        except (OSError, ValueError) as exc:
            print(f"unhealthy: cannot tell where the agent serves: {exc}", file=sys.stderr)
            return 1
        if path is not None:
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(args.timeout)
                    s.connect(str(path))
            except OSError as exc:
                print(f"unhealthy: nothing accepts connections on {path} ({exc})", file=sys.stderr)
                return 1
            print(f"healthy: the agent accepts connections on {path} (it dials out to its relays)")
            return 0
    try:
        port = args.port if args.port is not None else agent_port(args.kit)
    except (OSError, ValueError) as exc:
        print(f"unhealthy: cannot tell the agent's port: {exc}", file=sys.stderr)
        return 1
    try:
        socket.create_connection((args.host, port), timeout=args.timeout).close()
    except OSError as exc:
        print(f"unhealthy: nothing accepts connections on {args.host}:{port} ({exc})", file=sys.stderr)
        return 1
    print(f"healthy: the agent accepts connections on {args.host}:{port}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
