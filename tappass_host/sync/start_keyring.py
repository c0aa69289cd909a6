"""The keyring a start runs under (DESIGN §9): the sandbox's current one,
else the control plane's latest, pulled once (tappass_host.sync.pull). The
CLI's `start` and the daemon's restarts (tappass_host.daemon.supervision) get
it here and pass it to tappass_host.runtime.start.start."""

from tappass_host.keyring import Limits
from tappass_host.keyring.store import store_of
from tappass_host.paths import HostPaths
from tappass_host.runtime.runstate import LifecycleError, ensure_known


def keyring_for_start(paths: HostPaths, name: str, config) -> dict:
    """`name`'s current keyring payload, pulled once (within config `limits`)
    if it has none; raises LifecycleError when it still has none. Whether it
    expired is for `start` to say."""
    store = store_of(ensure_known(paths, name))  # an unknown name is that, not "no keyring"
    keyring = store.read_current()
    if keyring is None:
        from tappass_host.sync.pull import pull_once  # the control-plane client: not on a start's path

        pull_failed = pull_once(paths, name, Limits(**config["limits"]))
        keyring = store.read_current()
        if keyring is None:
            raise LifecycleError(
                f"sandbox {name!r} has no keyring yet "
                f"({pull_failed or 'the pulled one cannot be read'}): run 'tappass-host daemon' "
                f"to receive one, or 'tappass-host sync apply {name} FILE'")
    return keyring
