"""The gRPC channel to an agent: mutual-TLS credentials, options and timeouts."""

from __future__ import annotations

from typing import Any

import grpc

from ..wire.chunks import MAX_MESSAGE_BYTES

DEFAULT_TIMEOUT = 30.0  # seconds for a short call (status, get, acknowledge, abort)
# Transfers of weights have no bound on their total time (None): a large model on a slow
# link takes as long as it takes. They end when nothing moves for DEFAULT_IDLE_TIMEOUT.
DEFAULT_TRANSFER_TIMEOUT = None
# Seconds without a byte moving before a transfer is given up. Generous: on resuming an
# upload after its restart, the agent reads the bytes it kept once before taking more.
DEFAULT_IDLE_TIMEOUT = 120.0
DEFAULT_RESUME_ATTEMPTS = 5  # resumes in a row that move no byte before a cut transfer is given up
RESUME_BACKOFF_S = (0.2, 5.0)  # first and longest wait before resuming a cut transfer
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
