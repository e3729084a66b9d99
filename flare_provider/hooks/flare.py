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


def _pem_field(conn: Any, field: str, value: Any) -> bytes:
    """A field's PEM blocks (see :func:`normalize_pem`); never a value of the field in the error."""
    if not isinstance(value, str):
        raise FlareConnectionError(f"connection {conn.conn_id!r}: {field} must be PEM text, got {type(value).__name__}")
    try:
        return normalize_pem(value)
    except UnicodeEncodeError:
        raise FlareConnectionError(f"connection {conn.conn_id!r}: {field} holds characters PEM cannot carry") from None


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
        from flare_provider.client.kit import relay_endpoints

        try:
            extra = conn.extra_dejson if hasattr(conn, "extra_dejson") else json.loads(conn.extra or "{}")
        except (ValueError, RecursionError) as exc:
            raise FlareConnectionError(f"connection {conn.conn_id!r}: extra is not JSON: {exc}") from None
        if not isinstance(extra, dict):
            raise FlareConnectionError(f"connection {conn.conn_id!r}: extra must be a JSON object, got {type(extra).__name__}")
        # The UI's form stores its fields as "extra__flare__<name>"; imported files use "<name>".
        extra = {k.removeprefix(f"extra__{cls.conn_type}__"): v for k, v in extra.items()}
        missing = [k for k in ("project", "cert_pem", "root_ca_pem", "sites") if not extra.get(k)]
        if not conn.login:
            missing.append("login (the server identity's name)")
        key_pem = _pem_field(conn, "password", conn.password or "")
        if not key_pem:
            missing.append("password (the server identity's private key, PEM)")
        if missing:
            raise FlareConnectionError(
                f"connection {conn.conn_id!r} lacks {', '.join(missing)}; import the server kit's startup/connections.json"
            )
        if not isinstance(extra["project"], str) or not isinstance(conn.login, str):
            raise FlareConnectionError(f"connection {conn.conn_id!r}: project and login must be names (text)")
        sites = extra["sites"]
        relays = extra.get("relays") or []
        try:  # both may be JSON text (a form field) or already parsed (an imported connection)
            endpoints = SiteEndpoint.map_from(json.loads(sites) if isinstance(sites, str) else sites)
        except (AttributeError, KeyError, TypeError, ValueError, RecursionError) as exc:
            raise FlareConnectionError(f"connection {conn.conn_id!r}: sites must map names to {{host, port}}: {exc}") from None
        try:
            relays = relay_endpoints(json.loads(relays) if isinstance(relays, str) else relays)
        except (ValueError, RecursionError) as exc:
            raise FlareConnectionError(f"connection {conn.conn_id!r}: relays must be a list of {{name, host, port}}: {exc}") from None
        pems = {}
        for field in ("cert_pem", "root_ca_pem"):
            pems[field] = _pem_field(conn, field, extra[field])
            if not pems[field]:
                raise FlareConnectionError(f"connection {conn.conn_id!r}: {field} holds no PEM block")
        return CallerKit(
            project=extra["project"],
            name=conn.login,
            kind="server",
            cert_pem=pems["cert_pem"],
            key_pem=key_pem,
            root_ca_pem=pems["root_ca_pem"],
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
