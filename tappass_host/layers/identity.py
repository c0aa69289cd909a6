"""Who the agent is: its unprivileged user, its program and its plain env."""

from tappass_host.layers import LayerInputs, LayerResult


def apply(inputs: LayerInputs) -> LayerResult:
    manifest, host = inputs.manifest, inputs.host
    env = [f"{k}={v}" for k, v in sorted(manifest.env.items())]
    env += ["HOME=/workspace", f"TAPPASS_SANDBOX={inputs.name}",
            f"TAPPASS_SANDBOX_ID={inputs.record.sandbox_id}"]
    process = {
        "user": {"uid": host.agent_uid, "gid": host.agent_gid},
        "args": list(manifest.entrypoint),
        "cwd": "/workspace",
        "env": env,
    }
    oci: dict = {"process": process, "hostname": inputs.name.replace("_", "-")[:63]}
    if host.rootless:
        oci["linux"] = {"uidMappings": list(host.uid_mappings),
                        "gidMappings": list(host.gid_mappings)}
    return LayerResult(oci=oci, restart=frozenset({"identity"}))
