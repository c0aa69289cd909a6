"""`shell`: a command in a running sandbox, as its agent."""

import json
import subprocess
import sys

from tappass_host.paths import HostPaths
from tappass_host.runtime import container_id
from tappass_host.runtime.runstate import (
    LifecycleError, ensure_known, is_running, read_json, runtime_of, state_file)


def shell(paths: HostPaths, name: str, command: list[str]) -> int:
    """Run `command` in the running sandbox with the agent's own process spec
    (same user, no capabilities, no_new_privs, seccomp): only argv differs."""
    import tempfile

    sandbox = ensure_known(paths, name)
    if not is_running(sandbox):
        raise LifecycleError(f"sandbox {name!r} is not running")
    state = read_json(state_file(sandbox))
    process = read_json(sandbox.bundle_config)["process"]
    from tappass_host.landlock import launch_prefix

    process["args"] = launch_prefix(process["args"]) + command  # same Landlock ruleset
    process["terminal"] = sys.stdin.isatty() and sys.stdout.isatty()
    runtime = runtime_of(paths, state)
    with tempfile.NamedTemporaryFile("w", dir=sandbox.runtime, suffix=".json") as spec:
        json.dump(process, spec)
        spec.flush()
        argv = runtime.argv("exec", "--process", spec.name)
        if process["terminal"]:
            argv.append("--tty")
        return subprocess.call([*argv, container_id(name)], env=runtime.environ())
