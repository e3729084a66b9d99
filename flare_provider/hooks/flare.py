"""``FlareHook``: the server identity of a federation, from an Airflow connection.

The connection (type ``flare``) is what ``airflow connections import`` makes of the server
kit's ``startup/connections.json``: login = the server identity's name, password = its
private key (PEM, a masked field), extra = project, certificate, root CA and the sites'
endpoints. Workers anywhere can then reach the sites; no shared filesystem is needed.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseHook

if TYPE_CHECKING:
    from flare_provider.client import AgentClient, AsyncAgentClient, CallerKit

_PEM = re.compile(r"-----BEGIN ([A-Z ]+)-----(.*?)-----END \1-----", re.S)


def normalize_pem(text: str) -> bytes:
    """PEM blocks as PEM, even after a one-line form field turned their newlines into spaces."""
    blocks = []
    for label, body in _PEM.findall(text or ""):
        b64 = "".join(body.split())
        lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
        blocks.append("\n".join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----"]))
    return ("\n".join(blocks) + "\n").encode() if blocks else b""


class FlareConnectionError(ValueError):
    """A ``flare`` connection that lacks what reaching the sites needs."""


class FlareHook(BaseHook):
    """Reach a federation's site agents with the server identity of connection ``flare_conn_id``."""

    conn_name_attr = "flare_conn_id"
    default_conn_name = "flare_default"
    conn_type = "flare"
    hook_name = "Federated Learning (FLARE)"

    def __init__(self, flare_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.flare_conn_id = flare_conn_id
        self._kit: CallerKit | None = None

    @classmethod
    def kit_from_connection(cls, conn: Any) -> "CallerKit":
        from flare_provider.client import CallerKit, SiteEndpoint
        from flare_provider.relay.dial import RelayEndpoint

        try:
            extra = conn.extra_dejson if hasattr(conn, "extra_dejson") else json.loads(conn.extra or "{}")
        except ValueError as exc:
            raise FlareConnectionError(f"connection {conn.conn_id!r}: extra is not JSON: {exc}") from None
        # The UI's form stores its fields as "extra__flare__<name>"; imported files use "<name>".
        extra = {k.removeprefix(f"extra__{cls.conn_type}__"): v for k, v in extra.items()}
        missing = [k for k in ("project", "cert_pem", "root_ca_pem", "sites") if not extra.get(k)]
        if not conn.login:
            missing.append("login (the server identity's name)")
        key_pem = normalize_pem(conn.password or "")
        if not key_pem:
            missing.append("password (the server identity's private key, PEM)")
        if missing:
            raise FlareConnectionError(
                f"connection {conn.conn_id!r} lacks {', '.join(missing)}; import the server kit's startup/connections.json"
            )
        sites = extra["sites"]
        if isinstance(sites, str):
            sites = json.loads(sites)
        relays = extra.get("relays") or []
        try:
            endpoints = SiteEndpoint.map_from(sites)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise FlareConnectionError(f"connection {conn.conn_id!r}: sites must map names to {{host, port}}: {exc}") from None
        try:
            relays = tuple(RelayEndpoint.from_dict(r) for r in (json.loads(relays) if isinstance(relays, str) else relays))
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise FlareConnectionError(f"connection {conn.conn_id!r}: relays must be a list of {{name, host, port}}: {exc}") from None
        return CallerKit(
            project=extra["project"],
            name=conn.login,
            kind="server",
            cert_pem=normalize_pem(extra["cert_pem"]),
            key_pem=key_pem,
            root_ca_pem=normalize_pem(extra["root_ca_pem"]),
            sites=endpoints,
            relays=relays,
        )

    def get_kit(self) -> "CallerKit":
        """The server identity and the sites it knows (read once per hook)."""
        if self._kit is None:
            self._kit = self.kit_from_connection(self.get_connection(self.flare_conn_id))
        return self._kit

    @classmethod
    async def aget_kit(cls, flare_conn_id: str) -> "CallerKit":
        """The same, from inside an event loop (Airflow triggers)."""
        return cls.kit_from_connection(await cls.aget_connection(flare_conn_id))

    @property
    def sites(self) -> list[str]:
        return sorted(self.get_kit().sites)

    def get_client(self, site: str, **kwargs: Any) -> "AgentClient":
        return self.get_kit().client(site, **kwargs)

    def get_async_client(self, site: str, **kwargs: Any) -> "AsyncAgentClient":
        return self.get_kit().async_client(site, **kwargs)

    def site_status(self, sites: list[str] | None = None, timeout: float = 10.0) -> dict[str, Any]:
        """Each site's status, or the error reaching it gave (asked concurrently, never raising)."""
        return self.get_kit().site_statuses(timeout=timeout, sites=sites)

    def test_connection(self) -> tuple[bool, str]:
        """The Airflow UI's connection test: every site must answer."""
        try:
            results = self.site_status()
        except Exception as exc:
            return False, str(exc)
        down = {s: str(r) for s, r in results.items() if isinstance(r, Exception)}
        if down:
            return False, "unreachable: " + "; ".join(f"{s}: {why}" for s, why in down.items())
        return True, f"all {len(results)} sites answered"
