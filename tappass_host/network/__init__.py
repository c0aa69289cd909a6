"""Egress for `network.mode = "proxy"` (DESIGN §6, §8): per sandbox a network
namespace whose only way out is a veth to the egress proxy, which allows the
names of the sandbox's current `network.allow_domains` and nothing else.

The veths' proxy ends live in the egress hub, a namespace of the proxy's
own (see netns.py). Where things live: `<runtime>/network/` holds the proxy service's control
socket, pid file and log, and `sandboxes/<name>.json`, the link of each
sandbox it has attached (what `start` and the daemon clean up after a crash).
"""

from pathlib import Path

from tappass_host.paths import HostPaths, check_sandbox_name

NETNS_PREFIX = "tappass-"


def netns_name(name: str) -> str:
    return NETNS_PREFIX + name


def netns_path(name: str) -> str:
    return f"/run/netns/{netns_name(name)}"


def hub_name(paths: HostPaths) -> str:
    """The egress hub of this runtime dir (tappass_host.network.netns): its
    prefix is not `tappass-`, so no sandbox name can claim it."""
    import hashlib

    return "tappass.egress-" + hashlib.sha256(str(paths.runtime).encode()).hexdigest()[:10]


def check_name(name) -> str:
    return check_sandbox_name(name)


def service_dir(paths: HostPaths) -> Path:
    return paths.network


def control_socket(paths: HostPaths) -> Path:
    return paths.network_control_socket


def pid_file(paths: HostPaths) -> Path:
    return paths.proxy_pid


def log_file(paths: HostPaths) -> Path:
    return paths.proxy_log


def records_dir(paths: HostPaths) -> Path:
    return paths.network_records


def record_file(paths: HostPaths, name: str) -> Path:
    return paths.network_record(name)


def read_link(paths: HostPaths, name: str):
    """The sandbox's recorded tappass_host.network.addresses.Link, or None."""
    import json

    from tappass_host.network.addresses import Link

    try:
        data = json.loads(record_file(paths, name).read_bytes())
        return Link(slot=data["slot"], host_ifname=data["host_ifname"],
                    host_address=data["host_address"], sandbox_address=data["sandbox_address"],
                    prefixlen=data["prefixlen"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def recorded(paths: HostPaths) -> list[str]:
    """Sandboxes with a namespace and link on record."""
    try:
        return sorted(p.stem for p in records_dir(paths).glob("*.json"))
    except OSError:
        return []
