"""What `start`, `stop`, the exit hook and the daemon ask of the egress
service (tappass_host.network.service): cheap to import — a unix socket and
JSON, no pyroute2. Under systemd the service runs as a unit of its own
(tappass-host-egress.service) and answers; elsewhere the first request
spawns one, which ends once idle."""

import json
import os
import sys

from tappass_host import network
from tappass_host.errors import TappassError
from tappass_host.paths import HostPaths
from tappass_host.processes import process_alive, wait_until

SPAWN_WAIT_S = 15.0
REQUEST_TIMEOUT_S = 30.0


class EgressError(TappassError):
    pass


def _ask(paths: HostPaths, request: dict) -> dict:
    """One request; OSError when no service answers."""
    import socket  # only when there is something to ask: not on every start

    from tappass_host.unixaddress import short_address  # contextlib: not on every stop

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(REQUEST_TIMEOUT_S)
        with short_address(network.control_socket(paths)) as address:
            sock.connect(address)
        sock.sendall(json.dumps(request).encode() + b"\n")
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionResetError("the egress service closed the connection")
            reply += chunk
    return json.loads(reply)


def _spawn(paths: HostPaths, config) -> None:
    directory = network.service_dir(paths)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    from tappass_host.network.settings import Settings

    argv = [sys.executable, "-m", "tappass_host.network",
            *Settings.from_config(config).argv(paths)]
    # Not systemd's to hear from: spawned by a notify unit (the daemon), the
    # proxy would otherwise report READY=1 as that unit.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
    import subprocess  # here: not on every stop's and start's path (issue 13)

    with open(network.log_file(paths), "ab") as log:
        subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                         start_new_session=True, close_fds=True, cwd="/")
    if not wait_until(lambda: _answers(paths), SPAWN_WAIT_S, max_delay=0.01):
        raise EgressError(f"the egress proxy did not start (see {network.log_file(paths)})")


def _answers(paths: HostPaths) -> bool:
    try:
        _ask(paths, {"op": "ping"})
        return True
    except (OSError, ValueError):
        return False


def take_over(paths: HostPaths) -> int | None:
    """End the egress service that answers for `paths` (one `start` spawned
    before the unit came up): SIGTERM, which leaves running sandboxes'
    namespaces for the next service to listen for again. Returns its pid."""
    import signal

    try:
        pid = int(_ask(paths, {"op": "ping"})["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return pid
    if not wait_until(lambda: not process_alive(pid), SPAWN_WAIT_S, max_delay=0.02):
        raise EgressError(f"the egress proxy already running (pid {pid}) did not exit")
    return pid


def _request(paths: HostPaths, config, request: dict) -> dict:
    """Ask the service, starting it first if none answers."""
    try:
        reply = _ask(paths, request)
    except (OSError, ValueError):
        _spawn(paths, config)
        reply = _ask(paths, request)
    if "error" in reply:
        raise EgressError(f"egress proxy: {reply['error']}")
    return reply


def attach(paths: HostPaths, name: str, config) -> dict:
    """Create the sandbox's namespace and proxy listener: {proxy_url, netns}."""
    if os.geteuid() != 0:
        raise EgressError("network mode 'proxy' needs root (it creates network namespaces)")
    return _request(paths, config, {"op": "attach", "name": name})


def detach(paths: HostPaths, name: str) -> None:
    """Remove the sandbox's namespace and listener; never starts the service
    (without one, what is left is reaped by the next `start` or the daemon)."""
    if not network.record_file(paths, name).exists():
        return
    try:
        _ask(paths, {"op": "detach", "name": name})
    except (OSError, ValueError):
        pass


def leftovers(paths: HostPaths, is_running) -> list[str]:
    """Sandboxes not running whose namespace and link are still on record;
    `is_running` is the run state's (runtime.runstate.is_running), from the caller."""
    return [n for n in network.recorded(paths) if not is_running(paths.sandbox(n))]


def reap(paths: HostPaths, is_running) -> list[str]:
    """Remove what crashed sandboxes left behind (namespace, veth, listener):
    through the egress service if one runs, else here (after a crash of
    everything). Call under runtime.runstate.host_lock, so no start is half-way."""
    if not leftovers(paths, is_running):
        return []
    try:
        reply = _ask(paths, {"op": "reap"})
        if "error" not in reply:
            return reply.get("removed", [])
    except (OSError, ValueError):
        pass
    from tappass_host.network import netns

    namespaces = netns.Namespaces(network.hub_name(paths))
    removed = leftovers(paths, is_running)
    for name in removed:
        namespaces.remove(network.netns_name(name), network.read_link(paths, name))
        network.record_file(paths, name).unlink(missing_ok=True)
    if not network.recorded(paths):
        namespaces.remove_hub()
    return removed
