"""The keyring: a sandbox's signed Compiled Policy (DESIGN §6).

The values every part of the keyring core shares live here, light to import
(`start` needs them without the verifier); verify.py is the trust boundary
that makes a VerifiedKeyring, store.py puts one on disk.
"""

from collections import namedtuple

PAYLOAD_TYPE = "application/vnd.tappass.keyring+json"
MAX_ENVELOPE_BYTES = 1024 * 1024


# collections.namedtuple, not frozen dataclasses nor typing.NamedTuple: `status`
# imports this package, and dataclasses (with inspect, ast, dis) would be a
# quarter of its start-up, typing a tenth (issue 13).
class KeyringVersion(namedtuple("KeyringVersion", "policy_version issued_at")):
    """A keyring's place in its sandbox's history, ordered by
    (policy_version, issued_at).

    `issued_at` is kept at one-second resolution: that is the resolution of
    the version directory's name, so two updates within one second of each
    other are the same version on disk.
    """

    __slots__ = ()  # policy_version: int, issued_at: datetime

    @property
    def dirname(self) -> str:
        # the year by hand: strftime's %Y does not pad years before 1000 on glibc
        return f"..v{self.policy_version:010d}-{self.issued_at.year:04d}" \
               f"{self.issued_at:%m%dT%H%M%SZ}"


class VerifiedKeyring(namedtuple("VerifiedKeyring", "payload payload_bytes envelope_bytes "
                                                   "version expires_at sha256")):
    # payload: dict, payload_bytes and envelope_bytes: bytes, version: KeyringVersion,
    # expires_at: datetime, sha256: str
    __slots__ = ()

    def __repr__(self) -> str:  # the payload and its bytes stay out of logs
        return (f"VerifiedKeyring(version={self.version!r}, expires_at={self.expires_at!r}, "
                f"sha256={self.sha256!r})")


class Limits(namedtuple("Limits", "memory_mb pids_max cpu_millis",
                        defaults=(16384, 4096, 8000))):
    """Host maxima for the `process` aspect (config `limits`)."""

    __slots__ = ()
