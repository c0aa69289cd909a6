"""cgroup limits from the keyring's `process` aspect; live via `<runtime> update`.

Where the runtime cannot apply cgroup limits (rootless on a host whose
cgroups are not delegated to the user, as cgroup v1 never is), the limits
that have a per-process kernel equivalent are applied as rlimits instead,
and the rest is reported (warning, `layer.unavailable`, `degraded`):
  - pids_max  -> RLIMIT_NPROC: counted per uid per user namespace, and every
    process of the sandbox is its agent uid in its own user namespace, so
    it caps the sandbox as the pids cgroup would;
  - memory_mb -> RLIMIT_DATA, per process: an allocation past it fails
    (MemoryError, ENOMEM) instead of the sandbox being OOM-killed. Not under
    runc: its init, in Go, runs under the rlimits before it execs the agent
    and cannot start in a small data limit;
  - cpu_millis: no equivalent.
"""

from tappass_host.layers import LayerInputs, LayerResult

DEFAULTS = {"memory_mb": 512, "pids_max": 256, "cpu_millis": 1000}
CPU_PERIOD = 100_000
DATA_LIMIT_RUNTIMES = ("crun",)


def linux_resources(process: dict) -> dict:
    limits = {**DEFAULTS, **process}
    memory = limits["memory_mb"] * 1024 * 1024
    return {
        "memory": {"limit": memory, "swap": memory},
        "pids": {"limit": limits["pids_max"]},
        "cpu": {"quota": limits["cpu_millis"] * CPU_PERIOD // 1000, "period": CPU_PERIOD},
    }


def _rlimit(kind: str, value: int) -> dict:
    return {"type": kind, "hard": value, "soft": value}


def _without_cgroups(process: dict, runtime: str, advice: str) -> LayerResult:
    limits = {**DEFAULTS, **process}
    rlimits = [_rlimit("RLIMIT_NPROC", limits["pids_max"])]
    if runtime in DATA_LIMIT_RUNTIMES:
        rlimits.append(_rlimit("RLIMIT_DATA", limits["memory_mb"] * 1024 * 1024))
        memory = ("memory_mb as a per-process RLIMIT_DATA (an allocation past it fails; "
                  "no OOM kill)")
    else:
        memory = f"memory_mb is not enforced (under {runtime}; crun applies it per process)"
    return LayerResult(
        oci={"process": {"rlimits": rlimits}},
        restart=frozenset({"process"}),
        unavailable=("cgroup memory limit", "cgroup cpu limit"),
        warnings=("resources layer degraded: the runtime cannot apply cgroup limits here "
                  "(rootless, no cgroup delegated to this user): pids_max is applied as "
                  f"RLIMIT_NPROC, {memory}, cpu_millis is not enforced"
                  + (f"; to enforce them: {advice}" if advice else ""),))


def apply(inputs: LayerInputs) -> LayerResult:
    process = inputs.keyring.get("process", {})
    if not inputs.host.cgroups:
        return _without_cgroups(process, inputs.host.runtime, inputs.host.cgroups_advice)
    return LayerResult(oci={"linux": {"resources": linux_resources(process)}},
                       hot_reload=frozenset({"process"}))
