"""OCI foundations: invariants, schema, seccomp profiles, and real sandboxes under crun and runc.

The real-sandbox tests need root; crun additionally needs the cgroup quirk of
DESIGN §12 handled by the caller (scripts/test runs the suite under
`unshare -m sh -c 'umount /sys/fs/cgroup/unified && ...'`). A runtime that
cannot start a sandbox fails the test: nothing here is skipped for it.
"""

import copy
import ctypes
import json
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

import patience
import oci_fixture
from oci_fixture import AGENT_GID, AGENT_UID, invariant_args, layout, locked_down_config, write_bundle
from tappass_host import processes, shipped
from tappass_host.errors import TappassError
from tappass_host.oci import field_path, invariants, parent_field, schema
from tappass_host.oci import rootfs as rootfs_module
from tappass_host.oci.invariants import InvariantViolation

PROBES = Path(__file__).parent / "probes"
RUNTIMES = ["crun", "runc"]
KEYRING = "/run/tappass/keyring"


def check(config, tmp_path, provenance=None, *, rootless=False):
    invariants.check(config, provenance=provenance or {}, **invariant_args(tmp_path, rootless=rootless))


def mount_index(config, destination):
    return next(i for i, m in enumerate(config["mounts"]) if m["destination"] == destination)


def add_mount(config, mount):
    config["mounts"].append(mount)
    return f"mounts[{len(config['mounts']) - 1}]"


def bind(source, destination, *options):
    return {"destination": destination, "type": "bind", "source": str(source), "options": ["rbind", *options]}


# --- field paths -------------------------------------------------------------


def test_field_paths_read_like_the_config():
    assert field_path(["process", "user", "uid"]) == "process.user.uid"
    assert field_path(["mounts", 3, "options", 0]) == "mounts[3].options[0]"
    assert parent_field("linux.namespaces[4].path") == "linux.namespaces[4]"
    assert parent_field("linux.namespaces[4]") == "linux.namespaces"
    assert parent_field("root") == ""


# --- invariants: the fixture passes, each forbidden thing is refused --------------


def test_locked_down_config_passes_the_invariants(tmp_path):
    check(locked_down_config(tmp_path), tmp_path)


def test_rootless_config_needs_and_passes_with_a_user_namespace(tmp_path):
    config = locked_down_config(tmp_path, uid=oci_fixture.ROOTLESS_AGENT_ID,
                                gid=oci_fixture.ROOTLESS_AGENT_ID)
    config["linux"]["uidMappings"] = [dict(m) for m in oci_fixture.ROOTLESS_MAPPINGS]
    config["linux"]["gidMappings"] = [dict(m) for m in oci_fixture.ROOTLESS_MAPPINGS]
    with pytest.raises(InvariantViolation) as refused:
        check(config, tmp_path, rootless=True)
    assert refused.value.field == "linux.namespaces"
    config["linux"]["namespaces"].append({"type": "user"})
    check(config, tmp_path, rootless=True)
    # the agent's id onto another of the user's ids (another sandbox's agent)
    config["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 0, "size": 1},
                                      {"containerID": 1, "hostID": 1, "size": 999},
                                      {"containerID": 1000, "hostID": 1001, "size": 1}]
    with pytest.raises(InvariantViolation) as refused:
        check(config, tmp_path, rootless=True)
    assert refused.value.field == "linux.uidMappings[2]"


def _set_uid_0(c, _):
    c["process"]["user"]["uid"] = 0
    return "process.user.uid", "process.user.uid"


def _set_gid_0(c, _):
    c["process"]["user"]["gid"] = 0
    return "process.user.gid", "process.user"


def _drop_uid(c, _):
    del c["process"]["user"]["uid"]
    return "process.user.uid", "process.user"


def _additional_gid_0(c, _):
    c["process"]["user"]["additionalGids"] = [0]
    return "process.user.additionalGids[0]", "process.user.additionalGids"


def _additional_gid_shadow(c, _):
    c["process"]["user"]["additionalGids"] = [42]  # shadow: /etc/shadow through the ro /etc
    return "process.user.additionalGids[0]", "process.user.additionalGids"


def _other_uid(c, _):
    c["process"]["user"]["uid"] = AGENT_UID + 1  # another sandbox's agent
    return "process.user.uid", "process.user.uid"


def _other_gid(c, _):
    c["process"]["user"]["gid"] = 42
    return "process.user.gid", "process.user.gid"


def _annotation(key):
    def mutate(c, _):
        c["annotations"] = {"org.tappass.fine": "x", key: "1"}
        return f"annotations.{key}", "annotations"
    mutate.__name__ = f"_annotation_{key}"
    return mutate


def _mount_id_mapping(key):
    def mutate(c, _):
        i = mount_index(c, "/usr")
        c["mounts"][i][key] = [{"containerID": 0, "hostID": 0, "size": 65536}]
        return f"mounts[{i}]", f"mounts[{i}]"
    mutate.__name__ = f"_mount_{key}"
    return mutate


def _mount_option(option):
    def mutate(c, _):
        i = mount_index(c, "/etc")
        c["mounts"][i]["options"] = [*c["mounts"][i]["options"], option]
        return f"mounts[{i}]", f"mounts[{i}]"
    mutate.__name__ = f"_mount_option_{option.split('=')[0]}"
    return mutate


def _root_path(path):
    def mutate(c, _):
        c["root"]["path"] = path
        return "root.path", "root.path"
    mutate.__name__ = f"_root_path_{path.strip('/').replace('/', '_') or 'slash'}"
    return mutate


def _cgroups_path(c, _):
    c["linux"]["cgroupsPath"] = "/system.slice"
    return "linux.cgroupsPath", "linux.cgroupsPath"


def _dotdot_destination(c, _):
    return add_mount(c, {"destination": "/tmp/../../../../etc/cron.d", "type": "tmpfs",
                         "source": "tmpfs", "options": ["size=1k", "ro"]}), "mounts"


def _user_namespace_mapping(mapping, key="uidMappings"):
    def mutate(c, _):
        c["linux"]["namespaces"].append({"type": "user"})
        c["linux"][key] = [{"containerID": AGENT_UID, "hostID": AGENT_UID, "size": 1}, mapping]
        return f"linux.{key}[1]", f"linux.{key}"
    mutate.__name__ = f"_userns_{key}_host_{mapping['hostID']}"
    return mutate


def _negative_oom_score(c, _):
    c["process"]["oomScoreAdj"] = -1000
    return "process.oomScoreAdj", "process.oomScoreAdj"


def _no_new_privileges_false(c, _):
    c["process"]["noNewPrivileges"] = False
    return "process.noNewPrivileges", "process.noNewPrivileges"


def _no_new_privileges_missing(c, _):
    del c["process"]["noNewPrivileges"]
    return "process.noNewPrivileges", "process"


def _root_writable(c, _):
    c["root"]["readonly"] = False
    return "root.readonly", "root.readonly"


def _keyring_writable(c, _):
    i = mount_index(c, KEYRING)
    c["mounts"][i]["options"] = ["rbind", "rw", "nosuid", "nodev", "noexec"]
    return f"mounts[{i}]", f"mounts[{i}]"


def _keyring_ro_then_rw(c, _):
    i = mount_index(c, KEYRING)
    c["mounts"][i]["options"].append("rw")
    return f"mounts[{i}]", f"mounts[{i}]"


def _keyring_exec(c, _):
    i = mount_index(c, KEYRING)
    c["mounts"][i]["options"].remove("noexec")
    return f"mounts[{i}]", f"mounts[{i}]"


def _keyring_missing(c, _):
    del c["mounts"][mount_index(c, KEYRING)]
    return "mounts", "mounts"


def _keyring_from_elsewhere(c, tmp_path):
    i = mount_index(c, KEYRING)
    c["mounts"][i]["source"] = str(tmp_path / "state")
    return f"mounts[{i}]", f"mounts[{i}]"


def _keyring_hidden_by_tmpfs(c, _):
    field = add_mount(c, {"destination": "/run/tappass", "type": "tmpfs", "source": "tmpfs", "options": ["size=1m"]})
    return field, field


def _docker_socket(c, _):
    field = add_mount(c, bind("/run/docker.sock", "/run/docker.sock", "ro"))
    return field, field


def _var_run_docker_socket(c, _):
    field = add_mount(c, bind("/var/run/docker.sock", "/var/run/docker.sock"))
    return field, "mounts"


def _containerd_dir(c, _):
    field = add_mount(c, bind("/run/containerd", "/containerd", "ro"))
    return field, field


def _real_socket_file(c, tmp_path):
    path = tmp_path / "agent.sk"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.close()
    field = add_mount(c, bind(path, "/agent.sk", "ro"))
    return field, field


def _host_root(c, _):
    field = add_mount(c, bind("/", "/host", "ro"))
    return field, field


def _dev_sda_mount(c, _):
    field = add_mount(c, bind("/dev/sda", "/dev/sda"))
    return field, field


def _dev_sda_device(c, _):
    c["linux"]["devices"] = [{"path": "/dev/sda", "type": "b", "major": 8, "minor": 0}]
    return "linux.devices[0]", "linux.devices"


def _device_cgroup_allow_all(c, _):
    c["linux"]["resources"]["devices"].append({"allow": True, "access": "rwm"})
    return "linux.resources.devices[1]", "linux.resources"


def _machine_key_dir(c, tmp_path):
    field = add_mount(c, bind(layout(tmp_path).machine_key.parent, "/machine", "ro"))
    return field, field


def _whole_state_dir(c, tmp_path):
    field = add_mount(c, bind(layout(tmp_path).state_dir, "/state", "ro"))
    return field, field


def _other_sandbox_workspace(c, tmp_path):
    other = layout(tmp_path).state_dir / "sandboxes" / "other" / "workspace"
    other.mkdir(parents=True)
    field = add_mount(c, bind(other, "/other", "ro"))
    return field, field


def _symlink_to_state(c, tmp_path):
    link = tmp_path / "innocent"
    link.symlink_to(layout(tmp_path).state_dir)
    field = add_mount(c, bind(link, "/innocent", "ro"))
    return field, field


def _writable_host_etc(c, _):
    i = mount_index(c, "/etc")
    c["mounts"][i]["options"] = ["rbind", "rw"]
    return f"mounts[{i}]", f"mounts[{i}]"


def _workspace_elsewhere_writable(c, tmp_path):
    field = add_mount(c, bind(layout(tmp_path).workspace_dir, "/opt/agent", "rw"))
    return field, field


def _tmpfs_without_size(c, _):
    field = add_mount(c, {"destination": "/scratch", "type": "tmpfs", "source": "tmpfs", "options": ["mode=1777"]})
    return field, field


def _sys_writable(c, _):
    i = mount_index(c, "/sys")
    c["mounts"][i]["options"] = ["nosuid", "noexec", "nodev"]
    return f"mounts[{i}]", f"mounts[{i}]"


def _host_proc(c, _):
    i = mount_index(c, "/proc")
    c["mounts"][i] = bind("/proc", "/proc", "ro")
    return f"mounts[{i}]", f"mounts[{i}]"


def _block_device_fs(c, _):
    field = add_mount(c, {"destination": "/disk", "type": "ext4", "source": "/dev/vda", "options": ["ro"]})
    return field, field


def _hook(kind):
    def mutate(c, _):
        c["hooks"] = {kind: [{"path": "/usr/bin/sh", "args": ["sh", "-c", "id"]}]}
        return f"hooks.{kind}", "hooks"

    mutate.__name__ = f"_hook_{kind}"
    return mutate


def _capability(kind):
    def mutate(c, _):
        c["process"]["capabilities"][kind] = ["CAP_SYS_ADMIN"]
        return f"process.capabilities.{kind}", "process.capabilities"

    mutate.__name__ = f"_capability_{kind}"
    return mutate


def _seccomp_missing(c, _):
    del c["linux"]["seccomp"]
    return "linux.seccomp", "linux.seccomp"


def _seccomp_action(action):
    def mutate(c, _):
        c["linux"]["seccomp"]["defaultAction"] = action
        return "linux.seccomp.defaultAction", "linux.seccomp"

    mutate.__name__ = f"_seccomp_default_{action}"
    return mutate


def _seccomp_allows(name, action="SCMP_ACT_ALLOW"):
    def mutate(c, _):
        c["linux"]["seccomp"]["syscalls"].append({"names": ["read", name], "action": action})
        return f"linux.seccomp.syscalls[{len(c['linux']['seccomp']['syscalls']) - 1}]", "linux.seccomp.syscalls"

    mutate.__name__ = f"_seccomp_allows_{name}_{action}"
    return mutate


def _seccomp_clone_with_weak_mask(c, _):
    rule = {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": 0x20000, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]}
    c["linux"]["seccomp"]["syscalls"].append(rule)
    return f"linux.seccomp.syscalls[{len(c['linux']['seccomp']['syscalls']) - 1}]", "linux.seccomp"


def _seccomp_unsafe_personality(c, _):
    rule = {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": 0x40000, "op": "SCMP_CMP_EQ"}]}
    c["linux"]["seccomp"]["syscalls"].append(rule)
    return f"linux.seccomp.syscalls[{len(c['linux']['seccomp']['syscalls']) - 1}]", "linux.seccomp"


def _without_namespace(kind):
    def mutate(c, _):
        c["linux"]["namespaces"] = [ns for ns in c["linux"]["namespaces"] if ns["type"] != kind]
        return "linux.namespaces", "linux.namespaces"

    mutate.__name__ = f"_without_{kind}_namespace"
    return mutate


def _namespace_path(kind, path):
    def mutate(c, _):
        i = next(i for i, ns in enumerate(c["linux"]["namespaces"]) if ns["type"] == kind)
        c["linux"]["namespaces"][i]["path"] = path
        return f"linux.namespaces[{i}].path", f"linux.namespaces[{i}]"

    mutate.__name__ = f"_{kind}_namespace_at_{path}"
    return mutate


def _masked_paths_trimmed(c, _):
    c["linux"]["maskedPaths"].remove("/proc/kcore")
    return "linux.maskedPaths", "linux.maskedPaths"


def _readonly_paths_trimmed(c, _):
    c["linux"]["readonlyPaths"].remove("/proc/sysrq-trigger")
    return "linux.readonlyPaths", "linux"


def _sysctl(c, _):
    c["linux"]["sysctl"] = {"net.ipv4.ip_forward": "1"}
    return "linux.sysctl", "linux.sysctl"


def _uid_mapped_to_host_root(c, _):
    c["linux"]["uidMappings"] = [{"containerID": AGENT_UID, "hostID": 0, "size": 1}]
    return "linux.uidMappings[0]", "linux.uidMappings"


# Fields of the resources and kernel layers, set by another layer (each passes the other rules)


def _resource(path, value):
    def mutate(c, _):
        target = c["linux"]["resources"]
        for key in path[:-1]:
            target = target.setdefault(key, {})
        target[path[-1]] = value
        field = "linux.resources." + ".".join(path)
        return field, field

    mutate.__name__ = f"_resources_{'_'.join(path)}"
    return mutate


def _resources_removed(c, _):
    c["linux"]["resources"] = None
    return "linux.resources", "linux.resources"


def _device_cgroup_deny_rule_replaced(c, _):
    c["linux"]["resources"]["devices"] = [{"allow": False, "type": "b", "access": "rwm"}]
    return "linux.resources.devices", "linux.resources.devices"


def _rlimit_added(kind):
    def mutate(c, _):
        c["process"]["rlimits"].append({"type": kind, "hard": 1 << 40, "soft": 1 << 40})
        field = f"process.rlimits[{len(c['process']['rlimits']) - 1}]"
        return field, field

    mutate.__name__ = f"_rlimit_{kind}"
    return mutate


def _rlimits_removed(c, _):
    c["process"]["rlimits"] = []
    return "process.rlimits", "process.rlimits"


def _seccomp_field(key, value):
    def mutate(c, _):
        c["linux"]["seccomp"][key] = value
        return f"linux.seccomp.{key}", f"linux.seccomp.{key}"

    mutate.__name__ = f"_seccomp_{key}"
    return mutate


def _seccomp_architecture_added(c, _):
    c["linux"]["seccomp"]["architectures"].append("SCMP_ARCH_X86")
    return "linux.seccomp.architectures[1]", "linux.seccomp.architectures[1]"


def _seccomp_rule_added(rule):
    def mutate(c, _):
        c["linux"]["seccomp"]["syscalls"].append(rule)
        field = f"linux.seccomp.syscalls[{len(c['linux']['seccomp']['syscalls']) - 1}]"
        return field, field

    mutate.__name__ = f"_seccomp_rule_{rule['action']}_{rule['names'][0]}"
    return mutate


def _seccomp_replaced_by_an_equal_one(c, _):
    """Even the same values: the profile is the kernel layer's to choose (and to update)."""
    c["linux"]["seccomp"] = copy.deepcopy(c["linux"]["seccomp"])
    return "linux.seccomp", "linux.seccomp"


def _field(path, value, expected=None):
    def mutate(c, _):
        target = c
        for key in path[:-1]:
            target = target.setdefault(key, {})
        target[path[-1]] = value
        return expected or ".".join(path), ".".join(path)

    mutate.__name__ = f"_field_{'_'.join(path)}"
    return mutate


def _over_the_launch_path(destination):
    """A read-only file of the agent's package where the Landlock launcher loads code
    before its ruleset."""
    def mutate(c, tmp_path):
        package = tmp_path / "package"
        package.mkdir(exist_ok=True)
        (package / "payload").write_text("/opt/agent/payload.so\n")
        field = add_mount(c, bind(package / "payload", destination, "ro"))
        return field, field

    mutate.__name__ = f"_over_the_launch_path_{destination.strip('/').replace('/', '_')}"
    return mutate


FORBIDDEN_BEYOND_THE_LISTED = [
    _resource(("pids", "limit"), 1 << 22),
    _resource(("memory", "limit"), -1),
    _resource(("memory", "swap"), -1),
    _resource(("cpu", "quota"), -1),
    _resource(("unified",), {"memory.max": "max"}),
    _resource(("blockIO", "weight"), 1000),
    _resource(("hugepageLimits",), [{"pageSize": "2MB", "limit": 1 << 40}]),
    _resource(("cpu", "realtimeRuntime"), 950000),
    _resources_removed,
    _device_cgroup_deny_rule_replaced,
    _rlimit_added("RLIMIT_NPROC"),
    _rlimit_added("RLIMIT_NOFILE"),
    _rlimits_removed,
    _seccomp_field("flags", ["SECCOMP_FILTER_FLAG_SPEC_ALLOW"]),
    _seccomp_field("flags", ["SECCOMP_FILTER_FLAG_LOG"]),
    _seccomp_field("listenerPath", "/run/evil/seccomp.sock"),
    _seccomp_field("defaultErrnoRet", 0),
    _seccomp_architecture_added,
    _seccomp_rule_added({"names": ["socket"], "action": "SCMP_ACT_ALLOW"}),  # any family
    _seccomp_rule_added({"names": ["landlock_restrict_self"], "action": "SCMP_ACT_ERRNO",
                         "errnoRet": 0}),  # fakes success: the launcher would run unconfined
    _seccomp_rule_added({"names": ["kill"], "action": "SCMP_ACT_TRAP"}),
    _seccomp_replaced_by_an_equal_one,
    _field(("linux", "intelRdt"), {"closID": "host-group"}),
    _field(("linux", "netDevices"), {"eth0": {"name": "eth0"}}),
    _field(("vm",), {"hypervisor": {"path": "/bin/sh"}, "kernel": {"path": "/boot/vmlinuz"}}),
    _field(("linux", "futureField"), {}),
    _field(("process", "commandLine"), "x"),
    _field(("linux", "rootfsPropagation"), "shared"),
    _field(("linux", "rootfsPropagation"), "rshared"),
    _mount_option("rshared"),
    _mount_option("shared"),
    _field(("process", "scheduler"), {"policy": "SCHED_FIFO", "priority": 99},
           "process.scheduler.policy"),
    _field(("process", "scheduler"), {"policy": "SCHED_DEADLINE", "runtime": 10 ** 9,
                                      "deadline": 10 ** 9, "period": 10 ** 9},
           "process.scheduler.policy"),
    _field(("process", "scheduler"), {"policy": "SCHED_OTHER", "nice": -20}, "process.scheduler.nice"),
    _field(("process", "scheduler"), {"policy": "SCHED_OTHER", "priority": 1},
           "process.scheduler.priority"),
    _field(("process", "scheduler"), {"policy": "SCHED_OTHER",
                                      "flags": ["SCHED_FLAG_UTIL_CLAMP_MIN"]},
           "process.scheduler.flags"),
    _field(("process", "ioPriority"), {"class": "IOPRIO_CLASS_RT", "priority": 0},
           "process.ioPriority.class"),
    _field(("linux", "personality"), {"domain": "LINUX", "flags": ["ADDR_NO_RANDOMIZE"]},
           "linux.personality.flags"),
    _field(("linux", "personality"), {"domain": "PER_SVR4"}, "linux.personality.domain"),
    *(_over_the_launch_path(d) for d in ("/etc/ld.so.preload", "/usr/bin/python3", "/usr",
                                         "/run/tappass/launcher/landlock_exec.py", "/lib64",
                                         "/run/tappass/hostusr/bin/python3.11")),
]


FORBIDDEN = [
    _set_uid_0,
    _set_gid_0,
    _drop_uid,
    _additional_gid_0,
    _additional_gid_shadow,
    _other_uid,
    _other_gid,
    _annotation("run.oci.keep_original_groups"),
    _annotation("org.systemd.property.DelegateSubgroup"),
    _annotation("org.tappass."),
    _mount_id_mapping("uidMappings"),
    _mount_id_mapping("gidMappings"),
    _mount_option("idmap"),
    _mount_option("ridmap"),
    _mount_option("idmap=uids=0-0-10;gids=0-0-10"),
    _root_path("/"),
    _root_path("/tmp/elsewhere/rootfs"),
    _root_path("rootfs/../../x"),
    _cgroups_path,
    _dotdot_destination,
    _user_namespace_mapping({"containerID": 0, "hostID": 0, "size": 1}),
    _user_namespace_mapping({"containerID": 0, "hostID": 0, "size": 1}, "gidMappings"),
    _user_namespace_mapping({"containerID": 1, "hostID": 1000, "size": 1}),
    _negative_oom_score,
    _no_new_privileges_false,
    _no_new_privileges_missing,
    *(_capability(kind) for kind in invariants.CAPABILITY_SETS),
    _root_writable,
    _keyring_writable,
    _keyring_ro_then_rw,
    _keyring_exec,
    _keyring_missing,
    _keyring_from_elsewhere,
    _keyring_hidden_by_tmpfs,
    _docker_socket,
    _var_run_docker_socket,
    _containerd_dir,
    _real_socket_file,
    _host_root,
    _dev_sda_mount,
    _dev_sda_device,
    _device_cgroup_allow_all,
    _block_device_fs,
    _machine_key_dir,
    _whole_state_dir,
    _other_sandbox_workspace,
    _symlink_to_state,
    _writable_host_etc,
    _workspace_elsewhere_writable,
    _tmpfs_without_size,
    _sys_writable,
    _host_proc,
    _hook("prestart"),
    _hook("createRuntime"),
    _hook("poststop"),
    _seccomp_missing,
    _seccomp_action("SCMP_ACT_ALLOW"),
    _seccomp_action("SCMP_ACT_LOG"),
    _seccomp_allows("mount"),
    _seccomp_allows("unshare"),
    _seccomp_allows("setns"),
    _seccomp_allows("ptrace"),
    _seccomp_allows("bpf"),
    _seccomp_allows("clone3"),
    _seccomp_allows("keyctl", "SCMP_ACT_LOG"),
    _seccomp_allows("clone"),
    _seccomp_clone_with_weak_mask,
    _seccomp_unsafe_personality,
    *(_without_namespace(kind) for kind in invariants.REQUIRED_NAMESPACES),
    _namespace_path("network", "/proc/1/ns/net"),
    _namespace_path("network", "/proc/self/ns/net"),
    _namespace_path("network", "/run/netns/../../proc/1/ns/net"),
    _namespace_path("pid", "/proc/1/ns/pid"),
    _masked_paths_trimmed,
    _readonly_paths_trimmed,
    _sysctl,
    _uid_mapped_to_host_root,
    *FORBIDDEN_BEYOND_THE_LISTED,
]


@pytest.mark.parametrize("mutate", FORBIDDEN, ids=lambda f: f.__name__.lstrip("_"))
def test_forbidden_config_is_refused_naming_the_layer(tmp_path, mutate):
    config = locked_down_config(tmp_path)
    field, provenance_field = mutate(config, tmp_path)
    with pytest.raises(InvariantViolation) as refused:
        check(config, tmp_path, {provenance_field: "evil", "process.args": "harness"})
    assert refused.value.field == field
    assert refused.value.layer == "evil"
    message = str(refused.value)
    assert message.startswith(f"layer 'evil' broke invariant: {field} ")
    assert "\n" not in message


def test_what_the_new_rules_still_allow(tmp_path):
    """The bundle's rootfs by a relative path, tappass's own annotation namespace, a
    positive oomScoreAdj, empty additionalGids, a root-mode user namespace mapping
    only the agent's own ids."""
    config = locked_down_config(tmp_path)
    config["root"]["path"] = "rootfs"
    config["annotations"] = {"org.tappass.sandbox": "probe"}
    config["process"]["oomScoreAdj"] = 500
    config["process"]["user"]["additionalGids"] = []
    config["linux"]["namespaces"].append({"type": "user"})
    config["linux"]["uidMappings"] = [{"containerID": AGENT_UID, "hostID": AGENT_UID, "size": 1}]
    config["linux"]["gidMappings"] = [{"containerID": AGENT_GID, "hostID": AGENT_GID, "size": 1}]
    check(config, tmp_path)


def test_what_the_owned_fields_and_the_spec_sweep_still_allow(tmp_path):
    """The resources and kernel layers' own fields (and the template's); rules a
    later layer adds to the seccomp profile that only refuse; fair scheduling; the
    LSM labels (they only confine); the spec's harmless fields."""
    config = locked_down_config(tmp_path)
    resources = config["linux"]["resources"]
    resources["memory"] = {"limit": 1 << 29, "swap": 1 << 29}
    config["process"]["rlimits"].append({"type": "RLIMIT_NPROC", "hard": 256, "soft": 256})
    syscalls = config["linux"]["seccomp"]["syscalls"]
    syscalls += [{"names": ["mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
                 {"names": ["kill"], "action": "SCMP_ACT_ERRNO"},
                 {"names": ["uname"], "action": "SCMP_ACT_KILL_PROCESS"}]
    process, linux = config["process"], config["linux"]
    process["scheduler"] = {"policy": "SCHED_IDLE", "nice": 19, "flags": ["SCHED_FLAG_RESET_ON_FORK"]}
    process["ioPriority"] = {"class": "IOPRIO_CLASS_IDLE", "priority": 7}
    process["execCPUAffinity"] = {"initial": "0", "final": "0-1"}
    process["apparmorProfile"] = "tappass-agent"
    process["selinuxLabel"] = "system_u:system_r:container_t:s0:c1,c2"
    process["terminal"] = False
    linux["rootfsPropagation"] = "rslave"
    linux["personality"] = {"domain": "LINUX32"}
    linux["mountLabel"] = "system_u:object_r:container_file_t:s0:c1,c2"
    linux["timeOffsets"] = {"monotonic": {"secs": 1}}
    linux["memoryPolicy"] = {"mode": "MPOL_PREFERRED", "nodes": "0"}
    config["domainname"] = "tappass.local"
    n = len(syscalls)
    check(config, tmp_path, {
        "process.args": "harness", "linux.resources.memory": "resources",
        "process.rlimits[1]": "resources", "linux.seccomp": "kernel",
        **{f"linux.seccomp.syscalls[{i}]": "evil" for i in range(n - 3, n)},
        **{f"process.{k}": "evil" for k in ("scheduler", "ioPriority", "execCPUAffinity",
                                            "apparmorProfile", "selinuxLabel", "terminal")},
        **{f"linux.{k}": "evil" for k in ("rootfsPropagation", "personality", "mountLabel",
                                          "timeOffsets", "memoryPolicy")},
        "domainname": "evil"})


def test_a_layer_before_the_owner_cannot_slip_a_field_under_it(tmp_path):
    """Order does not help: a layer run before the resources (kernel) layer whose
    fields that layer then merges into keeps its own under them, and is named."""
    from tappass_host.layers import LayerResult
    from tappass_host.layers.resources import linux_resources
    from tappass_host.oci.render import render

    profile = shipped.load_json(shipped.seccomp_profile())
    cases = [
        ({"linux": {"resources": {"memory": {"limit": 1 << 29, "swappiness": 100}}}},
         ("resources", {"linux": {"resources": linux_resources({})}}), "linux.resources.memory"),
        ({"linux": {"resources": {"unified": {"pids.max": "max"}}}},
         ("resources", {"linux": {"resources": linux_resources({})}}), "linux.resources.unified"),
        ({"linux": {"seccomp": {"flags": ["SECCOMP_FILTER_FLAG_SPEC_ALLOW"]}}},
         ("kernel", {"linux": {"seccomp": profile}}), "linux.seccomp"),
    ]
    for early, (owner, fragment), field in cases:
        rendered = render([("evil", LayerResult(oci=early)), (owner, LayerResult(oci=fragment))])
        config = locked_down_config(tmp_path)
        config["linux"]["resources"] = rendered.config["linux"]["resources"]
        config["linux"]["seccomp"] = rendered.config["linux"].get("seccomp", profile)
        with pytest.raises(InvariantViolation) as refused:
            check(config, tmp_path, rendered.provenance)
        assert (refused.value.field, refused.value.layer) == (field, "evil")


def test_a_layer_named_template_is_refused(tmp_path):
    """Its fields would pass for the template's own (the owned fields' rule trusts those)."""
    config = locked_down_config(tmp_path)
    config["linux"]["resources"]["pids"]["limit"] = 1 << 22
    with pytest.raises(InvariantViolation) as refused:
        check(config, tmp_path, {"linux.resources.pids.limit": "template"})
    assert refused.value.field == "linux.resources.pids.limit"
    assert "named 'template'" in str(refused.value)


def test_rootfs_prepare_never_makes_a_directory_outside_the_rootfs(tmp_path):
    """Behind the invariants, as root on the host: a destination with '..' or one
    through a symlink leading out of the rootfs is refused before any mkdir."""
    rootfs = tmp_path / "bundle" / "rootfs"
    outside = tmp_path / "outside"
    outside.mkdir()
    rootfs_module.prepare(rootfs, ["/workspace", "//opt/./agent/"])
    assert (rootfs / "workspace").is_dir() and (rootfs / "opt" / "agent").is_dir()
    (rootfs / "opt" / "out").symlink_to(outside)
    (rootfs / "rel").symlink_to("../../outside")
    for destination in ["/../../outside/made", "/opt/../../../outside/made",
                        "/opt/out/made", "/rel/made", "/rel", "relative/made"]:
        with pytest.raises(rootfs_module.MountPointOutsideRootfs):
            rootfs_module.prepare(rootfs, ["/tmp", destination])
    assert list(outside.iterdir()) == []
    assert not (rootfs / "tmp").exists()  # refused before any mount point was made
    rootfs_module.prepare(rootfs, ["/usr", "/bin/inside"])  # the merged-usr link stays inside
    assert (rootfs / "usr" / "bin" / "inside").is_dir()


def test_a_hostile_annotation_name_stays_on_one_line(tmp_path):
    config = locked_down_config(tmp_path)
    config["annotations"] = {"run.oci.x\n\x1b[2Jfake": "1"}
    with pytest.raises(InvariantViolation) as refused:
        check(config, tmp_path, {"annotations": "evil"})
    message = str(refused.value)
    assert "\n" not in message and "\x1b" not in message and refused.value.layer == "evil"


def test_a_field_no_layer_set_is_blamed_on_the_template(tmp_path):
    config = locked_down_config(tmp_path)
    config["process"]["user"]["uid"] = 0
    with pytest.raises(InvariantViolation) as refused:
        check(config, tmp_path, {"mounts": "filesystem"})
    assert refused.value.layer == "template"
    assert str(refused.value) == "layer 'template' broke invariant: process.user.uid must be set and not 0"


def test_invariant_violation_is_a_tappass_error(tmp_path):
    assert issubclass(InvariantViolation, TappassError)


def test_a_netns_created_under_run_netns_is_allowed(tmp_path):
    config = locked_down_config(tmp_path)
    _network_namespace_at(config, "/run/netns/tappass-probe")
    check(config, tmp_path)


def _network_namespace_at(config, path):
    i = next(i for i, ns in enumerate(config["linux"]["namespaces"]) if ns["type"] == "network")
    config["linux"]["namespaces"][i]["path"] = str(path)


def test_the_host_netns_bound_under_run_netns_is_refused(tmp_path, monkeypatch):
    # Stand-ins: a file under a fake netns dir that *is* the "host netns" by inode.
    netns_dir = tmp_path / "netns"
    netns_dir.mkdir()
    (netns_dir / "host").write_text("")
    monkeypatch.setattr(invariants, "NETNS_DIRS", (str(netns_dir),))
    monkeypatch.setattr(processes, "HOST_NETNS", (str(netns_dir / "host"),))
    config = locked_down_config(tmp_path)
    _network_namespace_at(config, netns_dir / "host")
    with pytest.raises(InvariantViolation, match="host network namespace"):
        check(config, tmp_path)


def test_a_netns_path_that_cannot_be_checked_is_refused(tmp_path, monkeypatch):
    netns_dir = tmp_path / "netns"
    netns_dir.mkdir()
    (netns_dir / "host").symlink_to("/proc/1/ns/net")
    monkeypatch.setattr(invariants, "NETNS_DIRS", (str(netns_dir),))
    config = locked_down_config(tmp_path)
    _network_namespace_at(config, netns_dir / "host")
    with pytest.raises(InvariantViolation, match="host network namespace"):
        check(config, tmp_path)


def test_read_only_extra_binds_and_sized_tmpfs_are_allowed(tmp_path):
    (tmp_path / "agent").mkdir()
    config = locked_down_config(tmp_path)
    add_mount(config, bind(tmp_path / "agent", "/opt/agent", "ro"))
    add_mount(config, {"destination": "/var/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["size=1m"]})
    config["hooks"] = {"prestart": []}
    check(config, tmp_path)


# --- schema ----------------------------------------------------------------------


def test_locked_down_config_passes_the_runtime_spec_schema(tmp_path):
    schema.validate(locked_down_config(tmp_path), schema.DEFAULT_SCHEMA_DIR)


def test_a_wrong_type_names_the_field_without_the_value(tmp_path):
    config = locked_down_config(tmp_path)
    config["process"]["user"]["uid"] = "hunter2-secret"
    with pytest.raises(schema.BundleSchemaError) as refused:
        schema.validate(config, schema.DEFAULT_SCHEMA_DIR)
    assert refused.value.field == "process.user.uid"
    assert "process.user.uid" in str(refused.value)
    assert "hunter2" not in str(refused.value)


def test_a_bad_enum_deep_in_a_referenced_file_is_found(tmp_path):
    config = locked_down_config(tmp_path)
    config["linux"]["seccomp"]["syscalls"][1]["args"][0]["op"] = "SCMP_CMP_SECRET"
    with pytest.raises(schema.BundleSchemaError) as refused:
        schema.validate(config, schema.DEFAULT_SCHEMA_DIR)
    assert refused.value.field == "linux.seccomp.syscalls[1].args[0].op"
    assert "SECRET" not in str(refused.value)


def test_a_missing_schema_dir_names_the_debian_package(tmp_path):
    with pytest.raises(TappassError, match="golang-github-opencontainers-specs-dev"):
        schema.validate({}, str(tmp_path / "nowhere"))


def test_an_empty_schema_dir_skips_the_check():
    schema.validate({"not": "a config"}, "")


def test_the_validator_is_built_once_per_process(tmp_path):
    config = locked_down_config(tmp_path)
    schema.validate(config, schema.DEFAULT_SCHEMA_DIR)
    before = schema._validator.cache_info()
    schema.validate(config, schema.DEFAULT_SCHEMA_DIR)
    after = schema._validator.cache_info()
    assert after.misses == before.misses and after.hits == before.hits + 1


# --- shipped files and the seccomp profiles -------------------------------------


def test_shipped_files_are_found():
    assert shipped.load_json(shipped.template())["ociVersion"] == "1.0.2"
    assert shipped.seccomp_profile("arm64").name == "agent-aarch64.json"
    assert shipped.seccomp_profile("x86_64").name == "agent-x86_64.json"
    with pytest.raises(TappassError, match="riscv64"):
        shipped.seccomp_profile("riscv64")


PROFILES = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}  # AUDIT_ARCH_* as libseccomp names them


def exists_on(arch: str, syscall: str) -> bool:
    libseccomp = ctypes.CDLL("libseccomp.so.2")
    libseccomp.seccomp_syscall_resolve_name_arch.argtypes = [ctypes.c_uint32, ctypes.c_char_p]
    return libseccomp.seccomp_syscall_resolve_name_arch(PROFILES[arch], syscall.encode()) >= 0


def allowed_syscalls(arch: str) -> set[str]:
    profile = shipped.load_json(shipped.seccomp_profile(arch))
    return {name for rule in profile["syscalls"] if rule["action"] == "SCMP_ACT_ALLOW" for name in rule["names"]}


@pytest.mark.parametrize("arch", PROFILES)
def test_each_profile_is_a_valid_deny_by_default_agent_profile(tmp_path, arch):
    config = locked_down_config(tmp_path)
    config["linux"]["seccomp"] = shipped.load_json(shipped.seccomp_profile(arch))
    schema.validate(config, schema.DEFAULT_SCHEMA_DIR)
    check(config, tmp_path)
    profile = config["linux"]["seccomp"]
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO" and profile["defaultErrnoRet"] == 1
    assert set(profile) <= {"defaultAction", "defaultErrnoRet", "architectures", "syscalls"}


@pytest.mark.parametrize("arch", PROFILES)
def test_every_profile_syscall_exists_on_its_architecture(arch):
    profile = shipped.load_json(shipped.seccomp_profile(arch))
    names = {name for rule in profile["syscalls"] for name in rule["names"]}
    assert sorted(n for n in names if not exists_on(arch, n)) == []
    if arch == "aarch64":
        assert not names & {"open", "stat", "lstat", "fork", "poll", "arch_prctl"}


def test_profiles_allow_the_same_calls_where_both_architectures_have_them():
    on_both = {n for n in allowed_syscalls("x86_64") if exists_on("aarch64", n)}
    assert on_both == allowed_syscalls("aarch64")


# --- real sandboxes ----------------------------------------------------------------


@pytest.fixture
def runtime_root():
    # Short path: runtimes put sockets and fifos under --root.
    root = tempfile.mkdtemp(prefix="tp-rt-", dir="/tmp")
    yield Path(root)
    shutil.rmtree(root, ignore_errors=True)


def run_sandbox(runtime: str, runtime_root: Path, tmp_path: Path, config: dict, *, checked: bool = True):
    if os.geteuid() != 0:
        pytest.fail("the real-sandbox tests run as root (rootless runs come with the runtime adapter)")
    binary = shutil.which(runtime)
    assert binary, f"{runtime} is not installed (apt-get install -y {runtime})"
    if checked:
        invariants.check(config, provenance={}, **invariant_args(tmp_path))
        schema.validate(config, schema.DEFAULT_SCHEMA_DIR)
    bundle = write_bundle(tmp_path, config)
    container = f"tappass-test-{uuid.uuid4().hex[:12]}"
    command = [binary, "--root", str(runtime_root), "run", "--bundle", str(bundle), container]
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=patience.seconds(120), stdin=subprocess.DEVNULL)
    finally:
        subprocess.run([binary, "--root", str(runtime_root), "delete", "--force", container], capture_output=True)


def probe_dir(tmp_path: Path, *scripts: Path) -> Path:
    directory = tmp_path / "probe"
    directory.mkdir(exist_ok=True)
    directory.chmod(0o755)
    for script in scripts:
        shutil.copy(script, directory / script.name)
    return directory


def probe_mount(directory: Path) -> dict:
    # No nosuid on purpose: the setuid-root python in there must be defeated by no_new_privs.
    return bind(directory, "/opt/probe", "ro")


def ran_ok(run: subprocess.CompletedProcess, runtime: str) -> str:
    assert run.returncode == 0, f"{runtime} run failed ({run.returncode}): {run.stderr.strip()[-2000:]}"
    return run.stdout


def escape_probe_config(tmp_path: Path) -> dict:
    directory = probe_dir(tmp_path, PROBES / "escape_probe.py")
    oci_fixture.copy_setuid_python(directory)
    return locked_down_config(
        tmp_path,
        args=["/usr/bin/python3", "/opt/probe/escape_probe.py", "--state-dir", str(layout(tmp_path).state_dir),
              "--suid-python", "/opt/probe/suid-python"],
        extra_mounts=[probe_mount(directory)],
    )


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_escape_probe_finds_no_way_out(runtime, runtime_root, tmp_path):
    config = escape_probe_config(tmp_path)
    report = json.loads(ran_ok(run_sandbox(runtime, runtime_root, tmp_path, config), runtime))
    details = json.dumps(report["details"], indent=1, sort_keys=True)

    assert (report["uid"], report["euid"], report["gid"]) == (AGENT_UID, AGENT_UID, AGENT_GID)
    assert 0 not in report["groups"]
    for capability_set in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(report[capability_set], 16) == 0, capability_set
    assert report["NoNewPrivs"] == "1"
    assert report["Seccomp"] == "2"
    assert report["hostname"] == "tappass"

    assert report["can_read_keyring"]
    assert not report["can_write_keyring"], details
    assert report["details"]["keyring"]["create"] == "EROFS"
    assert report["details"]["keyring"]["overwrite"] == "EROFS"
    assert not report["machine_key_visible"], details

    escapes = ("mount_ok", "unshare_user_ok", "unshare_mount_ok", "setns_ok", "ptrace_ok", "setuid_ok")
    assert {e: report[e] for e in escapes} == {e: False for e in escapes}, details
    assert report["setuid_binary_euid"] == str(AGENT_UID), details

    assert not report["rootfs_writable"], details
    read_only = ("/", "/usr", "/etc")
    assert {d: report["details"]["writes"][d] for d in read_only} == dict.fromkeys(read_only, "EROFS")
    assert report["writable_dirs"] == ["/tmp", "/workspace"], details

    assert not report["host_pids_visible"], details
    assert report["details"]["processes"]["my_pid"] == 1
    assert report["interfaces"] == ["lo"]
    assert report["details"]["network"]["if_nameindex"] == ["lo"]
    assert not report["network_reachable"]
    assert report["details"]["network"]["connect_public"] == "ENETUNREACH"

    expected = {name: "EPERM" for name in report["seccomp_denials"]} | {"clone3": "ENOSYS"}
    assert report["seccomp_denials"] == expected


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_escape_probe_notices_a_sandbox_without_seccomp_and_no_new_privs(runtime, runtime_root, tmp_path):
    """The probe is not vacuous: what the profile and no_new_privs stop, it sees getting through."""
    config = escape_probe_config(tmp_path)
    del config["linux"]["seccomp"]
    config["process"]["noNewPrivileges"] = False
    report = json.loads(ran_ok(run_sandbox(runtime, runtime_root, tmp_path, config, checked=False), runtime))
    assert (report["Seccomp"], report["NoNewPrivs"]) == ("0", "0")
    assert report["setuid_binary_euid"] == "0"
    assert report["unshare_user_ok"] and report["ptrace_ok"]
    getting_through = {name for name, outcome in report["seccomp_denials"].items() if outcome != "EPERM"}
    assert {"unshare", "ptrace", "keyctl", "setns", "clone", "clone3", "mount", "umount2", "io_uring_setup",
            "perf_event_open", "userfaultfd", "name_to_handle_at", "process_vm_readv", "personality"} <= getting_through


# PATIENCE: tests/patience.py's factor, for the workload's own deadline
PYTHON_WORKLOAD = f"PATIENCE = {patience.factor()}\n" + r'''
import asyncio, json, multiprocessing, os, socket, subprocess, sys, threading, ctypes, mmap, hashlib, tempfile
done = {}

def step(name):
    def wrap(f):
        f(); done[name] = "ok"
    return wrap

@step("threads")
def _():
    out = []
    ts = [threading.Thread(target=out.append, args=(i,)) for i in range(8)]
    [t.start() for t in ts]; [t.join() for t in ts]
    assert sorted(out) == list(range(8))

@step("subprocess")
def _():
    subprocess.run(["/bin/true"], check=True)
    assert subprocess.run(["/usr/bin/env"], capture_output=True, check=True).returncode == 0

@step("fork")
def _():
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 7

@step("tcp_loopback")
def _():
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname(), timeout=5 * PATIENCE)
    conn, _ = server.accept()
    client.sendall(b"ping"); assert conn.recv(4) == b"ping"
    for s in (client, conn, server): s.close()

@step("udp_and_unix")
def _():
    a, b = socket.socketpair(); a.send(b"x"); assert b.recv(1) == b"x"
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("127.0.0.1", 0))
    u.sendto(b"y", u.getsockname()); assert u.recv(1) == b"y"
    socket.getaddrinfo("localhost", 80)

@step("asyncio")
def _():
    async def main():
        async def echo(r, w):
            w.write(await r.read(5)); await w.drain(); w.close()
        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        r, w = await asyncio.open_connection(*server.sockets[0].getsockname())
        w.write(b"hello"); await w.drain()
        assert await r.read(5) == b"hello"
        w.close(); server.close()
    asyncio.run(main())

@step("multiprocessing")
def _():
    with multiprocessing.get_context("fork").Pool(2) as pool:
        assert pool.map(abs, [-1, -2]) == [1, 2]

@step("files")
def _():
    path = "/workspace/data.json"
    with open(path + ".tmp", "w") as f:
        json.dump({"a": 1}, f); f.flush(); os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        assert m[:1] == b"{"
    with tempfile.TemporaryDirectory() as d:
        os.symlink(path, d + "/link"); assert os.path.exists(d + "/link")
    hashlib.sha256(b"x").hexdigest()

@step("inotify_on_keyring")
def _():
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_CLOEXEC)
    assert fd >= 0, ctypes.get_errno()
    assert libc.inotify_add_watch(fd, b"/run/tappass/keyring", 0x100 | 0x80 | 0x2) >= 0, ctypes.get_errno()
    os.close(fd)

print(json.dumps(done))
'''

NODE_WORKLOAD = r'''
const fs = require("fs"), cp = require("child_process"), http = require("http"), os = require("os");
const crypto = require("crypto"), { Worker } = require("worker_threads");
const done = {};
fs.writeFileSync("/workspace/node.txt", "x"); done.files = "ok";
cp.execFileSync("/bin/true"); done.child_process = "ok";
crypto.randomBytes(16); crypto.createHash("sha256").update("x").digest("hex"); done.crypto = "ok";
os.networkInterfaces(); done.interfaces = "ok";
const watcher = fs.watch("/run/tappass/keyring"); watcher.close(); done.watch = "ok";
new Worker("require('worker_threads').parentPort.postMessage(42)", { eval: true }).on("message", (m) => {
  done.worker = m === 42 ? "ok" : "bad";
  const server = http.createServer((req, res) => res.end("pong")).listen(0, "127.0.0.1", () => {
    http.get({ host: "127.0.0.1", port: server.address().port }, (res) => {
      let body = ""; res.on("data", (c) => (body += c)); res.on("end", () => {
        done.http = body === "pong" ? "ok" : "bad";
        server.close(); console.log(JSON.stringify(done));
      });
    });
  });
});
'''


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_seccomp_profile_lets_a_normal_python_agent_work(runtime, runtime_root, tmp_path):
    (tmp_path / "workload.py").write_text(PYTHON_WORKLOAD)
    directory = probe_dir(tmp_path, tmp_path / "workload.py")
    config = locked_down_config(
        tmp_path, args=["/usr/bin/python3", "/opt/probe/workload.py"], extra_mounts=[probe_mount(directory)]
    )
    done = json.loads(ran_ok(run_sandbox(runtime, runtime_root, tmp_path, config), runtime))
    assert set(done) == {"threads", "subprocess", "fork", "tcp_loopback", "udp_and_unix", "asyncio",
                         "multiprocessing", "files", "inotify_on_keyring"}


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_seccomp_profile_lets_a_node_agent_work(runtime, runtime_root, tmp_path):
    node = shutil.which("node")
    assert node, "node is not installed (scripts/setup installs Debian's nodejs)"
    (tmp_path / "workload.js").write_text(NODE_WORKLOAD)
    directory = probe_dir(tmp_path, tmp_path / "workload.js")
    config = locked_down_config(
        tmp_path, args=[os.path.realpath(node), "/opt/probe/workload.js"], extra_mounts=[probe_mount(directory)]
    )
    done = json.loads(ran_ok(run_sandbox(runtime, runtime_root, tmp_path, config), runtime))
    assert done == dict.fromkeys(["files", "child_process", "crypto", "interfaces", "watch", "worker", "http"], "ok")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_denied_syscall_fails_with_eperm_not_a_kill(runtime, runtime_root, tmp_path):
    script = (
        "import ctypes, errno; libc = ctypes.CDLL(None, use_errno=True); "
        "print(libc.unshare(0x10000000), errno.errorcode[ctypes.get_errno()])"
    )
    config = locked_down_config(tmp_path, args=["/usr/bin/python3", "-c", script])
    assert ran_ok(run_sandbox(runtime, runtime_root, tmp_path, config), runtime).split() == ["-1", "EPERM"]


def _every_field(value, path=()):
    yield path
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        if path[-2:] == ("syscalls", 0) and key == "names":
            yield (*path, key)  # its 200-odd names are alike: one stands for all
            continue
        yield from _every_field(child, (*path, key))


def test_garbage_anywhere_is_refused_or_accepted_never_a_crash(tmp_path):
    config = locked_down_config(tmp_path)
    args = invariant_args(tmp_path)
    for path in list(_every_field(config))[1:]:
        for garbage in (None, 0, True, "x", [], {}, [["x"]], {"x": [{}]}):
            broken = copy.deepcopy(config)
            target = broken
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = garbage
            try:
                invariants.check(broken, provenance={}, **args)
            except InvariantViolation:
                pass
