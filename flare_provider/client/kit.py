"""A server or admin identity (its certificate and key) and the sites it knows."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..provisioning.kits import ADMIN_CONFIG, SERVER_CONFIG, STARTUP
from ..relay.dial import RelayEndpoint, host_port
from ..relay.tls import TlsIdentity
from .replies import AgentError, AgentStatus

if TYPE_CHECKING:
    from .aio import AsyncAgentClient
    from .sync import AgentClient


@dataclass(frozen=True)
class SiteEndpoint:
    """Where a site's agent is reached, as provisioning recorded it."""

    name: str
    host: str
    port: int
    org: str = ""
    gpus: tuple[int, ...] = ()
    connect: str = "listen"  # outbound: reached through the kit's relays; listen: at host:port

    @property
    def address(self) -> str:
        return host_port(self.host, self.port)

    @classmethod
    def from_dict(cls, name: str, doc: Any) -> "SiteEndpoint":
        """A site as server kits and connections list it: ``{host, port, org?, gpus?}``.

        Raises KeyError, TypeError or ValueError (callers name the file or connection).
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"site name {name!r} is not a non-empty string")
        if not isinstance(doc, dict):
            raise TypeError(f"site {name!r}: expected a mapping of host, port, org, gpus, connect, got {doc!r}")
        connect = doc.get("connect", "listen")
        if connect not in ("outbound", "listen"):
            raise ValueError(f"site {name!r}: connect must be outbound or listen, not {connect!r}")
        host, port, org, gpus = doc["host"], doc["port"], doc.get("org", ""), doc.get("gpus", [])
        if not isinstance(host, str) or not host or not host.isprintable() or " " in host:
            raise ValueError(f"site {name!r}: host must be a host name or address, not {host!r}")
        if isinstance(port, str) and port.isascii() and port.isdigit():  # a form field keeps it as text
            port = int(port)
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValueError(f"site {name!r}: port must be an integer from 1 to 65535, not {port!r}")
        if not isinstance(org, str):
            raise ValueError(f"site {name!r}: org must be a string, not {org!r}")
        if not isinstance(gpus, list) or any(isinstance(g, bool) or not isinstance(g, int) or g < 0 for g in gpus):
            raise ValueError(f"site {name!r}: gpus must be a list of GPU ids, not {gpus!r}")
        return cls(name, host, port, org, tuple(gpus), connect)

    @classmethod
    def map_from(cls, sites: Any) -> dict[str, "SiteEndpoint"]:
        """``{name: SiteEndpoint}`` from ``{name: {host, port, ...}}``."""
        return {name: cls.from_dict(name, doc) for name, doc in sites.items()}


def relay_endpoints(raw: Any) -> tuple[RelayEndpoint, ...]:
    """The relays a kit or connection lists: ``[{name, host, port}, ...]``; ValueError naming the bad entry."""
    if not isinstance(raw, list):
        raise ValueError(f"expected a list of {{name, host, port}}, got {raw!r}")
    try:
        return tuple(RelayEndpoint.from_dict(doc) for doc in raw)
    except KeyError as exc:
        raise ValueError(f"a relay has no {exc}") from None
    except TypeError as exc:
        raise ValueError(str(exc)) from None


@dataclass(frozen=True)
class CallerKit:
    """A server or admin kit: the identity that calls the agents, and the sites it knows."""

    project: str
    name: str
    kind: str  # "server" or "admin"
    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    root_ca_pem: bytes = field(repr=False)
    sites: dict[str, SiteEndpoint] = field(default_factory=dict)
    relays: tuple[RelayEndpoint, ...] = ()

    def relay_statuses(self, timeout: float = 5.0) -> dict[str, "dict | Exception"]:
        """What each relay says of the sites attached to it, or the error asking it gave; never raising."""
        if not self.relays:
            return {}
        import asyncio

        from ..relay.tunnel import tunnel_for

        tunnel = tunnel_for(self.relays, TlsIdentity(self.cert_pem, self.key_pem, self.root_ca_pem))

        async def ask(relay: RelayEndpoint) -> "dict | Exception":
            try:
                return await asyncio.wait_for(tunnel.relay_status(relay), timeout)
            except Exception as exc:  # reported per relay, like an unreachable site
                return exc

        async def ask_all() -> list:
            return await asyncio.gather(*(ask(r) for r in self.relays))

        return dict(zip((r.name for r in self.relays), tunnel.run(ask_all(), timeout + 5), strict=True))

    def address(self, site: str) -> str:
        """Where a gRPC channel reaches ``site``: its own address, or an entrance to the relays it dials."""
        endpoint = self.endpoint(site)
        if endpoint.connect == "listen":
            return endpoint.address
        if not self.relays:
            raise KitError(f"site {site!r} dials out to relays, but the {self.kind} kit of {self.name!r} lists none")
        from ..relay.tunnel import tunnel_for

        return tunnel_for(self.relays, TlsIdentity(self.cert_pem, self.key_pem, self.root_ca_pem)).address(site)

    def client(self, site: str, address: str | None = None, **kwargs: Any) -> "AgentClient":
        """A client for ``site``, at ``address`` or where the kit says it is reached."""
        from .sync import AgentClient

        return AgentClient(site, address or self.address(site), self.cert_pem, self.key_pem, self.root_ca_pem, **kwargs)

    def async_client(self, site: str, address: str | None = None, **kwargs: Any) -> "AsyncAgentClient":
        from .aio import AsyncAgentClient

        return AsyncAgentClient(site, address or self.address(site), self.cert_pem, self.key_pem, self.root_ca_pem, **kwargs)

    def site_statuses(self, timeout: float = 5.0, sites: list[str] | None = None) -> dict[str, "AgentStatus | AgentError"]:
        """Every site's status, or the error reaching it gave; asked all at once, never raising."""

        def probe(site: str) -> AgentStatus | AgentError:
            with self.client(site, timeout=timeout) as client:
                try:
                    return client.status()
                except AgentError as exc:
                    return exc

        names = list(self.sites) if sites is None else sites
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(names)))) as pool:
            return dict(zip(names, pool.map(probe, names), strict=True))

    def endpoint(self, site: str) -> SiteEndpoint:
        try:
            return self.sites[site]
        except KeyError:
            raise KeyError(f"site {site!r} is not in the {self.kind} kit of {self.name!r} (sites: {sorted(self.sites)})") from None


class KitError(ValueError):
    """A folder that is not a usable server or admin kit."""


# The config file of each kind of caller kit; it names its holder under the kind ("server": ...).
_CALLER_CONFIGS = {"server": SERVER_CONFIG, "admin": ADMIN_CONFIG}


def load_caller_kit(kit_dir: str | os.PathLike, verify: bool = True, root_fingerprint: str | None = None) -> CallerKit:
    """Read a server kit (``startup/server.json``) or an admin kit (``startup/admin.json``).

    With ``verify`` (the default) the kit's ``startup/`` must first pass its signature
    check (against ``root_fingerprint`` when given): a changed, missing or added file
    raises :class:`KitError` naming it, and nothing of the kit is read.
    """
    from ..provisioning.signature import KitVerificationError, require_valid

    for kind, config_name in _CALLER_CONFIGS.items():
        config_path = Path(kit_dir) / STARTUP / config_name
        if config_path.is_file():
            if verify:
                try:
                    require_valid(config_path.parent, root_fingerprint)
                except KitVerificationError as exc:
                    raise KitError(str(exc)) from None
            return _read_caller_kit(config_path, kind)
    raise KitError(f"{kit_dir}: neither startup/{SERVER_CONFIG} nor startup/{ADMIN_CONFIG} found; pass a server or admin kit")


def _read_caller_kit(config_path: Path, kind: str) -> CallerKit:
    startup = config_path.parent
    try:
        doc = json.loads(config_path.read_text(encoding="utf-8"))
        sites = SiteEndpoint.map_from(doc.get("sites", {}))
        relays = relay_endpoints(doc.get("relays", []))
        return CallerKit(
            project=doc["project"],
            name=doc[kind],
            kind=kind,
            cert_pem=(startup / doc["cert"]).read_bytes(),
            key_pem=(startup / doc["key"]).read_bytes(),
            root_ca_pem=(startup / doc["root_ca"]).read_bytes(),
            sites=sites,
            relays=relays,
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise KitError(f"{config_path}: unusable ({type(exc).__name__}: {exc})") from None


