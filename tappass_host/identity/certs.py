"""The machine key, certificate requests, proof of possession, and renewal.

The machine key (ECDSA P-256) is per host: created once, the first time a
sandbox enrolls, kept at `<state>/machine/key.pem` (0600), and shared by the
certificates of every sandbox on the host. It never leaves the host.
"""

import os
import random
import secrets
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tappass_host import clock, sandbox_record as sandboxes, statefile
from tappass_host.audit import AuditLog
from tappass_host.controlplane.client import ControlPlaneClient
from tappass_host.controlplane.errors import ControlPlaneError, Refused, Unreachable
from tappass_host.identity.bootstrap import b64url_decode, b64url_encode
from tappass_host.identity.errors import IdentityError, RenewalError
from tappass_host.paths import HostPaths

POP_CONTEXT = "tappass-enroll-v1"
RENEW_AT = 0.5  # of the certificate's lifetime
RENEW_JITTER = 0.1  # ± this fraction of RENEW_AT, so hosts do not renew in lockstep
CLOCK_SKEW = timedelta(seconds=60)


class BadMachineKey(IdentityError):
    def __init__(self, path: Path, problem: str):
        super().__init__("machine_key", f"machine key {path} {problem}")


def load_machine_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (ValueError, TypeError):
        raise BadMachineKey(path, "is not a readable unencrypted PEM key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise BadMachineKey(path, "is not an ECDSA P-256 key")
    return key


def load_or_create_machine_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load the machine key, creating it (0600) if this host has none yet.

    The key is written under a temporary name and then hard-linked into
    place, which fails if it exists: concurrent first enrollments all end up
    with the one key that won, and nobody ever reads a half-written file.
    """
    path = Path(path)
    try:
        return load_machine_key(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    statefile.write_file_durably(tmp, pem, 0o600)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return load_machine_key(path)
    finally:
        tmp.unlink(missing_ok=True)
        statefile.fsync_dir(path.parent)
    return key


def build_csr(key: ec.EllipticCurvePrivateKey, common_name: str) -> bytes:
    """A PEM CSR; the control plane decides the certificate's SPIFFE id."""
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


def _pop_message(jti: str, nonce: str) -> bytes:
    return (POP_CONTEXT + jti + nonce).encode("utf-8")


def proof_of_possession(key: ec.EllipticCurvePrivateKey, jti: str, nonce: str) -> str:
    return b64url_encode(key.sign(_pop_message(jti, nonce), ec.ECDSA(hashes.SHA256())))


def verify_proof_of_possession(public_key, jti: str, nonce: str, pop: str) -> bool:
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(pop, str):
        return False
    try:
        public_key.verify(b64url_decode(pop), _pop_message(jti, nonce), ec.ECDSA(hashes.SHA256()))
    except (ValueError, InvalidSignature):
        return False
    return True


def spiffe_ids(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [uri for uri in san.get_values_for_type(x509.UniformResourceIdentifier)
            if uri.startswith("spiffe://")]


def _der(cert_pem: bytes) -> bytes:
    try:
        return x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    except ValueError:
        raise CertificateMismatch("the answer holds no valid CA certificate") from None


def _public_der(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


class CertificateMismatch(ValueError):
    """The certificate the control plane sent is not the one asked for."""


def check_issued(cert_pem: bytes, ca_pem: bytes, key: ec.EllipticCurvePrivateKey,
                 spiffe_id: str, now: datetime | None = None) -> x509.Certificate:
    """The certificate the control plane issued is ours, or CertificateMismatch."""
    now = now or clock.now()
    try:
        cert = x509.load_pem_x509_certificates(cert_pem)[0]
        ca = x509.load_pem_x509_certificate(ca_pem)
    except ValueError:
        raise CertificateMismatch("the answer holds no valid certificate") from None
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise CertificateMismatch("the certificate is not issued by the control plane's "
                                  "CA") from None
    if _public_der(cert.public_key()) != _public_der(key.public_key()):
        raise CertificateMismatch("the certificate is not for this host's machine key")
    if spiffe_id not in spiffe_ids(cert):
        raise CertificateMismatch("the certificate does not carry the sandbox's SPIFFE id")
    if not cert.not_valid_before_utc - CLOCK_SKEW <= now < cert.not_valid_after_utc:
        raise CertificateMismatch("the certificate is not valid now")
    return cert


def renewal_delay(cert: x509.Certificate, now: datetime | None = None,
                  rng: random.Random | None = None) -> float:
    """Seconds until `cert` should be renewed: 50 % of its lifetime ± 10 % jitter."""
    now = now or clock.now()
    rng = rng or random.SystemRandom()
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    fraction = RENEW_AT * (1 + rng.uniform(-RENEW_JITTER, RENEW_JITTER))
    due = cert.not_valid_before_utc + lifetime * fraction
    return max(0.0, (due - now).total_seconds())


def renew_certificate(paths: HostPaths, name: str, *, timeout: float = 10.0,
                      now: datetime | None = None) -> x509.Certificate:
    """Get a new certificate for the same machine key and swap `cert.pem` atomically.

    On any failure the current certificate is left untouched and RenewalError
    (with a reason) is raised; `cert.renewed` is audited on success.
    """
    record = sandboxes.load(paths, name)
    try:
        cert = _renew(paths, name, record, timeout, now)
    except RenewalError as exc:
        AuditLog.for_host(paths).append("cert.renewal_failed", sandbox=name,
                                        details={"reason": exc.reason})
        raise
    AuditLog.for_host(paths).append("cert.renewed", sandbox=name, details={
        "serial": format(cert.serial_number, "x"),
        "not_after": clock.format_timestamp(cert.not_valid_after_utc),
    })
    return cert


def _renew(paths: HostPaths, name: str, record, timeout: float, now) -> x509.Certificate:
    sandbox = paths.sandbox(name)
    failed = f"certificate renewal for {name!r} failed"
    try:
        key = load_machine_key(paths.machine_key)
    except FileNotFoundError as exc:
        raise RenewalError("missing_identity",
                           f"cannot renew {name!r}: {exc.filename} is missing") from None
    except BadMachineKey as exc:
        raise RenewalError("missing_identity", f"cannot renew {name!r}: "
                                               f"unusable identity files ({exc})") from None
    client = ControlPlaneClient(paths, timeout=timeout)
    try:
        doc = client.renew_certificate(name, build_csr(key, name))
    except Refused as exc:
        raise RenewalError("rejected", f"{failed}: the control plane answered "
                                       f"{exc.status}") from None
    except ControlPlaneError as exc:
        reason = "unreachable" if isinstance(exc, Unreachable) else exc.reason
        raise RenewalError(reason, f"{failed}: {exc}") from None
    try:
        cert_pem = doc["cert_pem"].encode("ascii")
        new_ca = doc.get("ca_pem", "").encode("ascii")
    except (KeyError, AttributeError, UnicodeError):
        raise RenewalError("bad_response", f"{failed}: the answer is not a certificate") from None
    ca_pem = sandbox.ca.read_bytes()
    try:
        if new_ca and _der(new_ca) != _der(ca_pem):
            raise CertificateMismatch("the control plane's CA changed; enroll the sandbox again")
        cert = check_issued(cert_pem, ca_pem, key, record.spiffe_id, now)
    except CertificateMismatch as exc:
        raise RenewalError("bad_response", f"{failed}: {exc}") from None
    statefile.write_atomic(sandbox.cert, cert_pem, 0o644)
    return cert
