"""cgroup limits from the keyring's `process` aspect; live via `<runtime> update`."""

from tappass_host.layers import LayerInputs, LayerResult

DEFAULTS = {"memory_mb": 512, "pids_max": 256, "cpu_millis": 1000}
CPU_PERIOD = 100_000


def linux_resources(process: dict) -> dict:
    limits = {**DEFAULTS, **process}
    memory = limits["memory_mb"] * 1024 * 1024
    return {
        "memory": {"limit": memory, "swap": memory},
        "pids": {"limit": limits["pids_max"]},
        "cpu": {"quota": limits["cpu_millis"] * CPU_PERIOD // 1000, "period": CPU_PERIOD},
    }


def apply(inputs: LayerInputs) -> LayerResult:
    resources = linux_resources(inputs.keyring.get("process", {}))
    return LayerResult(oci={"linux": {"resources": resources}},
                       hot_reload=frozenset({"process"}))
