"""The sandbox's filesystem: host /usr and /etc read-only, the agent package
at /opt/agent, the workspace, a size-limited /tmp, and the keyring's
`filesystem` aspect (extra read-only paths, denied paths).

The workspace is a filesystem of its own, of config `filesystem.workspace_mb`
(tappass_host/workspace.py, mounted by `start`); where it cannot be (rootless,
or the limit turned off) this layer says so: warning, `layer.unavailable`."""

import os

from tappass_host import workspace
from tappass_host.layers import LayerInputs, LayerResult

HOST_DIRS = ("/usr", "/etc")
MERGED_USR_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
BIND_RO = ["rbind", "ro", "nosuid", "nodev"]
TMP_SIZE = "size=262144k"


def host_dirs() -> list[str]:
    """/usr, /etc, and each /lib* that is a real directory (not merged-usr)."""
    return list(HOST_DIRS) + [d for d in MERGED_USR_LINKS
                              if os.path.isdir(d) and not os.path.islink(d)]


def _bind_ro(source: str, destination: str) -> dict:
    return {"destination": destination, "type": "bind", "source": source,
            "options": list(BIND_RO)}


def apply(inputs: LayerInputs) -> LayerResult:
    fs = inputs.keyring.get("filesystem", {})
    # rootfs "image": the image's own /usr and /etc (tappass_host.runtime.imageroot)
    mounts = [_bind_ro(d, d) for d in host_dirs()] if inputs.manifest.rootfs == "host" else []
    mounts.append(_bind_ro(str(inputs.manifest.directory), "/opt/agent"))
    mounts.append({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                   "options": ["nosuid", "nodev", "mode=1777", TMP_SIZE]})
    mounts.append({"destination": fs.get("workspace", "/workspace"), "type": "bind",
                   "source": str(inputs.workspace_dir),
                   "options": ["rbind", "rw", "nosuid", "nodev"]})
    mounts += [_bind_ro(path, path) for path in fs.get("read_only", []) if os.path.exists(path)]
    oci = {
        "root": {"path": str(inputs.rootfs_dir), "readonly": True},
        "mounts": mounts,
        "linux": {"maskedPaths": list(fs.get("deny_paths", []))},
    }
    warnings = tuple(f"filesystem.read_only path {p} does not exist on this host; skipped"
                     for p in fs.get("read_only", []) if not os.path.exists(p))
    unavailable = ()
    size_mb = inputs.config["filesystem.workspace_mb"]
    if not workspace.limited(size_mb, inputs.host.rootless):
        why = ("rootless: a user cannot mount the workspace's own filesystem"
               if size_mb else "config filesystem.workspace_mb = 0")
        warnings += (f"filesystem layer degraded: the workspace has no size limit ({why}); "
                     "an agent filling it fills the filesystem of the keyrings and the audit "
                     "log",)
        unavailable = ("workspace size limit",)
    return LayerResult(oci=oci, restart=frozenset({"filesystem"}), warnings=warnings,
                       unavailable=unavailable)
