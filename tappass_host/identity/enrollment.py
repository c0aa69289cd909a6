"""Enrollment: a one-time bootstrap URL in, an enrolled sandbox out (DESIGN §5).

  1. verify the token locally: signature, pinned key (or explicit
     trust-on-first-use), issue and expiry times, the consumed list. Nothing
     is sent anywhere before this passes;
  2. fetch the control plane's CA and check it against the signed
     `tls_ca_sha256`; every later request verifies TLS against that CA only;
  3. ask for a challenge nonce;
  4. load (or create) the machine key, build the CSR and proof of possession;
  5. `complete`: the control plane burns the token and issues the certificate;
  6. commit: stage identity + sandbox.json in a hidden directory, rename it
     into place, remember the bootstrap as consumed, audit `enroll.ok`.

Steps 2, 3 and 5 are calls of tappass_host.controlplane.client; this module
checks what they answer. On any failure no sandbox directory exists
afterwards, `enroll.failed` is audited with a reason code, and an
IdentityError says what went wrong (a ControlPlaneError when a call could
not get a usable answer: unreachable, untrusted TLS, too large). The
machine key is the one thing that may outlive a failed enrollment: it is per
host and kept once created. A key trusted on first use is pinned only when
the enrollment succeeds.
"""

import fcntl
import hashlib
import hmac
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tappass_host import clock, sandbox_record as sandboxes, signing, statefile
from tappass_host.audit import AuditLog
from tappass_host.controlplane import client
from tappass_host.controlplane.client import Enrollment
from tappass_host.controlplane.errors import Refused
from tappass_host.errors import TappassError
from tappass_host.identity import bootstrap as bootstraps, certs
from tappass_host.identity.errors import (
    AlreadyEnrolled,
    BadBootstrap,
    BootstrapConsumed,
    EnrollmentRefused,
    IdentityError,
)
from tappass_host.paths import check_sandbox_name, HostPaths, SandboxPaths

_SANDBOX_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


@dataclass(frozen=True)
class TrustPolicy:
    """Keys pinned by config or command line; `<state>/trust/` is read as well."""

    pinned: tuple[str, ...] = ()
    trust_on_first_use: bool = False


def _stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def enroll(paths: HostPaths, name: str, url: str, trust: TrustPolicy, *,
           warn: Callable[[str], None] = _stderr, timeout: float = 10.0,
           now: float | None = None) -> sandboxes.SandboxRecord:
    """Enroll sandbox `name` from the bootstrap `url`; returns its record."""
    check_sandbox_name(name)
    audit = AuditLog.for_host(paths)
    try:
        if paths.sandbox(name).root.exists():
            raise AlreadyEnrolled(name)
        bootstrap = bootstraps.parse_url(url)
        tofu = verify(paths, bootstrap.token, trust, time.time() if now is None else now)
        if tofu:
            warn(f"trusting control-plane key {_key_id(bootstrap.token.claims.sign_key)} "
                 "on first use: check it with your control plane's operator")
        record, cert, ca_pem = _enroll_online(paths, name, bootstrap, timeout)
        _commit(paths, record, cert, ca_pem)
    except TappassError as exc:
        audit.append("enroll.failed", sandbox=name,
                     details={"reason": getattr(exc, "reason", "invalid")})
        raise
    claims = bootstrap.token.claims
    bootstraps.ConsumedList(paths.consumed_bootstraps).add(claims.jti)
    if tofu:
        pin_key(paths, claims.sign_key)
        audit.append("trust.tofu", sandbox=name, details={"key_id": _key_id(claims.sign_key)})
    audit.append("enroll.ok", sandbox=name, details={
        "sandbox_id": record.sandbox_id, "org_id": record.org_id, "spiffe_id": record.spiffe_id,
        "sync_url": record.sync_url, "bootstrap": "sha256:" + claims.jti_hash,
        "cert_serial": format(cert.serial_number, "x"),
    })
    return record


def verify(paths: HostPaths, token: bootstraps.Token, trust: TrustPolicy, now: float) -> bool:
    """Step 1, offline. Returns True if the signing key must be trusted on first use."""
    claims = token.claims
    bootstraps.check_signature(token)
    pinned = list(trust.pinned) + bootstraps.load_pinned_files(paths.trust)
    try:
        pinned_here = bootstraps.is_pinned(claims.sign_key, pinned)
    except signing.BadKey as exc:
        raise BadBootstrap("bad_pin", f"a pinned key (config trust.keys or --trust-key) is "
                                      f"unusable: {exc}") from None
    tofu = False
    if not pinned_here:
        if not trust.trust_on_first_use:
            key_id = _key_id(claims.sign_key)
            if pinned:
                raise BadBootstrap("untrusted_key", f"bootstrap is signed by key {key_id}, "
                                                    "which is not pinned on this host")
            raise BadBootstrap("untrusted_key", f"bootstrap is signed by key {key_id}, but no "
                                                "control-plane key is pinned on this host: pass "
                                                "--trust-key KEY or --trust-on-first-use")
        tofu = True
    bootstraps.check_times(claims, now)
    bootstraps.ConsumedList(paths.consumed_bootstraps).check(claims.jti)
    return tofu


def pin_key(paths: HostPaths, key_text: str) -> Path:
    paths.trust.mkdir(parents=True, exist_ok=True)
    path = paths.trusted_key(_key_id(key_text))
    statefile.write_atomic(path, (key_text + "\n").encode("ascii"), 0o644)
    return path


def _key_id(key_text: str) -> str:
    return signing.key_id(signing.public_key_from_text(key_text))[:16]


def _enroll_online(paths: HostPaths, name: str, bootstrap: bootstraps.BootstrapURL,
                   timeout: float):
    ca_pem = fetch_ca(bootstrap, timeout)
    claims = bootstrap.token.claims
    try:
        with Enrollment(bootstrap.origin, ca_pem, timeout=timeout) as control_plane:
            nonce = control_plane.challenge(bootstrap.token_text).get("nonce")
            if not isinstance(nonce, str) or not nonce:
                raise _bad_answer(bootstrap.host, "the challenge has no nonce")
            key = certs.load_or_create_machine_key(paths.machine_key)
            answer = control_plane.complete(bootstrap.token_text, nonce,
                                            certs.build_csr(key, name),
                                            certs.proof_of_possession(key, claims.jti, nonce))
    except Refused as exc:
        raise _refusal(bootstrap.host, exc.status) from None
    record, cert = _accept(name, claims, answer, key, ca_pem, bootstrap.host)
    return record, cert, ca_pem


def fetch_ca(bootstrap: bootstraps.BootstrapURL, timeout: float) -> bytes:
    """Step 2: the one request made without verifying TLS, checked against the signed pin."""
    try:
        answer = client.fetch_ca(bootstrap.origin, timeout=timeout)
    except Refused as exc:
        raise EnrollmentRefused("bad_response", f"the control plane at {bootstrap.host} "
                                                f"answered HTTP {exc.status} for its CA") from None
    try:
        found = x509.load_pem_x509_certificates(answer)
    except ValueError:
        found = []
    if len(found) != 1:
        raise _bad_answer(bootstrap.host, "its CA is not one PEM certificate")
    digest = hashlib.sha256(found[0].public_bytes(serialization.Encoding.DER)).hexdigest()
    if not hmac.compare_digest(digest, bootstrap.token.claims.tls_ca_sha256):
        raise EnrollmentRefused("ca_mismatch", f"the TLS CA of {bootstrap.host} is not the one "
                                               "the bootstrap names (tls_ca_sha256): possible "
                                               "man-in-the-middle, nothing was sent")
    return found[0].public_bytes(serialization.Encoding.PEM)


_REFUSALS = {
    400: ("rejected_malformed", "rejected the request as malformed (400)"),
    401: ("rejected_signature", "rejected the bootstrap's signature or the proof of "
                                "possession (401)"),
    403: ("expired", "says the bootstrap has expired (403)"),
    404: ("unknown", "does not know this bootstrap (404): was it issued by another "
                     "control plane?"),
}


def _refusal(host: str, status: int) -> IdentityError:
    """What a refusal of challenge or complete means (DESIGN §5)."""
    if status == 410:
        return BootstrapConsumed(f"bootstrap was already consumed: the control plane at {host} "
                                 "refused it (410 Gone); ask for a new one")
    if status in _REFUSALS:
        reason, what = _REFUSALS[status]
        return EnrollmentRefused(reason, f"the control plane at {host} {what}")
    return EnrollmentRefused("bad_response", f"the control plane at {host} answered "
                                             f"HTTP {status}")


def _bad_answer(host: str, problem: str) -> EnrollmentRefused:
    return EnrollmentRefused("bad_response", f"the control plane at {host} sent a bad answer: "
                                             f"{problem}")


def _check_origin(url: object) -> str:
    if not isinstance(url, str):
        raise ValueError("sync_url is missing")
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.fragment:
        raise ValueError("sync_url is not an https origin")
    return f"https://{parts.netloc}"


def _accept(name: str, claims: bootstraps.Claims, answer: dict, key, ca_pem: bytes,
            host: str) -> tuple[sandboxes.SandboxRecord, x509.Certificate]:
    """Step 5's answer, checked: a certificate for our key under the pinned CA."""
    try:
        sandbox_id = answer.get("sandbox_id")
        if not isinstance(sandbox_id, str) or not _SANDBOX_ID.fullmatch(sandbox_id):
            raise ValueError("sandbox_id is missing or not a plain identifier")
        spiffe_id = answer.get("spiffe_id")
        if not isinstance(spiffe_id, str) or not spiffe_id.startswith("spiffe://") \
                or not spiffe_id.endswith(f"/org/{claims.org_id}/sandbox/{sandbox_id}"):
            raise ValueError("spiffe_id does not name this org and sandbox")
        sync_url = _check_origin(answer.get("sync_url"))
        keys, threshold = answer.get("signing_keys"), answer.get("threshold")
        if not isinstance(keys, list) or not keys:
            raise ValueError("signing_keys is missing")
        for key_text in keys:
            signing.public_key_from_text(key_text)
        if not bootstraps.is_pinned(claims.sign_key, keys):
            raise ValueError("signing_keys does not include the key that signed the bootstrap")
        if type(threshold) is not int or not 1 <= threshold <= len(keys):
            raise ValueError("threshold is not between 1 and the number of signing keys")
        for field in ("cert_pem", "ca_pem"):
            if not isinstance(answer.get(field), str):
                raise ValueError(f"{field} is missing")
        issued_ca = answer["ca_pem"].encode("ascii")
        if x509.load_pem_x509_certificate(issued_ca) != x509.load_pem_x509_certificate(ca_pem):
            raise ValueError("ca_pem is not the pinned CA")
        cert_pem = answer["cert_pem"].encode("ascii")
        cert = certs.check_issued(cert_pem, ca_pem, key, spiffe_id)
    except (ValueError, signing.BadKey, UnicodeError) as exc:
        raise _bad_answer(host, str(exc)) from None
    record = sandboxes.SandboxRecord(
        name=name, sandbox_id=sandbox_id, org_id=claims.org_id, spiffe_id=spiffe_id,
        sync_url=sync_url, signing_keys=list(keys), threshold=threshold,
        created_at=clock.now_text(),
    )
    return record, cert


def _commit(paths: HostPaths, record: sandboxes.SandboxRecord, cert: x509.Certificate,
            ca_pem: bytes) -> None:
    """Step 6: all files are written in a staging directory, then one rename publishes them."""
    final = paths.sandbox(record.name)
    try:
        paths.sandboxes.mkdir(parents=True, exist_ok=True)
        with statefile.locked(paths.enroll_lock):
            _remove_orphaned_staging(paths.sandboxes)
            staging = Path(tempfile.mkdtemp(prefix=f".enroll-{record.name}.",
                                            dir=paths.sandboxes))
            staging_fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fcntl.flock(staging_fd, fcntl.LOCK_EX)
    except OSError as exc:
        raise IdentityError("io", f"cannot create {paths.sandboxes}: {exc.strerror}") from None
    try:
        os.chmod(staging, 0o755)
        staged = SandboxPaths(root=staging, runtime=final.runtime)
        staged.identity.mkdir()
        os.chmod(staged.identity, 0o700)
        statefile.write_file_durably(staged.cert, cert.public_bytes(serialization.Encoding.PEM),
                                     0o644)
        statefile.write_file_durably(staged.ca, ca_pem, 0o644)
        statefile.fsync_dir(staged.identity)
        sandboxes.save(staged, record)
        with statefile.locked(paths.enroll_lock):
            if final.root.exists():
                raise AlreadyEnrolled(record.name)
            os.rename(staging, final.root)
        statefile.fsync_dir(paths.sandboxes)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise IdentityError("io", f"cannot write sandbox {record.name!r}: {exc}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        os.close(staging_fd)


def _remove_orphaned_staging(sandboxes_dir: Path) -> None:
    """An enrollment holds a lock on its staging directory while it lives; one
    that can be locked here was left by an enrollment killed mid-way."""
    for leftover in sandboxes_dir.glob(".enroll-*"):
        try:
            fd = os.open(leftover, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live enrollment's
        finally:
            os.close(fd)
        shutil.rmtree(leftover, ignore_errors=True)
