"""`start` without a keyring: pull the latest one once (DESIGN §9)."""

from tappass_host.keyring import Limits
from tappass_host.paths import HostPaths


def pull_once(paths: HostPaths, name: str, limits: Limits = Limits()) -> str | None:
    """Fetch and apply the control plane's latest keyring for `name`.

    Returns None when a keyring was applied, else one line saying why not
    (the caller's error message carries it).
    """
    from tappass_host.sync.receive import APPLIED, receive
    from tappass_host.sync.transport import SyncClient, SyncError

    client = SyncClient(paths)
    try:
        try:
            data = client.pull_latest(name)
        except SyncError as exc:
            return f"pulling from the control plane failed ({exc})"
        if data is None:
            return "the control plane has no keyring for it yet"
        outcome = receive(paths, name, data, limits=limits)
        try:
            client.ack(name, outcome.policy_version or 0, outcome.status, outcome.reason)
        except SyncError:
            pass  # the daemon acks again when it sees this version; the keyring is what counts
    finally:
        client.close()
    if outcome.status != APPLIED:
        return f"the control plane's latest keyring was rejected ({outcome.reason})"
    return None
