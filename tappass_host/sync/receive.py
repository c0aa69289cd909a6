"""One envelope from the control plane, received: verify and flip it through
tappass_host.sync.apply, then apply what can be applied live. Shared by the daemon,
`start`'s one-time pull and `sync apply`."""

from dataclasses import dataclass

from tappass_host.errors import TappassError
from tappass_host.keyring.store import store_of
from tappass_host.keyring.verify import KeyringRejected, Limits
from tappass_host.paths import HostPaths
from tappass_host.sync import hotreload
from tappass_host.sync.apply import apply_update

APPLIED = "applied"
REJECTED = "rejected"


@dataclass(frozen=True)
class Outcome:
    status: str  # applied | rejected
    policy_version: int | None
    reason: str | None = None
    live_error: str | None = None  # the keyring is applied, its live limits are not
    resources: dict | None = None  # the limits pushed to the running sandbox
    previous: int | None = None  # the policy_version it replaced
    rejection: KeyringRejected | None = None  # why it was rejected (its message is one line)


def is_current(paths: HostPaths, name: str, data: bytes) -> bool:
    """True when `data` is the envelope of the keyring in place (a pull after
    a reconnect usually is: it must not be re-applied as a replay)."""
    return store_of(paths.sandbox(name)).is_current(data)


def receive(paths: HostPaths, name: str, data: bytes, *, limits: Limits = Limits(),
            claimed_version: int | None = None) -> Outcome:
    previous = store_of(paths.sandbox(name)).read_current()
    try:
        applied = apply_update(paths, name, data, limits=limits)
    except KeyringRejected as rejection:
        version = rejection.policy_version
        return Outcome(REJECTED, claimed_version if version is None else version,
                       rejection.reason, rejection=rejection)
    payload = applied.keyring.payload
    version = applied.keyring.version.policy_version
    replaced = applied.previous.policy_version if applied.previous else None
    try:
        resources = hotreload.apply_process_limits(paths, name, previous, payload)
    except TappassError as exc:
        return Outcome(APPLIED, version, live_error=str(exc), previous=replaced)
    return Outcome(APPLIED, version, resources=resources, previous=replaced)
