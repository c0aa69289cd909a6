"""Agent ids: each sandbox's agent gets its own host UID/GID, allocated once
from config `agent_id_range` and recorded in sandbox.json (DESIGN §8).

Allocation runs under a host-wide lock and reads every record, so two
sandboxes never share an id even when started concurrently.
"""

import fcntl
import os

from tappass_host import sandbox as sandbox_record
from tappass_host.errors import TappassError
from tappass_host.paths import HostPaths


class NoFreeIds(TappassError):
    pass


def ensure_agent_ids(paths: HostPaths, name: str, id_range: tuple[int, int]):
    """Return the record of `name`, with agent_uid/agent_gid allocated if absent."""
    paths.state.mkdir(parents=True, exist_ok=True)
    fd = os.open(paths.state / "agent-ids.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        record = sandbox_record.load(paths, name)
        if record.agent_uid is not None and record.agent_gid is not None:
            return record
        used = set()
        for other in paths.sandbox_names():
            if other != name:
                rec = sandbox_record.load(paths, other)
                used.update(x for x in (rec.agent_uid, rec.agent_gid) if x is not None)
        low, high = id_range
        free = next((i for i in range(low, high + 1) if i not in used), None)
        if free is None:
            raise NoFreeIds(f"no free agent id left in agent_id_range {low}-{high}")
        record.agent_uid = record.agent_gid = free
        sandbox_record.save(paths.sandbox(name), record)
        return record
    finally:
        os.close(fd)
