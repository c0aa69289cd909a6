"""Who the agent is: its unprivileged user, its program and its plain env.

Rootless, the sandbox also gets its own user namespace with the mappings
tappass_host.ids computed: container 0 is the user, the agent a subordinate
id of its own, or, without subordinate ids, the user itself seen as a
non-zero id (the single-id fallback, which this layer warns about).
"""

from tappass_host.layers import Host, LayerInputs, LayerResult


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
    warnings = ()
    if host.rootless:
        oci["linux"] = {"namespaces": [{"type": "user"}],
                        "uidMappings": list(host.uid_mappings),
                        "gidMappings": list(host.gid_mappings)}
        if _single_id(host):
            warnings = (
                "rootless without a subordinate id range (/etc/subuid, /etc/subgid) for this "
                f"user: the agent runs as the user's own id (uid {host.agent_uid} inside the "
                "sandbox), not isolated from the user's other processes and sandboxes; "
                "add one (usermod --add-subuids/--add-subgids) to give each agent its own id",)
    return LayerResult(oci=oci, restart=frozenset({"identity"}), warnings=warnings)


def _single_id(host: Host) -> bool:
    """Container root unmapped: the one mapped id is the user's own."""
    return not any(m["containerID"] == 0 for m in host.uid_mappings)
