"""Where the TapPass gateway is. Only its URL goes in the environment: the
capability token stays in the keyring, which the agent reads."""

from tappass_host.layers import LayerInputs, LayerResult


def apply(inputs: LayerInputs) -> LayerResult:
    url = inputs.keyring.get("gateway", {}).get("base_url")
    env = [f"TAPPASS_GATEWAY_URL={url}"] if url else []
    return LayerResult(oci={"process": {"env": env}} if env else {},
                       hot_reload=frozenset({"gateway"}))
