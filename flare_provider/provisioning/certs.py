"""The project's certificate authority and participant certificates.

Keys are ECDSA P-256 (fast to make, accepted by gRPC's TLS stack and by openssl).
A participant's kind is carried in the subject's OU (server, client, admin) and an
admin's role in its UNSTRUCTURED_NAME, so an agent authorizes from the certificate alone.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .project import Participant

ROOT_VALIDITY_DAYS = 3650
LEAF_VALIDITY_DAYS = 825  # leaf certificates are renewed by re-provisioning

# What each kind of participant does over TLS.
#  - server: the Airflow side; it calls the agents (client) and may serve (server).
#  - client: a site agent serves gRPC (server); clientAuth lets it be refused by identity
#    rather than by handshake when it calls a peer it has no right to.
#  - admin: calls agents only.
_USAGES = {
    "server": [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
    "client": [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
    "admin": [ExtendedKeyUsageOID.CLIENT_AUTH],
}


@dataclass(frozen=True)
class Identity:
    """A certificate with its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert)

    @classmethod
    def from_pem(cls, cert_pem: bytes, key_pem: bytes) -> "Identity":
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("expected an EC private key")
        if key.public_key().public_numbers() != cert.public_key().public_numbers():
            raise ValueError("the private key does not match the certificate")
        return cls(cert, key)


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def create_root_ca(project_name: str, org: str | None = None) -> Identity:
    key = _new_key()
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, project_name)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    name = x509.Name(attrs)
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=ROOT_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return Identity(cert, key)


def _key_usage(ca: bool) -> x509.KeyUsage:
    """A root CA signs certificates; a leaf signs and agrees keys (ECDHE in TLS)."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _san_entry(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def issue_certificate(
    root: Identity, participant: Participant, validity_days: int = LEAF_VALIDITY_DAYS
) -> Identity:
    key = _new_key()
    attrs = [
        x509.NameAttribute(NameOID.COMMON_NAME, participant.name),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, participant.org),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, participant.type),
    ]
    if participant.role:
        attrs.append(x509.NameAttribute(NameOID.UNSTRUCTURED_NAME, participant.role))
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=validity_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(_USAGES[participant.type]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root.key.public_key()), critical=False
        )
    )
    if participant.type != "admin":
        sans = [_san_entry(h) for h in participant.subject_alt_names]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return Identity(builder.sign(root.key, hashes.SHA256()), key)


@dataclass(frozen=True)
class PeerIdentity:
    """What a verified peer certificate says about its holder."""

    name: str
    org: str
    kind: str  # server / client / admin
    role: str | None


def describe_certificate(cert: x509.Certificate) -> PeerIdentity:
    def one(oid) -> str | None:
        values = cert.subject.get_attributes_for_oid(oid)
        return str(values[0].value) if values else None

    return PeerIdentity(
        name=one(NameOID.COMMON_NAME) or "",
        org=one(NameOID.ORGANIZATION_NAME) or "",
        kind=one(NameOID.ORGANIZATIONAL_UNIT_NAME) or "",
        role=one(NameOID.UNSTRUCTURED_NAME),
    )
