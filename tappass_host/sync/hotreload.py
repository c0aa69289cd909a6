"""What a flipped keyring changes in a running sandbox (DESIGN §6, hot reload).

Only `process` limits need an action here: `<runtime> update`. Secrets,
gateway, mcp, tools and budget are read from the keyring by the agent; every
applier's files (harness and third-party) were rendered into the new version
directory before the flip (tappass_host.layers.files); restart-only aspects
show as `restart-pending` in `status`.
"""

from tappass_host.layers.resources import linux_resources
from tappass_host.paths import HostPaths
from tappass_host.runtime import container_id, runstate


def apply_process_limits(paths: HostPaths, name: str, previous: dict | None,
                         current: dict) -> dict | None:
    """Push `current`'s process limits to the running sandbox if they changed.

    Returns the OCI resources applied, or None when nothing had to be done.
    Raises the runtime's error when the update fails.
    """
    if (previous or {}).get("process") == current.get("process"):
        return None
    sandbox = paths.sandbox(name)
    state = runstate.read_json(runstate.state_file(sandbox))
    if not state or not runstate.is_running(sandbox):
        return None
    resources = linux_resources(current.get("process", {}))
    runtime = runstate.runtime_of(paths, state)
    runtime.update(container_id(name), resources)
    return resources
