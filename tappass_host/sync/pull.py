"""`start` without a keyring: pull the latest one once (DESIGN §9)."""

from tappass_host.controlplane.client import ControlPlaneClient, SyncTransport
from tappass_host.controlplane.errors import ControlPlaneError
from tappass_host.keyring import Limits
from tappass_host.paths import HostPaths
from tappass_host.sync.delivery import Delivery
from tappass_host.sync.receive import APPLIED

def pull_once(paths: HostPaths, name: str, limits: Limits = Limits(), *,
              transport: SyncTransport | None = None) -> str | None:
    """Fetch the control plane's latest keyring for `name` and deliver it
    (apply, then ack: tappass_host.sync.delivery) over `transport`, by
    default the sandbox's ControlPlaneClient.

    Returns None when a keyring was applied, else one line saying why not
    (the caller's error message carries it). An ack that cannot be sent is
    kept for the daemon; the keyring is what counts here.
    """
    client = transport or ControlPlaneClient(paths)
    try:
        try:
            data = client.pull_latest(name)
        except ControlPlaneError as exc:
            return f"pulling from the control plane failed ({exc})"
        if data is None:
            return "the control plane has no keyring for it yet"
        outcome = Delivery(paths, name, client, limits=limits).deliver(data)
    finally:
        client.close()
    if outcome.status != APPLIED:
        return f"the control plane's latest keyring was rejected ({outcome.reason})"
    return None
