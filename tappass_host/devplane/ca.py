"""The devplane's certificate authority (ECDSA P-256).

One CA stands behind both the control plane's TLS server certificate and
the sandboxes' client certificates; its DER SHA-256 is the `tls_ca_sha256`
that bootstrap tokens carry. The CA carries its trust domain's SPIFFE id
(`spiffe://<trust domain>`, SPIFFE X.509-SVID §4.1) as a URI SAN.
"""

import hashlib
import ipaddress
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_LIFETIME = timedelta(days=3650)
SERVER_LIFETIME = timedelta(days=30)
BACKDATE = timedelta(minutes=5)  # tolerate clients whose clock is a little behind


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


@dataclass(frozen=True)
class CertificateAuthority:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, trust_domain: str) -> "CertificateAuthority":
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(timezone.utc)
        cert = (x509.CertificateBuilder()
                .subject_name(_name(f"tappass-devplane CA ({trust_domain})"))
                .issuer_name(_name(f"tappass-devplane CA ({trust_domain})"))
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - BACKDATE)
                .not_valid_after(now + CA_LIFETIME)
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .add_extension(x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]), critical=False)
                .sign(key, hashes.SHA256()))
        return cls(key=key, cert=cert)

    @classmethod
    def from_pem(cls, cert_data: bytes, key_data: bytes) -> "CertificateAuthority":
        key = serialization.load_pem_private_key(key_data, password=None)
        return cls(key=key, cert=x509.load_pem_x509_certificate(cert_data))

    @property
    def pem(self) -> bytes:
        return cert_pem(self.cert)

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the DER: the `tls_ca_sha256` claim."""
        return hashlib.sha256(self.cert.public_bytes(serialization.Encoding.DER)).hexdigest()

    def _leaf(self, subject: str, public_key, sans: list[x509.GeneralName],
              usages: list[x509.ObjectIdentifier], lifetime: timedelta) -> x509.Certificate:
        now = datetime.now(timezone.utc)
        return (x509.CertificateBuilder()
                .subject_name(_name(subject))
                .issuer_name(self.cert.subject)
                .public_key(public_key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - BACKDATE)
                .not_valid_after(now + lifetime)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False,
                    crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
                .add_extension(x509.SubjectAlternativeName(sans), critical=True)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self.key.public_key()), critical=False)
                .sign(self.key, hashes.SHA256()))

    def issue_server(self, hosts: list[str]) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """A TLS server certificate for `hosts` (names or IP addresses)."""
        key = ec.generate_private_key(ec.SECP256R1())
        sans = list(dict.fromkeys(_san(h) for h in hosts))
        cert = self._leaf("tappass-devplane", key.public_key(), sans,
                          [ExtendedKeyUsageOID.SERVER_AUTH], SERVER_LIFETIME)
        return key, cert

    def issue_client(self, csr: x509.CertificateSigningRequest, spiffe_id: str,
                     lifetime: timedelta) -> x509.Certificate:
        """A sandbox X.509-SVID for the CSR's key; the SPIFFE id is the only SAN.

        SPIFFE X.509-SVID §4.4: an extended key usage, when present, holds both
        serverAuth and clientAuth.
        """
        subject = spiffe_id.rsplit("/", 1)[-1]
        return self._leaf(subject, csr.public_key(), [x509.UniformResourceIdentifier(spiffe_id)],
                          [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
                          lifetime)
