"""A sandbox's limits as the kernel holds them, read from its agent's cgroup
(cgroup v2 on most hosts, v1 here), for every test that checks one."""

from pathlib import Path

from tappass_host.runtime import attached

UNIFIED = Path("/sys/fs/cgroup/cgroup.controllers").exists()  # cgroup v2 only at /sys/fs/cgroup


def own_cgroup(pid: int) -> str:
    """`pid`'s cgroup path (v2; on v1 the pids controller's)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if (UNIFIED and controllers == "") or "pids" in controllers.split(","):
            return path
    raise AssertionError(f"no cgroup for {pid}")


def nearest_limit(cgroup: str, kind: str) -> str:
    """The v2 limit `kind`.max nearest up from `cgroup`, short of the first
    slice: crun under systemd runs the agent in a `container` subgroup of the
    sandbox's scope, which holds the limits."""
    for directory in (Path(cgroup), *Path(cgroup).parents):
        if directory == Path("/") or directory.name.endswith(".slice"):
            break
        value = Path("/sys/fs/cgroup", *directory.parts[1:], f"{kind}.max").read_text().strip()
        if not value.startswith("max"):
            return value
    return "max"


def cgroup_limits(pid: int) -> dict:
    """`pid`'s memory, pids and cpu limits read from its cgroup's files: on cgroup
    v2 memory.max, pids.max, cpu.max; on v1 each controller's own."""
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    if UNIFIED:
        own = own_cgroup(pid)
        quota, period = nearest_limit(own, "cpu").split()
        return {"hierarchy": "v2", "memory": int(nearest_limit(own, "memory")),
                "pids": int(nearest_limit(own, "pids")), "cpu": (int(quota), int(period)),
                "oom_counter": attached.memory_events(pid) == Path(
                    "/sys/fs/cgroup" + own, "memory.events")}
    mounts = {controller: f"/sys/fs/cgroup/{controllers}{path}"
              for _, controllers, path in (line.split(":", 2) for line in lines)
              for controller in controllers.split(",") if controller}
    memory = Path(mounts["memory"])

    def value(directory: str, name: str) -> int:
        return int(Path(directory, name).read_text())

    return {"hierarchy": "v1", "memory": value(mounts["memory"], "memory.limit_in_bytes"),
            "pids": value(mounts["pids"], "pids.max"),
            "cpu": (value(mounts["cpu"], "cpu.cfs_quota_us"),
                    value(mounts["cpu"], "cpu.cfs_period_us")),
            "oom_counter": attached.memory_events(pid) == memory / "memory.oom_control"}
