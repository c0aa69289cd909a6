"""Per-sandbox link addresses: one /30 of config `network.address_pool` per
sandbox (proxy side .1, sandbox side .2), leased by name in
`<state>/network/leases.json` so a sandbox keeps its addresses across
restarts, and never shared: a slot another sandbox holds a lease on is
skipped. (The proxy sides live in the egress hub of this tappass-host, so
another state dir on the same host may use the same addresses.) Allocation
runs under a lock on the host's netns directory.
"""

import fcntl
import ipaddress
import json
import os
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from tappass_host import statefile
from tappass_host.errors import TappassError
from tappass_host.paths import HostPaths

SLOT_PREFIX = 30
NETNS_DIR = Path("/run/netns")


class PoolExhausted(TappassError):
    pass


@dataclass(frozen=True)
class Link:
    slot: int
    host_ifname: str
    host_address: str
    sandbox_address: str
    prefixlen: int = SLOT_PREFIX

    def to_json(self) -> dict:
        return asdict(self)


def link_for(pool: ipaddress.IPv4Network, slot: int) -> Link:
    base = pool.network_address + slot * 2 ** (32 - SLOT_PREFIX)
    return Link(slot=slot, host_ifname=f"tappass{slot}", host_address=str(base + 1),
                sandbox_address=str(base + 2))


def parse_pool(text: str) -> ipaddress.IPv4Network:
    try:
        pool = ipaddress.ip_network(text)
    except ValueError:
        raise TappassError(f"config key 'network.address_pool' is not a network: {text!r}") \
            from None
    if pool.version != 4 or pool.prefixlen > SLOT_PREFIX:
        raise TappassError("config key 'network.address_pool' must be an IPv4 network of "
                           f"/{SLOT_PREFIX} or larger")
    return pool


def leases_file(paths: HostPaths) -> Path:
    return paths.leases


def _read_leases(paths: HostPaths) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in json.loads(leases_file(paths).read_bytes()).items()}
    except (FileNotFoundError, ValueError, AttributeError):
        return {}


@contextmanager
def host_network_lock():
    NETNS_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd = os.open(NETNS_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def allocate(paths: HostPaths, name: str, pool_text: str) -> Link:
    """The sandbox's link: its leased slot if still free, else the first free
    slot probing from a hash of its name. Call under host_network_lock()."""
    pool = parse_pool(pool_text)
    slots = pool.num_addresses // 2 ** (32 - SLOT_PREFIX)
    leases = _read_leases(paths)
    taken = {slot for other, slot in leases.items() if other != name}
    first = leases.get(name, zlib.crc32(name.encode()) % slots)
    for i in range(slots):
        slot = (first + i) % slots
        if slot in taken:
            continue
        if leases.get(name) != slot:
            leases[name] = slot
            path = leases_file(paths)
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            statefile.write_atomic(path, json.dumps(leases, sort_keys=True).encode(), 0o600)
        return link_for(pool, slot)
    raise PoolExhausted(f"no free /{SLOT_PREFIX} left in network.address_pool {pool}")
