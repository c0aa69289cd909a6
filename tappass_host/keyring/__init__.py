"""The keyring: a sandbox's signed Compiled Policy (DESIGN §6).

The values every part of the keyring core shares live here, light to import
(`start` needs them without the verifier); verify.py is the trust boundary
that makes a VerifiedKeyring, store.py puts one on disk.
"""

from dataclasses import dataclass, field
from datetime import datetime

PAYLOAD_TYPE = "application/vnd.tappass.keyring+json"
MAX_ENVELOPE_BYTES = 1024 * 1024


@dataclass(frozen=True, order=True)
class KeyringVersion:
    """A keyring's place in its sandbox's history.

    `issued_at` is kept at one-second resolution: that is the resolution of
    the version directory's name, so two updates within one second of each
    other are the same version on disk.
    """

    policy_version: int
    issued_at: datetime

    @property
    def dirname(self) -> str:
        # the year by hand: strftime's %Y does not pad years before 1000 on glibc
        return f"..v{self.policy_version:010d}-{self.issued_at.year:04d}" \
               f"{self.issued_at:%m%dT%H%M%SZ}"


@dataclass(frozen=True)
class VerifiedKeyring:
    payload: dict = field(repr=False)
    payload_bytes: bytes = field(repr=False)
    envelope_bytes: bytes = field(repr=False)
    version: KeyringVersion
    expires_at: datetime
    sha256: str


@dataclass(frozen=True)
class Limits:
    """Host maxima for the `process` aspect (config `limits`)."""

    memory_mb: int = 16384
    pids_max: int = 4096
    cpu_millis: int = 8000
