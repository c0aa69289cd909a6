"""Network: mode `none` is a private network namespace with loopback only.
(Mode `proxy`, egress through a policy proxy, is not built yet: it is refused
rather than silently widened.)"""

from tappass_host.layers import LayerInputs, LayerResult, LayerUnavailable


def apply(inputs: LayerInputs) -> LayerResult:
    mode = inputs.keyring.get("network", {}).get("mode", "none")
    if mode != "none":
        raise LayerUnavailable(f"network mode {mode!r} is not supported by this tappass-host "
                               "yet; only 'none' (loopback only)")
    return LayerResult(restart=frozenset({"network.mode"}))
