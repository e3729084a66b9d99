"""The gRPC channel to an agent: mutual-TLS credentials, options and timeouts."""

from __future__ import annotations

from typing import Any

import grpc

from ..wire.chunks import MAX_MESSAGE_BYTES

DEFAULT_TIMEOUT = 30.0  # seconds for a short call (status, get, acknowledge, abort)
DEFAULT_TRANSFER_TIMEOUT = 3600.0  # seconds for an upload or a download of weights
DEFAULT_MAX_RESULT_BYTES = 8 << 30
RECONNECT_BACKOFF_MS = 3_000  # longest wait between attempts to reach a site that was down


def channel_options(site: str) -> list[tuple[str, Any]]:
    return [
        # The agent must prove it is `site`, whatever host name or address reached it.
        ("grpc.ssl_target_name_override", site),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        # Long watches and transfers survive idle firewalls; the agent permits this rate.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        # Calls fail fast while a site is down; once it is back, a client reconnects within
        # seconds (gRPC's default backoff grows to two minutes).
        ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS),
    ]


def channel_credentials(cert_pem: bytes, key_pem: bytes, root_ca_pem: bytes) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=root_ca_pem, private_key=key_pem, certificate_chain=cert_pem)




class AgentCaller:
    """What both clients hold: the site they call, where its agent is, and the caller's TLS identity."""

    def __init__(
        self,
        site: str,
        address: str,
        cert_pem: bytes,
        key_pem: bytes,
        root_ca_pem: bytes,
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ):
        self.site = site
        self.address = address
        self.timeout = timeout
        self._credentials = channel_credentials(cert_pem, key_pem, root_ca_pem)
        self._options = channel_options(site)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(site={self.site!r}, address={self.address!r})"
