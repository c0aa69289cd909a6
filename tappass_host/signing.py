"""Ed25519 keys in the text form the contracts use: `ed25519:<base64 raw key>`.

A key's id is the hex SHA-256 of its raw 32-byte public key (the DSSE keyid).
Keys are cryptography's Ed25519PrivateKey and Ed25519PublicKey, imported
where a key is made or read: importing this module for PREFIX (the audit log's
readers) costs no cryptography, and the audit log's signer (load_signer) signs
through libcrypto without it (issue 13).
"""

from pathlib import Path

from tappass_host.errors import TappassError

PREFIX = "ed25519:"
# RFC 8410: the DER of an unencrypted PKCS#8 Ed25519 private key is this
# fixed prefix and the 32-byte seed. Reading it directly spares every CLI run
# that loads a key (each audited command) importing cryptography's
# serialization package, which pulls in RSA, SSH and the ciphers.
PKCS8_ED25519_PREFIX = bytes.fromhex("302e020100300506032b657004220420")


class BadKey(TappassError):
    """A key string is not `ed25519:<base64 of 32 bytes>`."""


def public_key_from_text(text: str):
    """The Ed25519PublicKey of `ed25519:<base64>`."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if not isinstance(text, str) or not text.startswith(PREFIX):
        raise BadKey("signing key must look like 'ed25519:<base64>'")
    import base64  # where a key is read or written: not for every reader (issue 13)
    import binascii

    try:
        raw = base64.b64decode(text[len(PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise BadKey("signing key is not valid base64") from None
    if len(raw) != 32:
        raise BadKey("signing key must be 32 bytes")
    return Ed25519PublicKey.from_public_bytes(raw)


def raw_public(key) -> bytes:
    return key.public_bytes_raw()


def public_key_to_text(key) -> str:
    import base64

    return PREFIX + base64.b64encode(raw_public(key)).decode("ascii")


def key_id(key) -> str:
    import hashlib

    return hashlib.sha256(raw_public(key)).hexdigest()


def generate():
    """A new Ed25519PrivateKey."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate()


def load_or_create_private_key(path: Path):
    """Load a PEM Ed25519 key (Ed25519PrivateKey), creating it (0600, O_EXCL) on first use."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path)
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        from cryptography.hazmat.primitives import serialization

        key = generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            from tappass_host.statefile import write_file_durably

            write_file_durably(path, pem, 0o600)
            return key
        except FileExistsError:  # another process won the race: use its key
            pem = path.read_bytes()
    key = _pkcs8_ed25519(pem)
    if key is None:
        from cryptography.hazmat.primitives import serialization

        key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise BadKey(f"{path} is not an Ed25519 private key")
    return key


def load_signer(path: Path):
    """What signs with the key at `path` (`.sign(data) -> bytes`), as
    load_or_create_private_key makes and reads it: a key of the PKCS#8 form
    that makes signs through libcrypto without importing cryptography
    (tappass_host.libcrypto: the audit log's signature on the hot commands);
    a missing key, any other form, or a Python whose libcrypto cannot be
    loaded, through load_or_create_private_key."""
    try:
        seed = _pkcs8_ed25519_seed(Path(path).read_bytes())
    except FileNotFoundError:
        seed = None
    if seed is not None:
        from tappass_host import libcrypto

        signer = libcrypto.signer(seed)
        if signer is not None:
            return signer
    return load_or_create_private_key(path)


def _pkcs8_ed25519(pem: bytes):
    """The key (Ed25519PrivateKey) of an unencrypted PKCS#8 Ed25519 PEM; None for any other PEM."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    seed = _pkcs8_ed25519_seed(pem)
    return None if seed is None else Ed25519PrivateKey.from_private_bytes(seed)


def _pkcs8_ed25519_seed(pem: bytes) -> bytes | None:
    """The 32-byte seed of an unencrypted PKCS#8 Ed25519 PEM; None for any other PEM."""
    lines = pem.strip().splitlines()
    if len(lines) < 3 or lines[0] != b"-----BEGIN PRIVATE KEY-----" \
            or lines[-1] != b"-----END PRIVATE KEY-----":
        return None
    import base64
    import binascii

    try:
        der = base64.b64decode(b"".join(lines[1:-1]), validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(der) != len(PKCS8_ED25519_PREFIX) + 32 or not der.startswith(PKCS8_ED25519_PREFIX):
        return None
    return der[len(PKCS8_ED25519_PREFIX):]
