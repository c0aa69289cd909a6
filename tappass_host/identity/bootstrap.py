"""Bootstrap tokens (DESIGN §5) and the host's list of consumed bootstraps.

A bootstrap URL is `https://<control-plane>/v1/enroll/<token>` with
`token = b64url(claims_json) + "." + b64url(ed25519 signature over claims_json)`,
both parts unpadded base64url. The signature covers the exact claims bytes,
so they are verified as received and never re-encoded.

The host remembers a used bootstrap by the SHA-256 of its `jti` only: the
consumed list must not be a list of tokens.
"""

import base64
import fcntl
import hashlib
import hmac
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tappass_host import signing, strictjson
from tappass_host.identity.errors import BadBootstrap, BootstrapConsumed

VERSION = 1
CLOCK_SKEW_S = 60
MAX_LIFETIME_S = 900
ENROLL_PATH = "/v1/enroll/"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


@dataclass(frozen=True)
class Claims:
    v: int
    jti: str
    org_id: str
    sandbox_spec_ref: str
    iat: int
    exp: int
    sign_key: str
    tls_ca_sha256: str

    @property
    def jti_hash(self) -> str:
        return jti_hash(self.jti)


@dataclass(frozen=True)
class Token:
    claims: Claims
    claims_bytes: bytes
    signature: bytes


@dataclass(frozen=True)
class BootstrapURL:
    origin: str  # scheme://host:port: where the enrollment endpoints live
    host: str  # host:port, for messages
    token: Token
    token_text: str


def jti_hash(jti: str) -> str:
    return hashlib.sha256(jti.encode("utf-8")).hexdigest()


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Strict unpadded base64url: no padding, no other alphabet, no stray bits."""
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not unpadded base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if b64url_encode(data) != text:
        raise ValueError("non-canonical base64url")
    return data


def encode(claims: dict, key: Ed25519PrivateKey) -> str:
    """The control plane's side: sign `claims` and return the token text."""
    claims_bytes = strictjson.canonical(claims)
    return b64url_encode(claims_bytes) + "." + b64url_encode(key.sign(claims_bytes))


def _malformed(what: str) -> BadBootstrap:
    return BadBootstrap("malformed", f"bootstrap token is malformed ({what}); "
                                     "was it truncated or mangled when copied?")


def _claims(doc: object) -> Claims:
    if not isinstance(doc, dict):
        raise _malformed("claims are not a JSON object")
    strings = ("jti", "org_id", "sandbox_spec_ref", "sign_key", "tls_ca_sha256")
    for name in strings:
        if not isinstance(doc.get(name), str) or not doc[name]:
            raise _malformed(f"claim {name!r} is missing or not a string")
    for name in ("v", "iat", "exp"):
        if type(doc.get(name)) is not int:
            raise _malformed(f"claim {name!r} is missing or not an integer")
        if not 0 <= doc[name] < 2**53:  # compared with float seconds later: keep them exact
            raise _malformed(f"claim {name!r} is out of range")
    if doc["v"] != VERSION:
        raise BadBootstrap("malformed", f"bootstrap token has version {doc['v']}; "
                                        f"this host understands version {VERSION}")
    if not _HEX64.fullmatch(doc["tls_ca_sha256"]):
        raise _malformed("claim 'tls_ca_sha256' is not 64 lowercase hex digits")
    try:
        signing.public_key_from_text(doc["sign_key"])
    except signing.BadKey:
        raise _malformed("claim 'sign_key' is not an ed25519 key") from None
    return Claims(**{name: doc[name] for name in Claims.__dataclass_fields__})


def decode(text: str) -> Token:
    """Split and decode a token; checks its shape only, not its signature."""
    parts = text.split(".")
    if len(parts) != 2 or not all(parts):
        raise _malformed("expected two base64url parts joined by '.'")
    try:
        claims_bytes = b64url_decode(parts[0])
        signature = b64url_decode(parts[1])
    except ValueError:
        raise _malformed("not valid base64url") from None
    if len(signature) != 64:
        raise _malformed("the signature has the wrong length")
    try:
        doc = strictjson.loads(claims_bytes)
    except strictjson.StrictJSONError:
        raise _malformed("claims are not valid JSON") from None
    return Token(claims=_claims(doc), claims_bytes=claims_bytes, signature=signature)


def parse_url(url: str) -> BootstrapURL:
    url = url.strip()
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise BadBootstrap("bad_url", "bootstrap URL is not a valid URL") from None
    if parts.scheme != "https":
        shown = parts.scheme or "no scheme"
        raise BadBootstrap("bad_url", f"bootstrap URL must use https ({shown} given)")
    if not parts.hostname:
        raise BadBootstrap("bad_url", "bootstrap URL has no host")
    if not parts.path.startswith(ENROLL_PATH) or parts.query or parts.fragment:
        raise BadBootstrap("bad_url", f"bootstrap URL must look like https://HOST{ENROLL_PATH}TOKEN")
    token_text = parts.path[len(ENROLL_PATH):]
    host = f"{parts.hostname}:{port or 443}"
    if ":" in parts.hostname:
        host = f"[{parts.hostname}]:{port or 443}"
    return BootstrapURL(origin=f"https://{parts.netloc}", host=host,
                        token=decode(token_text), token_text=token_text)


def check_signature(token: Token, key_text: str | None = None) -> None:
    """Verify the token's signature under `key_text` (default: its own sign_key)."""
    key = signing.public_key_from_text(key_text or token.claims.sign_key)
    try:
        key.verify(token.signature, token.claims_bytes)
    except InvalidSignature:
        raise BadBootstrap("bad_signature", "bootstrap signature does not verify: the token "
                                            "was altered or not signed by its key") from None


def check_times(claims: Claims, now: float, skew: int = CLOCK_SKEW_S) -> None:
    if claims.exp <= claims.iat:
        raise _malformed("it expires before it was issued")
    if claims.exp - claims.iat > MAX_LIFETIME_S:
        raise BadBootstrap("lifetime_too_long",
                           f"bootstrap lifetime is {claims.exp - claims.iat} s; "
                           f"at most {MAX_LIFETIME_S} s is accepted")
    if now < claims.iat - skew:
        raise BadBootstrap("not_yet_valid", "bootstrap is issued in the future; "
                                            "check this host's clock")
    if now > claims.exp + skew:
        raise BadBootstrap("expired", f"bootstrap expired {int(now - claims.exp)} s ago; "
                                      "ask for a new one")


def is_pinned(key_text: str, pinned: list[str]) -> bool:
    raw = signing.raw_public(signing.public_key_from_text(key_text))
    return any(hmac.compare_digest(raw, signing.raw_public(signing.public_key_from_text(p)))
               for p in pinned)


class ConsumedList:
    """`<state>/consumed-bootstraps`: one jti hash per line, append-only."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __contains__(self, jti: str) -> bool:
        try:
            lines = self.path.read_text("ascii").split()
        except FileNotFoundError:
            return False
        return jti_hash(jti) in lines

    def check(self, jti: str) -> None:
        if jti in self:
            raise BootstrapConsumed("bootstrap was already consumed on this host; "
                                    "ask the control plane for a new one")

    def add(self, jti: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, (jti_hash(jti) + "\n").encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)


def load_pinned_files(trust_dir: Path) -> list[str]:
    """Keys pinned in `<state>/trust/`: one `ed25519:<b64>` per line, `#` comments."""
    keys = []
    try:
        files = sorted(p for p in Path(trust_dir).iterdir() if p.is_file())
    except FileNotFoundError:
        return []
    for path in files:
        for line in path.read_text("utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                try:
                    signing.public_key_from_text(line)
                except signing.BadKey as exc:
                    raise BadBootstrap("bad_pin", f"pinned key in {path}: {exc}") from None
                keys.append(line)
    return keys

