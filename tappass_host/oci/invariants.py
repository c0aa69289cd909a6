"""The escalation invariants of DESIGN §8, enforced on a final OCI config.

Whatever the layers asked for, a config that breaks one of these is never
handed to the runtime. `check` raises on the first violation, naming the
field and the layer that set it (from the merge's provenance map: field
path -> layer name; a field no layer set belongs to the template).
"""

import os
import posixpath
import re
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from tappass_host.errors import TappassError
from tappass_host.layers import Host
from tappass_host.layers.keyring import DESTINATION as KEYRING_DESTINATION
from tappass_host.oci import parent_field
from tappass_host.processes import is_host_netns

WORKSPACE_DESTINATION = "/workspace"
KEYRING_OPTIONS = ("ro", "nosuid", "nodev", "noexec")

CAPABILITY_SETS = ("bounding", "effective", "inheritable", "permitted", "ambient")
REQUIRED_NAMESPACES = ("pid", "mount", "ipc", "uts", "network")

# The defaults of `runc spec` / podman; the template may add more.
STANDARD_MASKED_PATHS = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
)
STANDARD_READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")

# destination -> filesystem type of the template's kernel filesystem mounts
STANDARD_MOUNTS = {
    "/proc": "proc",
    "/dev": "tmpfs",
    "/dev/pts": "devpts",
    "/dev/shm": "tmpfs",
    "/dev/mqueue": "mqueue",
    "/sys": "sysfs",
}
READONLY_STANDARD_MOUNTS = ("/sys",)
# Besides the standard mounts and tmpfs, only these may be mounted (read-only).
EXTRA_FILESYSTEMS = ("cgroup", "cgroup2")

# Host paths that hold runtime sockets, devices or kernel state: never bound
# into a sandbox, nor any directory above them.
HOST_RUNTIME_PATHS = (
    "/run",
    "/var/run",
    "/var/lib/docker",
    "/var/lib/containerd",
    "/var/lib/containers",
    "/dev",
    "/proc",
    "/sys",
)
NETNS_DIRS = ("/run/netns", "/var/run/netns")

# Annotations are read by runtimes (crun's `run.oci.*`, runc's `org.systemd.property.*`,
# `org.criu.config`, …) and can widen the sandbox: only this namespace, which no
# runtime interprets, is allowed (tappass-host itself sets none).
ANNOTATION_NAMESPACE = "org.tappass."
# Per-mount id mapping (idmapped mounts): files would appear owned by other ids.
IDMAP_OPTIONS = ("idmap", "ridmap")
_PLAIN_KEY = re.compile(r"[A-Za-z0-9._/-]{1,200}")  # shown as is in a violation; others by repr

DENYING_ACTIONS = ("SCMP_ACT_ERRNO", "SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD")
# LOG lets the call through; TRACE and NOTIFY hand the decision to another process.
PERMISSIVE_ACTIONS = ("SCMP_ACT_ALLOW", "SCMP_ACT_LOG", "SCMP_ACT_TRACE", "SCMP_ACT_NOTIFY")
ESCALATION_SYSCALLS = frozenset(
    """
    mount umount umount2 mount_setattr move_mount open_tree fsopen fsconfig fsmount fspick
    pivot_root chroot unshare setns clone3 ptrace process_vm_readv process_vm_writev
    process_madvise kcmp pidfd_getfd bpf perf_event_open userfaultfd
    io_uring_setup io_uring_enter io_uring_register keyctl add_key request_key
    kexec_load kexec_file_load init_module finit_module delete_module create_module
    swapon swapoff reboot acct quotactl quotactl_fd open_by_handle_at name_to_handle_at
    lookup_dcookie syslog iopl ioperm uselib nfsservctl _sysctl fanotify_init
    settimeofday clock_settime clock_settime64 stime adjtimex clock_adjtime vhangup
    """.split()
)
CLONE_NAMESPACE_FLAGS = 0x7E020000  # NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET
SAFE_PERSONALITIES = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)  # PER_LINUX(32), UNAME26, query

# Fields only their layer may set (the template's own values aside): no other layer
# may set, replace or add to anything under them, so none can loosen them. The
# resources layer's limits are also what `<runtime> update` pushes live; the kernel
# layer's seccomp profile may only gain rules that refuse (_adds_a_refusal).
OWNED_FIELDS = {
    "linux.resources": "resources",
    "process.rlimits": "resources",
    "linux.seccomp": "kernel",
}
TEMPLATE = "template"  # the name violations give a field no layer set
_SECCOMP_RULE = re.compile(r"linux\.seccomp\.syscalls\[\d+\]")

# The fields a config may have, all others refused: runtimes act on fields added to
# the runtime spec since (and on their own extensions) before the invariants know them.
CONFIG_FIELDS = ("ociVersion", "process", "root", "hostname", "domainname", "mounts", "hooks",
                 "annotations", "linux")
PROCESS_FIELDS = ("terminal", "consoleSize", "user", "args", "env", "cwd", "capabilities",
                  "rlimits", "noNewPrivileges", "oomScoreAdj", "apparmorProfile", "selinuxLabel",
                  "ioPriority", "scheduler", "execCPUAffinity")
LINUX_FIELDS = ("namespaces", "uidMappings", "gidMappings", "timeOffsets", "devices",
                "cgroupsPath", "resources", "rootfsPropagation", "seccomp", "sysctl",
                "maskedPaths", "readonlyPaths", "mountLabel", "personality", "memoryPolicy")
REFUSED_FIELDS = {
    "vm": "a VM runtime starts its hypervisor and kernel from these host paths",
    "linux.intelRdt": "its closID joins (and rewrites) a resctrl group of the host, "
                      "like a cgroup path",
    "linux.netDevices": "moves a host network device into the sandbox, past the egress proxy",
}
# Propagation: "shared" makes the sandbox's mounts (and the runtime's) appear on the host.
SAFE_ROOTFS_PROPAGATION = ("private", "rprivate", "slave", "rslave", "unbindable", "runbindable")
SHARED_PROPAGATION = ("shared", "rshared")
# Scheduling at or above the host's default only: the runtime (root) could set what
# the agent itself cannot (SCHED_FIFO/RR/DEADLINE, a negative nice, IOPRIO_CLASS_RT).
FAIR_SCHEDULER_POLICIES = ("SCHED_OTHER", "SCHED_BATCH", "SCHED_IDLE")
FAIR_SCHEDULER_FLAGS = ("SCHED_FLAG_RESET_ON_FORK",)
FAIR_IO_CLASSES = ("IOPRIO_CLASS_BE", "IOPRIO_CLASS_IDLE")
PERSONALITY_DOMAINS = ("LINUX", "LINUX32")
# Only these layers mount what the Landlock launcher runs before its ruleset (_launch_paths).
LAUNCH_PATH_LAYERS = ("filesystem", "kernel")


class InvariantViolation(TappassError):
    """A rendered OCI config breaks an escalation invariant."""

    def __init__(self, field: str, layer: str, rule: str):
        self.field = field
        self.layer = layer
        super().__init__(f"layer {layer!r} broke invariant: {field} {rule}")


class _Sandbox(NamedTuple):
    state_dir: str
    keyring_dir: str
    workspace_dir: str
    rootless: bool
    provenance: dict[str, str]
    landlock: bool
    host: Host
    rootfs: str

    def layer_of(self, field: str) -> str:
        while field:
            if field in self.provenance:
                return self.provenance[field]
            field = parent_field(field)
        return TEMPLATE

    def violation(self, field: str, rule: str) -> InvariantViolation:
        return InvariantViolation(field, self.layer_of(field), rule)

    def set_by_others(self, field: str, owner: str) -> Iterator[str]:
        """The places at or under `field` that a layer other than `owner` set."""
        allowed = (owner, TEMPLATE)
        if self.layer_of(field) not in allowed:
            yield field
        for path, layer in self.provenance.items():
            if layer not in allowed and path.startswith((field + ".", field + "[")):
                yield path


def check(
    config: dict,
    *,
    state_dir: Path,
    keyring_dir: Path,
    workspace_dir: Path,
    rootless: bool,
    provenance: dict[str, str],
    host: Host,
    rootfs: Path,
    landlock: bool = False,
) -> None:
    """`host`: the agent's allocated ids (and rootless, its user namespace's
    mappings); `rootfs`: the bundle's own root filesystem (`root.path` must be
    it, absolute or relative to the bundle). `landlock`: the host can confine
    the agent with Landlock, so the kernel layer's launcher must be in the config."""
    sandbox = _Sandbox(
        state_dir=_host_path(state_dir),
        keyring_dir=_host_path(keyring_dir),
        workspace_dir=_host_path(workspace_dir),
        rootless=rootless,
        provenance=dict(provenance),
        landlock=landlock,
        host=host,
        rootfs=posixpath.normpath(os.path.abspath(os.fspath(rootfs))),
    )
    if not isinstance(config, dict):
        raise sandbox.violation("", "the config must be a JSON object")
    for rule in _RULES:
        rule(config, sandbox)


# --- helpers -----------------------------------------------------------------


def _obj(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _host_path(path: Path | str) -> str:
    return os.path.realpath(os.fspath(path))


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _overlaps(path: str, root: str) -> bool:
    """`path` is `root`, inside it, or a directory above it (mounting it exposes root)."""
    return _within(path, root) or _within(root, path)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(key: Any) -> str:
    """A field name as a violation shows it: as is if plain, else by repr, on one line."""
    if isinstance(key, str) and _PLAIN_KEY.fullmatch(key):
        return key
    return repr(key[:80] if isinstance(key, str) else key)[:100]


# --- the config's fields and their owners --------------------------------------


def _check_layer_names(config: dict, sandbox: _Sandbox) -> None:
    for field, layer in sandbox.provenance.items():
        if layer == TEMPLATE:
            raise sandbox.violation(field, f"was set by a layer named {TEMPLATE!r}, the name "
                                    "violations give the template's own fields")


def _check_known_fields(config: dict, sandbox: _Sandbox) -> None:
    for prefix, fields in (("", CONFIG_FIELDS), ("process.", PROCESS_FIELDS),
                           ("linux.", LINUX_FIELDS)):
        value = _obj(config.get(prefix[:-1])) if prefix else config
        for key in value:
            if key in fields:
                continue
            path = f"{prefix}{key}"
            reason = REFUSED_FIELDS.get(path, "tappass-host sets no such field, and runtimes act on it")
            raise InvariantViolation(prefix + _shown(key), sandbox.layer_of(path),
                                     f"is not allowed: {reason}")


def _check_owned_fields(config: dict, sandbox: _Sandbox) -> None:
    """Limits and the seccomp profile are their layer's alone: the resources layer
    derives linux.resources (or rootless without cgroups, process.rlimits) from
    the keyring's process limits, the kernel layer selects the seccomp profile.
    A later layer could otherwise raise or remove a limit, add `unified` keys or
    device rules, or loosen the profile (flags, architectures, a listener, allow rules)."""
    for field, owner in OWNED_FIELDS.items():
        for path in sandbox.set_by_others(field, owner):
            if field == "linux.seccomp" and _adds_a_refusal(config, path):
                continue
            rule = f"is the {owner} layer's alone"
            if field == "linux.seccomp":
                rule += (" (another layer may only add rules that refuse: SCMP_ACT_KILL*, or "
                         "SCMP_ACT_ERRNO with an errnoRet other than 0)")
            raise sandbox.violation(path, rule)


def _adds_a_refusal(config: dict, path: str) -> bool:
    """`path` is one seccomp rule that only refuses (an errnoRet of 0 would fake success,
    e.g. of the Landlock launcher's landlock_restrict_self)."""
    if not _SECCOMP_RULE.fullmatch(path):
        return False
    index = int(path[path.rindex("[") + 1:-1])
    rules = _list(_obj(_obj(config.get("linux")).get("seccomp")).get("syscalls"))
    if index >= len(rules):
        return False
    rule = _obj(rules[index])
    errno = rule.get("errnoRet")
    return rule.get("action") in DENYING_ACTIONS and (
        rule["action"] != "SCMP_ACT_ERRNO" or errno is None or (_is_int(errno) and errno > 0))


# --- process -----------------------------------------------------------------


def _check_user(config: dict, sandbox: _Sandbox) -> None:
    """The agent runs as the ids allocated to this sandbox, with no supplementary
    group (`additionalGids` 42 would read /etc/shadow through the read-only /etc)."""
    user = _obj(_obj(config.get("process")).get("user"))
    for key in ("uid", "gid"):
        value = user.get(key)
        if not _is_int(value) or value == 0:
            raise sandbox.violation(f"process.user.{key}", "must be set and not 0")
    allocated = {"uid": sandbox.host.agent_uid, "gid": sandbox.host.agent_gid}
    for key, value in allocated.items():
        if user[key] != value:
            raise sandbox.violation(f"process.user.{key}", f"must be the sandbox's agent {key} ({value})")
    extra = user.get("additionalGids")
    if extra not in (None, []):
        field = "process.user.additionalGids" + ("[0]" if isinstance(extra, list) else "")
        raise sandbox.violation(field, "must be empty: the agent has no supplementary groups")


def _check_id_mappings(config: dict, sandbox: _Sandbox) -> None:
    """A user namespace's mappings reach only the agent's own host ids: in root
    mode its one uid and gid (never host 0), rootless the ids tappass-host
    allocated to the sandbox's namespace, each translated as allocated."""
    linux = _obj(config.get("linux"))
    host = sandbox.host
    for key, name in (("uid", "uidMappings"), ("gid", "gidMappings")):
        if sandbox.rootless:
            allowed = [dict(m) for m in (host.uid_mappings if key == "uid" else host.gid_mappings)]
        else:
            own = host.agent_uid if key == "uid" else host.agent_gid
            allowed = [{"containerID": own, "hostID": own, "size": 1}]
        value = linux.get(name)
        if value is not None and not isinstance(value, list):
            raise sandbox.violation(f"linux.{name}", "must be a list of mappings")
        for i, m in enumerate(_list(value)):
            m = _obj(m)
            field = f"linux.{name}[{i}]"
            if not all(_is_int(m.get(k)) and m.get(k) >= 0 for k in ("containerID", "hostID", "size")):
                raise sandbox.violation(field, "must have integer containerID, hostID and size")
            if not sandbox.rootless and m["hostID"] == 0:
                raise sandbox.violation(field, f"must not map a {key} to host root")
            if not any(_translates_within(m, a) for a in allowed):
                raise sandbox.violation(field, f"must map only the agent's own {key}s")


def _translates_within(mapping: dict, allowed: dict) -> bool:
    offset = mapping["containerID"] - allowed["containerID"]
    return (mapping["hostID"] - allowed["hostID"] == offset and offset >= 0
            and offset + mapping["size"] <= allowed["size"])


def _check_oom_score(config: dict, sandbox: _Sandbox) -> None:
    score = _obj(config.get("process")).get("oomScoreAdj")
    if score is not None and (not _is_int(score) or score < 0):
        raise sandbox.violation("process.oomScoreAdj", "must not be negative (the OOM killer would spare the agent)")


def _check_annotations(config: dict, sandbox: _Sandbox) -> None:
    annotations = config.get("annotations")
    if annotations is None:
        return
    if not isinstance(annotations, dict):
        raise sandbox.violation("annotations", "must be an object")
    for key in annotations:
        if not (isinstance(key, str) and key.startswith(ANNOTATION_NAMESPACE)
                and len(key) > len(ANNOTATION_NAMESPACE)):
            raise sandbox.violation(f"annotations.{_shown(key)}", f"is not allowed: only {ANNOTATION_NAMESPACE}* "
                                    "annotations (runtimes act on the others)")


def _check_cgroups_path(config: dict, sandbox: _Sandbox) -> None:
    """tappass-host sets no cgroupsPath: the runtime derives the sandbox's cgroup
    from its container id. Any other path would join (and rewrite the limits of)
    an existing cgroup of the host."""
    if _obj(config.get("linux")).get("cgroupsPath") not in (None, ""):
        raise sandbox.violation("linux.cgroupsPath", "must be unset (the runtime derives the sandbox's own cgroup)")


def _check_rootless_mappings(config: dict, sandbox: _Sandbox) -> None:
    """Rootless, the agent runs in its own user namespace: its uid and gid
    must be mapped, and not onto the id the container's root maps to (the
    user: that is the single-id fallback, where container root is unmapped)."""
    if not sandbox.rootless:
        return
    user = _obj(_obj(config.get("process")).get("user"))
    linux = _obj(config.get("linux"))
    for key, name in (("uid", "uidMappings"), ("gid", "gidMappings")):
        mappings = [_obj(m) for m in _list(linux.get(name))]
        if not mappings:
            raise sandbox.violation(f"linux.{name}", "must map the agent's ids (rootless)")
        for i, m in enumerate(mappings):
            if not all(_is_int(m.get(k)) and m.get(k) >= 0 for k in ("containerID", "hostID", "size")):
                raise sandbox.violation(f"linux.{name}[{i}]", "must have integer containerID, hostID and size")
        agent = _map_id(user[key], mappings)
        if agent is None:
            raise sandbox.violation(f"linux.{name}", f"must map the agent {key} {user[key]}")
        if agent == _map_id(0, mappings):
            raise sandbox.violation(f"linux.{name}", f"must not map the agent {key} onto the id of the container's root (the user)")


def _map_id(inner: int, mappings: list[dict]) -> int | None:
    for m in mappings:
        if m["containerID"] <= inner < m["containerID"] + m["size"]:
            return m["hostID"] + inner - m["containerID"]
    return None


def _check_no_new_privileges(config: dict, sandbox: _Sandbox) -> None:
    if _obj(config.get("process")).get("noNewPrivileges") is not True:
        raise sandbox.violation("process.noNewPrivileges", "must be true")


def _check_capabilities(config: dict, sandbox: _Sandbox) -> None:
    capabilities = _obj(config.get("process")).get("capabilities")
    if capabilities is None:
        return
    if not isinstance(capabilities, dict):
        raise sandbox.violation("process.capabilities", "must be an object of empty sets")
    for name, value in capabilities.items():
        if value not in (None, []):
            raise sandbox.violation(f"process.capabilities.{name}", "must be empty")


# --- root and mounts ---------------------------------------------------------


def _check_root(config: dict, sandbox: _Sandbox) -> None:
    root = _obj(config.get("root"))
    if root.get("readonly") is not True:
        raise sandbox.violation("root.readonly", "must be true")
    path = root.get("path")
    bundle = posixpath.dirname(sandbox.rootfs)
    if not isinstance(path, str) or posixpath.normpath(posixpath.join(bundle, path)) != sandbox.rootfs:
        raise sandbox.violation("root.path", f"must be the bundle's own rootfs ({sandbox.rootfs})")


class _Mount(NamedTuple):
    field: str
    destination: str
    type: str
    source: str
    options: tuple[str, ...]

    @property
    def is_bind(self) -> bool:
        return self.type == "bind" or "bind" in self.options or "rbind" in self.options

    @property
    def readonly(self) -> bool:
        # Later options win, as the runtimes parse them; rro/rrw are separate.
        plain = recursive = False
        for option in self.options:
            if option in ("ro", "rw"):
                plain = option == "ro"
            elif option in ("rro", "rrw"):
                recursive = option == "rro"
        return plain or recursive

    @property
    def size_limited(self) -> bool:
        return any(option.startswith("size=") for option in self.options)


def _mounts(config: dict, sandbox: _Sandbox) -> Iterator[_Mount]:
    for i, raw in enumerate(_list(config.get("mounts"))):
        field = f"mounts[{i}]"
        raw = _obj(raw)
        destination = raw.get("destination")
        if not isinstance(destination, str) or not destination.startswith("/"):
            raise sandbox.violation(field, "destination must be an absolute path")
        if ".." in destination.split("/"):
            raise sandbox.violation(field, "destination must not have '..' segments")
        options = raw.get("options") or []
        if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
            raise sandbox.violation(field, "options must be a list of strings")
        if any(raw.get(key) not in (None, []) for key in ("uidMappings", "gidMappings")) or any(
                o.split("=", 1)[0] in IDMAP_OPTIONS for o in options):
            raise sandbox.violation(field, "must not be an idmapped mount (uidMappings, gidMappings, idmap, ridmap)")
        if any(o in SHARED_PROPAGATION for o in options):
            raise sandbox.violation(field, "must not be a shared mount (mounts made under it "
                                           "would propagate out of the sandbox)")
        yield _Mount(
            field=field,
            destination=posixpath.normpath(destination),
            type=str(raw.get("type") or ""),
            source=str(raw.get("source") or ""),
            options=tuple(options),
        )


def _check_keyring_mount(config: dict, sandbox: _Sandbox) -> None:
    mounts = list(_mounts(config, sandbox))
    keyring = [m for m in mounts if m.destination == KEYRING_DESTINATION]
    if not keyring:
        raise sandbox.violation("mounts", f"must mount the keyring at {KEYRING_DESTINATION}")
    for m in keyring:
        if not m.is_bind or _host_path(m.source) != sandbox.keyring_dir:
            raise sandbox.violation(m.field, f"{KEYRING_DESTINATION} must be a bind of the sandbox's keyring directory")
        contrary = {"rw", "suid", "dev", "exec"} & set(m.options)
        if not set(KEYRING_OPTIONS) <= set(m.options) or contrary or not m.readonly:
            raise sandbox.violation(m.field, f"the keyring mount must be {','.join(KEYRING_OPTIONS)}")
    last = max(i for i, m in enumerate(mounts) if m.destination == KEYRING_DESTINATION)
    for m in mounts[last + 1 :]:
        if _within(KEYRING_DESTINATION, m.destination):
            raise sandbox.violation(m.field, f"must not hide the keyring mount at {KEYRING_DESTINATION}")


def _check_mount_sources(config: dict, sandbox: _Sandbox) -> None:
    own = (sandbox.keyring_dir, sandbox.workspace_dir)
    for m in _mounts(config, sandbox):
        if not m.is_bind:
            if _within(m.source, "/dev"):
                raise sandbox.violation(m.field, "must not mount a host device")
            continue
        if not m.source.startswith("/"):
            raise sandbox.violation(m.field, "bind source must be an absolute host path")
        literal, real = posixpath.normpath(m.source), _host_path(m.source)
        if real in own:
            continue
        if _overlaps(real, sandbox.state_dir) or _overlaps(literal, sandbox.state_dir):
            raise sandbox.violation(m.field, "must not mount tappass-host state other than its keyring and workspace")
        for host in HOST_RUNTIME_PATHS:
            if _overlaps(real, host) or _overlaps(literal, host):
                raise sandbox.violation(m.field, f"must not bind host sockets, devices or kernel state ({host})")
        if real.endswith((".sock", ".socket")) or _is_socket(real):
            raise sandbox.violation(m.field, "must not bind a host socket")


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def _check_mount_kinds(config: dict, sandbox: _Sandbox) -> None:
    for m in _mounts(config, sandbox):
        standard = STANDARD_MOUNTS.get(m.destination)
        if standard is not None:
            if m.is_bind or m.type != standard:
                raise sandbox.violation(m.field, f"{m.destination} must be a {standard} mount")
            if m.destination in READONLY_STANDARD_MOUNTS and not m.readonly:
                raise sandbox.violation(m.field, f"{m.destination} must be read-only")
            continue
        if m.is_bind:
            writable_ok = m.destination == WORKSPACE_DESTINATION and _host_path(m.source) == sandbox.workspace_dir
        elif m.type == "tmpfs":
            writable_ok = m.size_limited
        elif m.type in EXTRA_FILESYSTEMS:
            writable_ok = False
        else:
            raise sandbox.violation(m.field, f"filesystem type {m.type or '(none)'} is not allowed")
        if not writable_ok and not m.readonly:
            raise sandbox.violation(m.field, "must be read-only: only the workspace and sized tmpfs are writable")


def _check_devices(config: dict, sandbox: _Sandbox) -> None:
    linux = _obj(config.get("linux"))
    if _list(linux.get("devices")):
        raise sandbox.violation("linux.devices[0]", "must not add host devices")
    for i, rule in enumerate(_list(_obj(linux.get("resources")).get("devices"))):
        if _obj(rule).get("allow") is not False:
            raise sandbox.violation(f"linux.resources.devices[{i}]", "must not allow device access")


# --- namespaces --------------------------------------------------------------


def _check_namespaces(config: dict, sandbox: _Sandbox) -> None:
    namespaces = [_obj(ns) for ns in _list(_obj(config.get("linux")).get("namespaces"))]
    present = {str(ns.get("type")) for ns in namespaces}
    required = REQUIRED_NAMESPACES + (("user",) if sandbox.rootless else ())
    for kind in required:
        if kind not in present:
            raise sandbox.violation("linux.namespaces", f"must include a new {kind} namespace")
    for i, ns in enumerate(namespaces):
        path = ns.get("path")
        if not path:
            continue
        field = f"linux.namespaces[{i}].path"
        if ns.get("type") != "network":
            raise sandbox.violation(field, f"must be unset: the {ns.get('type')} namespace must be new")
        if not _is_sandbox_netns(str(path), _own_netns(sandbox)):
            raise sandbox.violation(field, "must not join the host network namespace, nor "
                                           f"any but the sandbox's own ({_own_netns(sandbox)})")


def _own_netns(sandbox: _Sandbox) -> str:
    """`tappass-<name>`: the namespace network mode proxy creates for this
    sandbox (its name is that of the directory holding its keyring)."""
    return "tappass-" + posixpath.basename(posixpath.dirname(sandbox.keyring_dir))


def _is_sandbox_netns(path: str, own: str) -> bool:
    literal = posixpath.normpath(path)
    if not any(literal == posixpath.join(d, own) for d in NETNS_DIRS):
        return False
    try:
        target = os.stat(path)
    except FileNotFoundError:
        return True  # created later, before the runtime starts: nothing to compare yet
    except OSError:
        return False  # there, but we cannot tell whose it is
    return not is_host_netns(target)


# --- seccomp -----------------------------------------------------------------


def _check_seccomp(config: dict, sandbox: _Sandbox) -> None:
    seccomp = _obj(config.get("linux")).get("seccomp")
    if not isinstance(seccomp, dict):
        raise sandbox.violation("linux.seccomp", "must be present")
    if seccomp.get("defaultAction") not in DENYING_ACTIONS:
        raise sandbox.violation("linux.seccomp.defaultAction", "must deny (SCMP_ACT_ERRNO or SCMP_ACT_KILL*)")
    for i, rule in enumerate(_list(seccomp.get("syscalls"))):
        rule = _obj(rule)
        if rule.get("action") not in PERMISSIVE_ACTIONS:
            continue
        field = f"linux.seccomp.syscalls[{i}]"
        args = [_obj(a) for a in _list(rule.get("args"))]
        for name in _list(rule.get("names")):
            if not isinstance(name, str):
                raise sandbox.violation(field, "names must be syscall names")
            if name in ESCALATION_SYSCALLS:
                raise sandbox.violation(field, f"must not allow {name}")
            if name == "clone" and not _clone_without_namespaces(args):
                raise sandbox.violation(field, "must only allow clone without namespace flags")
            if name == "personality" and not _safe_personality(args):
                raise sandbox.violation(field, "must only allow safe personality values")


def _clone_without_namespaces(args: list[dict]) -> bool:
    for arg in args:
        mask, expected = arg.get("value"), arg.get("valueTwo", 0)
        if (
            arg.get("index") == 0
            and arg.get("op") == "SCMP_CMP_MASKED_EQ"
            and _is_int(mask)
            and _is_int(expected)
            and mask & CLONE_NAMESPACE_FLAGS == CLONE_NAMESPACE_FLAGS
            and expected & CLONE_NAMESPACE_FLAGS == 0
        ):
            return True
    return False


def _safe_personality(args: list[dict]) -> bool:
    return any(
        a.get("index") == 0 and a.get("op") == "SCMP_CMP_EQ" and a.get("value") in SAFE_PERSONALITIES for a in args
    )


# --- the rest ----------------------------------------------------------------


def _check_masked_paths(config: dict, sandbox: _Sandbox) -> None:
    linux = _obj(config.get("linux"))
    for key, standard in (("maskedPaths", STANDARD_MASKED_PATHS), ("readonlyPaths", STANDARD_READONLY_PATHS)):
        missing = [p for p in standard if p not in _list(linux.get(key))]
        if missing:
            raise sandbox.violation(f"linux.{key}", f"must include the standard set (missing {missing[0]})")


def _check_hooks(config: dict, sandbox: _Sandbox) -> None:
    hooks = config.get("hooks")
    if not hooks:
        return
    if not isinstance(hooks, dict):
        raise sandbox.violation("hooks", "must be empty: OCI hooks run as root on the host")
    for kind, entries in hooks.items():
        if entries:
            raise sandbox.violation(f"hooks.{kind}", "must be empty: OCI hooks run as root on the host")


def _check_sysctl(config: dict, sandbox: _Sandbox) -> None:
    sysctl = _obj(config.get("linux")).get("sysctl")
    if sysctl:
        name = next(iter(sysctl)) if isinstance(sysctl, dict) else "?"
        raise sandbox.violation("linux.sysctl", f"must be empty (sets {name})")


def _check_rootfs_propagation(config: dict, sandbox: _Sandbox) -> None:
    if _obj(config.get("linux")).get("rootfsPropagation") not in (None, "", *SAFE_ROOTFS_PROPAGATION):
        raise sandbox.violation("linux.rootfsPropagation", "must not be shared (the sandbox's "
                                "mounts would appear on the host)")


def _check_personality(config: dict, sandbox: _Sandbox) -> None:
    """As the seccomp profile's personality rules: no ADDR_NO_RANDOMIZE,
    READ_IMPLIES_EXEC… (the runtime sets them before the profile applies)."""
    personality = _obj(config.get("linux")).get("personality")
    if personality is None:
        return
    personality = _obj(personality)
    if personality.get("domain") not in PERSONALITY_DOMAINS:
        raise sandbox.violation("linux.personality.domain", "must be LINUX or LINUX32")
    if personality.get("flags") not in (None, []):
        raise sandbox.violation("linux.personality.flags", "must be empty")


def _check_scheduling(config: dict, sandbox: _Sandbox) -> None:
    """The runtime, as root, sets the agent's scheduling before it drops privileges:
    nothing above what the agent could set itself (a real-time policy or I/O class,
    a negative nice would starve the host's other work)."""
    process = _obj(config.get("process"))
    if (scheduler := process.get("scheduler")) is not None:
        scheduler = _obj(scheduler)
        if scheduler.get("policy") not in FAIR_SCHEDULER_POLICIES:
            raise sandbox.violation("process.scheduler.policy", "must be one of "
                                    f"{', '.join(FAIR_SCHEDULER_POLICIES)} (not real-time)")
        nice = scheduler.get("nice", 0)
        if not _is_int(nice) or nice < 0:
            raise sandbox.violation("process.scheduler.nice", "must not be negative")
        if scheduler.get("priority", 0) != 0:
            raise sandbox.violation("process.scheduler.priority", "must be 0 (a real-time priority)")
        flags = scheduler.get("flags", [])
        if not isinstance(flags, list) or any(f not in FAIR_SCHEDULER_FLAGS for f in flags):
            raise sandbox.violation("process.scheduler.flags",
                                    f"may only be {', '.join(FAIR_SCHEDULER_FLAGS)}")
    if (priority := process.get("ioPriority")) is not None:
        if _obj(priority).get("class") not in FAIR_IO_CLASSES:
            raise sandbox.violation("process.ioPriority.class",
                                    f"must be one of {', '.join(FAIR_IO_CLASSES)} (not real-time)")


def _check_landlock_launcher(config: dict, sandbox: _Sandbox) -> None:
    """The kernel layer mounted the Landlock launcher: the agent's argv must
    still go through it, with the kernel layer's rules (a later layer
    replacing process.args would drop or widen them)."""
    from tappass_host.landlock import LAUNCHER_DIR, launches

    if not any(m.destination == LAUNCHER_DIR for m in _mounts(config, sandbox)):
        if sandbox.landlock:
            raise sandbox.violation("mounts", "must mount the Landlock launcher (this host "
                                    "has Landlock; the kernel layer applies it)")
        return
    args = _list(_obj(config.get("process")).get("args"))
    launch = launches(args) or []
    if (not launch or "--" not in args[len(launch):-1]
            or sandbox.layer_of("process.args") != "kernel"):
        raise sandbox.violation("process.args", "must run the agent through the Landlock launcher "
                                "as the kernel layer set it")


def _launch_paths() -> tuple[str, ...]:
    """What the Landlock launcher runs before its ruleset applies: the interpreter and
    its libraries and the dynamic loader's files in /etc (ld.so.preload), which the
    filesystem layer binds read-only from the host, and the launcher itself."""
    from tappass_host.landlock import HOST_USR, LAUNCHER_DIR
    from tappass_host.layers.filesystem import HOST_DIRS, MERGED_USR_LINKS

    return (*HOST_DIRS, *MERGED_USR_LINKS, LAUNCHER_DIR, HOST_USR)


def _check_launch_paths(config: dict, sandbox: _Sandbox) -> None:
    """A mount there by another layer (a file over /usr/bin/python3 or the launcher,
    /etc/ld.so.preload naming a library in the agent's package) would run code in
    the launcher before its Landlock ruleset, or instead of it."""
    paths = _launch_paths()
    for m in _mounts(config, sandbox):
        layer = sandbox.layer_of(m.field)
        if layer not in (*LAUNCH_PATH_LAYERS, TEMPLATE) and any(
                _overlaps(m.destination, path) for path in paths):
            raise sandbox.violation(m.field, f"must not mount over {m.destination}: only the "
                                    f"{' and '.join(LAUNCH_PATH_LAYERS)} layers mount what the "
                                    "Landlock launcher runs before its ruleset")


_RULES: tuple[Callable[[dict, _Sandbox], None], ...] = (
    _check_layer_names,
    _check_user,
    _check_rootless_mappings,
    _check_id_mappings,
    _check_oom_score,
    _check_annotations,
    _check_cgroups_path,
    _check_no_new_privileges,
    _check_capabilities,
    _check_root,
    _check_keyring_mount,
    _check_mount_sources,
    _check_mount_kinds,
    _check_devices,
    _check_namespaces,
    _check_seccomp,
    _check_masked_paths,
    _check_hooks,
    _check_sysctl,
    _check_landlock_launcher,
    _check_known_fields,
    _check_owned_fields,
    _check_rootfs_propagation,
    _check_personality,
    _check_scheduling,
    _check_launch_paths,
)
