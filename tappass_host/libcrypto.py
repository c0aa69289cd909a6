"""Ed25519 signing through OpenSSL's libcrypto, by ctypes: the audit log's
signer on the hot commands (issue 13). Importing cryptography (its Rust
bindings) was an eighth of every `start --foreground --rm` and `stop`, for one
signature each; the library that makes it is OpenSSL's either way.

Only signing with a key's 32-byte seed (RFC 8032: the signature of a seed and a
message is one value, whoever computes it) and the public key of that seed.
Making keys, reading other key forms and every verification stay with
cryptography (tappass_host.signing).

The library is the libcrypto the interpreter's hashlib already has mapped (its
path read from /proc/self/maps), else `libcrypto.so.3`; `signer` returns None
where neither loads (a Python with OpenSSL linked in statically) and the
caller signs with cryptography instead.
"""

import ctypes

EVP_PKEY_ED25519 = 1087  # NID_ED25519
SEED_BYTES = 32
SIGNATURE_BYTES = 64
FALLBACK_SONAME = "libcrypto.so.3"

_handle = None
_unavailable = False


class LibcryptoError(Exception):
    """libcrypto refused a call it should not have (out of memory, a broken library)."""


class Ed25519Signer:
    """One Ed25519 private key held by libcrypto (an EVP_PKEY)."""

    __slots__ = ("_lib", "_pkey")

    def __init__(self, lib, seed: bytes):
        if len(seed) != SEED_BYTES:
            raise ValueError("an Ed25519 seed is 32 bytes")
        self._lib = lib
        self._pkey = lib.EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, None, seed, SEED_BYTES)
        if not self._pkey:
            raise LibcryptoError("EVP_PKEY_new_raw_private_key failed")

    def sign(self, data: bytes) -> bytes:
        lib = self._lib
        ctx = lib.EVP_MD_CTX_new()
        if not ctx:
            raise LibcryptoError("EVP_MD_CTX_new failed")
        try:
            signature = ctypes.create_string_buffer(SIGNATURE_BYTES)
            length = ctypes.c_size_t(SIGNATURE_BYTES)
            if (lib.EVP_DigestSignInit(ctx, None, None, None, self._pkey) != 1
                    or lib.EVP_DigestSign(ctx, signature, ctypes.byref(length),
                                          data, len(data)) != 1
                    or length.value != SIGNATURE_BYTES):
                raise LibcryptoError("Ed25519 signing failed")
            return signature.raw
        finally:
            lib.EVP_MD_CTX_free(ctx)

    def public_bytes_raw(self) -> bytes:
        public = ctypes.create_string_buffer(SEED_BYTES)
        length = ctypes.c_size_t(SEED_BYTES)
        if (self._lib.EVP_PKEY_get_raw_public_key(self._pkey, public, ctypes.byref(length)) != 1
                or length.value != SEED_BYTES):
            raise LibcryptoError("EVP_PKEY_get_raw_public_key failed")
        return public.raw

    def __del__(self):
        if getattr(self, "_pkey", None):
            self._lib.EVP_PKEY_free(self._pkey)
            self._pkey = None


def signer(seed: bytes) -> Ed25519Signer | None:
    """The signer of `seed`; None where libcrypto cannot be loaded."""
    lib = _library()
    return None if lib is None else Ed25519Signer(lib, seed)


def _library():
    global _handle, _unavailable
    if _handle is None and not _unavailable:
        try:
            _handle = _declared(ctypes.CDLL(_mapped_path() or FALLBACK_SONAME))
        except (OSError, AttributeError):  # not found, or too old to have these calls
            _unavailable = True
    return _handle


def _mapped_path() -> str | None:
    """The path of the libcrypto this process has mapped, once hashlib loaded it."""
    try:
        import _hashlib  # noqa: F401  (maps libcrypto; hashlib is imported by then anyway)
    except ImportError:
        return None
    try:
        with open("/proc/self/maps", "rb") as maps:
            for line in maps:
                path = line.rpartition(b" ")[2].strip()
                if b"/libcrypto.so" in path:
                    return path.decode("utf-8", "surrogateescape")
    except OSError:
        pass
    return None


def _declared(lib):
    pointer, size, buffer = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p
    lib.EVP_PKEY_new_raw_private_key.restype = pointer
    lib.EVP_PKEY_new_raw_private_key.argtypes = (ctypes.c_int, pointer, buffer, size)
    lib.EVP_PKEY_get_raw_public_key.argtypes = (pointer, buffer, ctypes.POINTER(size))
    lib.EVP_PKEY_free.argtypes = (pointer,)
    lib.EVP_MD_CTX_new.restype = pointer
    lib.EVP_MD_CTX_free.argtypes = (pointer,)
    lib.EVP_DigestSignInit.argtypes = (pointer, pointer, pointer, pointer, pointer)
    lib.EVP_DigestSign.argtypes = (pointer, buffer, ctypes.POINTER(size), buffer, size)
    return lib
