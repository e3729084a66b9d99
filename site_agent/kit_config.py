"""The agent's identity, endpoint and relays: ``<kit>/startup/agent.json`` (signed by provisioning).

Limits on what callers may upload are the site's choice and come from the command line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flare_provider.provisioning.kits import AGENT_CONFIG, STARTUP
from flare_provider.relay.dial import RelayEndpoint

from .errors import AgentError

DEFAULT_MAX_WEIGHTS_BYTES = 8 << 30  # a model's global weights
DEFAULT_MAX_BUNDLE_BYTES = 256 << 20  # an app bundle: code and config, no data


class ConfigError(AgentError, ValueError):
    """``agent.json`` is missing a field or has a wrong one; the agent does not start."""


@dataclass(frozen=True)
class AgentConfig:
    """What ``agent.json`` says; file paths are absolute."""

    project: str
    site: str
    org: str
    server: str  # CN of the first server participant (kits from before several servers name only it)
    listen_host: str
    port: int
    cert_file: Path
    key_file: Path
    root_ca_file: Path
    relays: tuple[RelayEndpoint, ...] = ()  # where the site attaches when it dials out
    # CNs of every server participant: the only callers that may deploy and train, and the
    # signers of app bundles. Empty means the one ``server``.
    servers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.servers:
            object.__setattr__(self, "servers", (self.server,))


def agent_config_path(kit_dir: Path) -> Path:
    return Path(kit_dir) / STARTUP / AGENT_CONFIG


def load_agent_config(kit_dir: str | Path) -> AgentConfig:
    """Read ``<kit_dir>/startup/agent.json``; :class:`ConfigError` names the file and field."""
    path = agent_config_path(Path(kit_dir).resolve())
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing; is {kit_dir} a site's startup kit?") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: cannot read: JSON nested too deeply") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a JSON object")

    def text(field: str) -> str:
        value = doc.get(field)
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{path}: '{field}' must be a non-empty string, found {value!r}")
        return value

    def file(field: str) -> Path:
        name = text(field)
        if Path(name).name != name or name in (".", "..") or "\x00" in name:
            raise ConfigError(f"{path}: '{field}' must name a file in {path.parent}, found {name!r}")
        return path.parent / name

    port: Any = doc.get("port")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"{path}: 'port' must be an integer from 0 to 65535, found {port!r}")
    relays = doc.get("relays", [])
    try:
        if not isinstance(relays, list):
            raise TypeError("not a list")
        relays = tuple(RelayEndpoint.from_dict(r) for r in relays)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: 'relays' must be a list of {{name, host, port}}: {exc}") from None
    server = text("server")
    servers = doc.get("servers", [server])  # kits from before several servers have no list
    if not isinstance(servers, list) or not servers or not all(isinstance(n, str) and n for n in servers):
        raise ConfigError(f"{path}: 'servers' must be a non-empty list of server participant names, found {servers!r}")
    if server not in servers:
        raise ConfigError(f"{path}: 'server' ({server!r}) must be one of 'servers' {servers!r}")
    return AgentConfig(
        project=text("project"),
        site=text("site"),
        org=text("org"),
        server=server,
        listen_host=text("listen_host"),
        port=port,
        cert_file=file("cert"),
        key_file=file("key"),
        root_ca_file=file("root_ca"),
        relays=relays,
        servers=tuple(servers),
    )

