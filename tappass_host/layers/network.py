"""Network (DESIGN §6, §8). Mode `none`: a new network namespace with
loopback only. Mode `proxy`: the sandbox joins its own namespace,
`/run/netns/tappass-<name>` (created by `start`, tappass_host.network), whose
only route leads to the egress proxy; the agent is told the proxy's URL.
`allow_domains` is read by the proxy on every connection, so it changes
live; the mode needs a restart."""

from tappass_host.layers import LayerInputs, LayerResult, LayerUnavailable

NO_PROXY = "localhost,127.0.0.1"


def proxy_env(url: str) -> list[str]:
    return [f"{var}={url}" for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy")] \
        + [f"{var}={NO_PROXY}" for var in ("NO_PROXY", "no_proxy")]


def apply(inputs: LayerInputs) -> LayerResult:
    from tappass_host import network

    mode = inputs.keyring.get("network", {}).get("mode", "none")
    live = frozenset({"network.allow_domains"})
    restart = frozenset({"network.mode"})
    if mode == "none":
        return LayerResult(hot_reload=live, restart=restart)
    if mode != "proxy":
        raise LayerUnavailable(f"network mode {mode!r} is not supported (none | proxy)")
    if inputs.host.rootless:
        raise LayerUnavailable("network mode 'proxy' needs root: it creates a network "
                               "namespace and a veth pair on the host")
    if not inputs.host.egress_proxy:
        raise LayerUnavailable(f"network mode 'proxy': sandbox {inputs.name!r} has no egress "
                               "link (it is created by 'tappass-host start')")
    oci = {"linux": {"namespaces": [{"type": "network", "path": network.netns_path(inputs.name)}]},
           "process": {"env": proxy_env(inputs.host.egress_proxy)}}
    return LayerResult(oci=oci, hot_reload=live, restart=restart)
