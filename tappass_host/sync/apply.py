"""One keyring update, start to finish: verify, render the appliers' files,
flip, audit.

This is the only way a keyring reaches a sandbox's directory: the daemon and
`start`'s one-time pull (through tappass_host.sync.receive) and `tappass-host
sync apply` all call `apply_update`. The lock of the store is held from
reading the current version to the flip, so two updates to one sandbox are
serialized and each is checked against the version it replaces.

The appliers' files of the new version are rendered before the flip, with
the inputs of the sandbox's last start (tappass_host.layers.files): a layer
whose files are refused rejects the update as `invalid`, naming the layer,
and the current keyring stays. The keyring core below (verify, store.flip)
knows nothing of the layers.
"""

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from tappass_host import clock, sandbox_record
from tappass_host.audit import AuditLog
from tappass_host.errors import TappassError
from tappass_host.keyring.store import store_for
from tappass_host.keyring.verify import (
    envelope_sha256,
    KeyringRejected,
    KeyringVersion,
    Limits,
    Trust,
    VerifiedKeyring,
    verify,
)
from tappass_host.layers import files as layer_files
from tappass_host.paths import HostPaths
from tappass_host.runtime import runstate
from tappass_host.runtime.status import image_allowed
from tappass_host.runtime.stop import stop

FilesRenderer = Callable[[VerifiedKeyring], dict[str, bytes]]


class LayerFilesInvalid(KeyringRejected):
    """The keyring verified, but a layer's files for it are refused: `invalid`."""

    def __init__(self, refused, keyring: VerifiedKeyring):
        super().__init__("invalid", str(refused), sha256=keyring.sha256,
                         policy_version=keyring.version.policy_version)
        self.layer = refused.layer


@dataclass(frozen=True)
class Applied:
    keyring: VerifiedKeyring
    previous: KeyringVersion | None
    image_revoked: str | None = None  # the running image the new keyring no longer allows


def apply_update(paths: HostPaths, name: str, data: bytes, *, limits: Limits = Limits(),
                 audit: AuditLog | None = None, now: datetime | None = None,
                 render_files: FilesRenderer | None = None) -> Applied:
    """Apply one envelope to sandbox `name`; raises KeyringRejected on refusal.
    `render_files`: the appliers' files of a verified keyring, by path in its
    version directory (default: every applier, as the last start ran them)."""
    render_files = render_files or (lambda k: layer_files.files_for_flip(paths, name, k.payload))
    now = now or clock.now()
    record = sandbox_record.load(paths, name)
    audit = audit or AuditLog.for_host(paths)
    store = store_for(paths, record)
    with store.transaction():
        previous = store.current_version()
        try:
            keyring = verify(data, Trust.from_record(record), previous, now, limits)
            try:
                files = render_files(keyring)
            except layer_files.LayerFilesRejected as refused:
                raise LayerFilesInvalid(refused, keyring) from None
        except KeyringRejected as rejection:
            details = {"reason": rejection.reason, "sha256": rejection.sha256
                       or envelope_sha256(data if isinstance(data, bytes) else b"")}
            if rejection.policy_version is not None:
                details["policy_version"] = rejection.policy_version
            if isinstance(rejection, LayerFilesInvalid):
                details["layer"] = rejection.layer
            audit.append("keyring.rejected", sandbox=name, details=details)
            raise
        store.flip(keyring, files)
        audit.append("keyring.applied", sandbox=name, details={
            "policy_version": keyring.version.policy_version,
            "issued_at": keyring.payload["issued_at"],
            "sha256": keyring.sha256,
            "previous": previous.policy_version if previous else None,
        })
    revoked = _withdraw_image(paths, name, keyring.payload, audit)
    return Applied(keyring=keyring, previous=previous, image_revoked=revoked)


def _withdraw_image(paths: HostPaths, name: str, payload: dict, audit: AuditLog) -> str | None:
    """After a flip: a running sandbox whose image the new keyring no longer
    allows is audited (`image.revoked`); it shows `restart-pending` in status,
    or is stopped when its start's config said `on_image_revoked = "stop"`."""
    sandbox = paths.sandbox(name)
    state = runstate.read_json(runstate.state_file(sandbox)) or {}
    if not state.get("image") or not runstate.is_running(sandbox):
        return None

    if image_allowed(payload, state):
        return None
    stopping = state.get("on_image_revoked") == "stop"
    audit.append("image.revoked", sandbox=name, details={
        "digest": state["image"], "policy_version": payload["policy_version"],
        "action": "stop" if stopping else "keep"})
    if stopping:
        try:
            stop(paths, name, runstate.runtime_of(paths, state), intent="image_revoked")
        except TappassError:
            pass  # the keyring is applied all the same; status still says restart-pending
    return state["image"]
