"""TLS for relay connections: contexts from a kit's PEM material, and who is on the other end."""

from __future__ import annotations

import os
import ssl
import tempfile
from dataclasses import dataclass, field

from cryptography import x509

from ..provisioning.certs import PeerIdentity, describe_certificate


@dataclass(frozen=True)
class TlsIdentity:
    """A participant's certificate and key, and the project root CA it trusts (all PEM)."""

    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    root_ca_pem: bytes = field(repr=False)

    def context(self, server_side: bool) -> ssl.SSLContext:
        """A context that presents this identity and accepts only peers of the project's CA.

        A client context also checks that the relay's certificate names the relay it
        meant to reach (callers pass the relay's participant name as ``server_hostname``).
        """
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=self.root_ca_pem.decode())
        # The ssl module loads keys from files only: a private folder, removed at once.
        with tempfile.TemporaryDirectory(prefix="flare-tls-") as folder:
            cert_file, key_file = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
            with open(cert_file, "wb") as f:
                f.write(self.cert_pem)
            with open(os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                f.write(self.key_pem)
            ctx.load_cert_chain(cert_file, key_file)
        return ctx


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> PeerIdentity:
    """The verified peer's name, org, kind and role, from its certificate."""
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise ssl.SSLError("the peer presented no certificate")
    return describe_certificate(x509.load_der_x509_certificate(der))
