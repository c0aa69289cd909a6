"""A locked-down OCI config for tests, built without the renderer.

Stand-in for the real renderer: the base template plus this machine's seccomp
profile, a "host" rootfs (host /usr and /etc read-only, the merged-usr
symlinks mirrored), the keyring and workspace of a sandbox under a private
state dir, and a size-limited /tmp.
"""

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from tappass_host import shipped
from tappass_host.layers import Host
from tappass_host.layers.filesystem import BIND_RO, host_dirs
from tappass_host.oci import rootfs as rootfs_module

AGENT_UID = 200000
AGENT_GID = 200000


@dataclass(frozen=True)
class Layout:
    state_dir: Path
    sandbox_dir: Path
    keyring_dir: Path
    workspace_dir: Path
    machine_key: Path
    bundle_dir: Path
    rootfs: Path


def layout(tmp_path: Path, name: str = "probe") -> Layout:
    """Create a sandbox's state tree (with a machine key) and an empty bundle."""
    state = tmp_path / "state"
    sandbox = state / "sandboxes" / name
    paths = Layout(
        state_dir=state,
        sandbox_dir=sandbox,
        keyring_dir=sandbox / "keyring",
        workspace_dir=sandbox / "workspace",
        machine_key=state / "machine" / "key.pem",
        bundle_dir=tmp_path / "bundle",
        rootfs=tmp_path / "bundle" / "rootfs",
    )
    if not paths.keyring_dir.exists():
        _create(paths)
    return paths


def _create(paths: Layout) -> None:
    paths.machine_key.parent.mkdir(parents=True)
    paths.machine_key.write_text("-----BEGIN PRIVATE KEY-----\nnot a real key\n-----END PRIVATE KEY-----\n")
    paths.machine_key.chmod(0o600)
    paths.keyring_dir.mkdir(parents=True)
    (paths.keyring_dir / "keyring.json").write_text(json.dumps({"policy_version": 1}))
    # Wide open on purpose: only the read-only mount may stop the agent writing.
    paths.keyring_dir.chmod(0o777)
    (paths.keyring_dir / "keyring.json").chmod(0o666)
    paths.workspace_dir.mkdir()
    if os.geteuid() == 0:
        os.chown(paths.workspace_dir, AGENT_UID, AGENT_GID)
    _host_rootfs(paths.rootfs)


def _host_rootfs(rootfs: Path) -> None:
    """The product's own `host` rootfs (tappass_host.oci.rootfs), opened wide."""
    rootfs.parent.mkdir(parents=True, exist_ok=True)
    mountpoints = (*host_dirs(), "/proc", "/dev", "/sys", "/tmp", "/workspace", "/run/tappass/keyring")
    rootfs_module.prepare(rootfs, list(mountpoints))
    rootfs.chmod(0o777)  # so that a write to / fails only because the root is read-only


def host_dir_mounts() -> list[dict]:
    """Host /usr, /etc and any /lib* that is a real directory (not merged-usr), read-only."""
    return [{"destination": d, "type": "bind", "source": d, "options": list(BIND_RO)} for d in host_dirs()]


def locked_down_config(
    tmp_path: Path,
    *,
    args: list[str] | None = None,
    extra_mounts: list[dict] = (),
    uid: int = AGENT_UID,
    gid: int = AGENT_GID,
    env: list[str] = (),
) -> dict:
    paths = layout(tmp_path)
    config = shipped.load_json(shipped.template())
    config["root"] = {"path": str(paths.rootfs), "readonly": True}
    process = config["process"]
    process["user"] = {"uid": uid, "gid": gid}
    process["args"] = list(args or ["/usr/bin/true"])
    process["cwd"] = "/workspace"
    process["env"] += ["HOME=/workspace", "TAPPASS_KEYRING_PATH=/run/tappass/keyring/keyring.json", *env]
    config["mounts"] += [
        *host_dir_mounts(),
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/workspace", "type": "bind", "source": str(paths.workspace_dir),
         "options": ["rbind", "rw", "nosuid", "nodev"]},
        {"destination": "/run/tappass/keyring", "type": "bind", "source": str(paths.keyring_dir),
         "options": ["rbind", "ro", "nosuid", "nodev", "noexec"]},
        *extra_mounts,
    ]
    config["linux"]["resources"]["pids"] = {"limit": 256}
    config["linux"]["seccomp"] = shipped.load_json(shipped.seccomp_profile())
    return config


def write_bundle(tmp_path: Path, config: dict) -> Path:
    paths = layout(tmp_path)
    (paths.bundle_dir / "config.json").write_text(json.dumps(config, indent=2))
    return paths.bundle_dir


# Rootless, as tappass_host.ids lays out a user namespace: container 0 is the
# user, 1.. its subordinate ids; the agent is one of them.
ROOTLESS_AGENT_ID = 1000
ROOTLESS_MAPPINGS = ({"containerID": 0, "hostID": 0, "size": 1},
                     {"containerID": 1, "hostID": 1, "size": 65535})


def invariant_args(tmp_path: Path, *, rootless: bool = False) -> dict:
    """The keyword arguments of invariants.check for the fixture's sandbox: the
    agent ids (and rootless, the namespace's mappings) allocated to it."""
    paths = layout(tmp_path)
    agent = (ROOTLESS_AGENT_ID, ROOTLESS_AGENT_ID) if rootless else (AGENT_UID, AGENT_GID)
    mappings = ROOTLESS_MAPPINGS if rootless else ()
    return {
        "state_dir": paths.state_dir,
        "keyring_dir": paths.keyring_dir,
        "workspace_dir": paths.workspace_dir,
        "rootless": rootless,
        "host": Host(rootless=rootless, agent_uid=agent[0], agent_gid=agent[1],
                     uid_mappings=mappings, gid_mappings=mappings),
        "rootfs": paths.rootfs,
    }


def copy_setuid_python(directory: Path) -> Path:
    """A setuid-root copy of the host python: with no_new_privs it must not give euid 0."""
    target = directory / "suid-python"
    shutil.copy2(os.path.realpath("/usr/bin/python3"), target)
    os.chown(target, 0, 0)
    target.chmod(0o4755)
    return target
