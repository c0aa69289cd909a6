"""The keyring directory, read-only at /run/tappass/keyring (never a single
file: the `..data` flip must be visible inside)."""

from tappass_host.layers import LayerInputs, LayerResult
from tappass_host.paths import KEYRING_PAYLOAD

DESTINATION = "/run/tappass/keyring"


def apply(inputs: LayerInputs) -> LayerResult:
    mount = {"destination": DESTINATION, "type": "bind", "source": str(inputs.keyring_dir),
             "options": ["rbind", "ro", "nosuid", "nodev", "noexec"]}
    env = [f"TAPPASS_KEYRING_PATH={DESTINATION}/{KEYRING_PAYLOAD}",
           f"TAPPASS_KEYRING_DIR={DESTINATION}"]
    return LayerResult(oci={"mounts": [mount], "process": {"env": env}},
                       hot_reload=frozenset({"secrets", "gateway", "mcp", "tools", "budget"}))
