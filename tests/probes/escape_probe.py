"""Escape probe: run inside a sandbox as the agent, try each way out, print one JSON object.

Standard library only: it runs with the host's /usr/bin/python3 bind-mounted
into the sandbox. Every attempt reports what happened ("ok" or the errno
name); the test decides what counts as an escape. Raw syscalls use arguments
that fail with a *different* errno than EPERM when seccomp lets them through
(EFAULT, EINVAL, EBADF, ...), so an "EPERM" here is the profile's doing.
Nothing here sends a packet: UDP connect() only looks up a route. It refuses
to run as root: as real root on the host the attempts would succeed.

usage: escape_probe.py --state-dir HOST_STATE_DIR [--suid-python PATH]
"""

import argparse
import ctypes
import errno
import json
import os
import platform
import socket
import subprocess
import sys

SYSCALLS = {  # name -> (x86_64, aarch64)
    "ptrace": (101, 117),
    "mount": (165, 40),
    "umount2": (166, 39),
    "pivot_root": (155, 41),
    "chroot": (161, 51),
    "unshare": (272, 97),
    "setns": (308, 268),
    "clone": (56, 220),
    "clone3": (435, 435),
    "bpf": (321, 280),
    "keyctl": (250, 219),
    "add_key": (248, 217),
    "userfaultfd": (323, 282),
    "io_uring_setup": (425, 425),
    "perf_event_open": (298, 241),
    "personality": (135, 92),
    "name_to_handle_at": (303, 264),
    "process_vm_readv": (310, 270),
    "kexec_load": (246, 104),
    "init_module": (175, 105),
}
WRITE_CANDIDATES = (
    "/workspace", "/tmp", "/", "/usr", "/etc", "/opt/agent", "/run", "/run/tappass/keyring", "/var/tmp", "/dev",
)
CLONE_FS = 0x200
CLONE_NEWNS = 0x20000
CLONE_NEWUSER = 0x10000000
MS_NOUSER = 1 << 31
ADDR_NO_RANDOMIZE = 0x40000
AT_FDCWD = -100
AF_VSOCK = 40

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
ARCH = 0 if platform.machine() == "x86_64" else 1


def errname(code: int) -> str:
    return errno.errorcode.get(code, str(code))


def syscall(name: str, *args) -> str:
    ctypes.set_errno(0)
    argv = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    result = libc.syscall(ctypes.c_long(SYSCALLS[name][ARCH]), *argv)
    return "ok" if result >= 0 else errname(ctypes.get_errno())


def in_child(attempt) -> str:
    """Run attempt() in a forked child so that a success changes nothing here."""
    pid = os.fork()
    if pid == 0:
        try:
            outcome = attempt()
        except BaseException:
            outcome = "error"
        codes = {"ok": 0, "error": 254}
        os._exit(codes.get(outcome, getattr(errno, outcome, 253)))
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return {0: "ok", 254: "error", 253: "unknown"}.get(code, errname(code) if code > 0 else f"signal {-code}")


def proc_status() -> dict:
    wanted = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp")
    status = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in wanted:
                status[key] = value.strip()
    return status


def try_create(directory: str) -> str:
    path = os.path.join(directory, f".escape-probe-{os.getpid()}")
    try:
        with open(path, "x") as f:
            f.write("x")
    except OSError as exc:
        return errname(exc.errno)
    os.unlink(path)
    return "ok"


def try_overwrite(path: str) -> str:
    try:
        with open(path, "r+") as f:
            f.write("{}")
    except OSError as exc:
        return errname(exc.errno)
    return "ok"


def keyring() -> dict:
    base = "/run/tappass/keyring"
    try:
        with open(os.path.join(base, "keyring.json")) as f:
            readable = bool(f.read())
    except OSError:
        readable = False
    return {
        "can_read": readable,
        "create": try_create(base),
        "overwrite": try_overwrite(os.path.join(base, "keyring.json")),
    }


def machine_key(state_dir: str) -> dict:
    candidates = [state_dir, os.path.join(state_dir, "machine", "key.pem"), "/var/lib/tappass-host"]
    found = []
    skip = {"/proc", "/sys", "/dev", "/usr"}
    for root, dirs, files in os.walk("/", onerror=lambda e: None):
        dirs[:] = [d for d in dirs if os.path.join(root, d) not in skip]
        if os.path.basename(root) == "machine" and "key.pem" in files:
            found.append(os.path.join(root, "key.pem"))
    return {"exists": {p: os.path.exists(p) for p in candidates}, "found": found}


def escalation() -> dict:
    def mount_tmpfs():
        return syscall("mount", b"tmpfs", b"/tmp", b"tmpfs", 0, b"size=1m")

    def traceme_and_attach():
        traceme = syscall("ptrace", 0, 0, 0, 0)  # PTRACE_TRACEME
        attach = syscall("ptrace", 0x4206, os.getppid(), 0, 0)  # PTRACE_SEIZE the probe: no stop
        return traceme if traceme != "ok" else attach

    def setuid_root():
        try:
            os.setuid(0)
        except OSError as exc:
            return errname(exc.errno)
        return "ok"

    return {
        "mount_tmpfs": in_child(mount_tmpfs),
        "unshare_user": in_child(lambda: syscall("unshare", CLONE_NEWUSER)),
        "unshare_mount": in_child(lambda: syscall("unshare", CLONE_NEWNS)),
        "ptrace": in_child(traceme_and_attach),
        "setuid_root": in_child(setuid_root),
    }


def seccomp_denials() -> dict:
    """Each call errs with something other than EPERM when the filter lets it through."""
    null = None
    return {
        "mount": syscall("mount", b"none", b"/tmp", b"tmpfs", MS_NOUSER, null),
        "umount2": syscall("umount2", b"/", 0xFF00),
        "unshare": in_child(lambda: syscall("unshare", CLONE_NEWUSER)),
        "setns": syscall("setns", -1, 0),
        "clone": syscall("clone", CLONE_NEWUSER | CLONE_FS, 0, 0, 0, 0),
        "clone3": syscall("clone3", null, 0),
        "ptrace": in_child(lambda: syscall("ptrace", 0, 0, 0, 0)),
        "bpf": syscall("bpf", 0, null, 0),
        "keyctl": syscall("keyctl", 0, -3, 0),
        "add_key": syscall("add_key", null, null, null, 0, -3),
        "userfaultfd": syscall("userfaultfd", 1 | 2),
        "io_uring_setup": syscall("io_uring_setup", 1, null),
        "perf_event_open": syscall("perf_event_open", null, 0, -1, -1, 0),
        "personality": in_child(lambda: syscall("personality", ADDR_NO_RANDOMIZE)),
        "name_to_handle_at": syscall("name_to_handle_at", AT_FDCWD, b"/", null, null, 0),
        "process_vm_readv": syscall("process_vm_readv", os.getpid(), null, 0, null, 0, 0),
        "pivot_root": syscall("pivot_root", b"/", b"/"),
        "chroot": syscall("chroot", b"/"),
        "kexec_load": syscall("kexec_load", 0, 0, null, 0),
        "init_module": syscall("init_module", null, 0, b""),
        "socket_vsock": try_socket(AF_VSOCK, socket.SOCK_STREAM),
    }


def try_socket(family: int, kind: int) -> str:
    try:
        socket.socket(family, kind).close()
    except OSError as exc:
        return errname(exc.errno)
    return "ok"


def setuid_binary(path: str | None) -> dict:
    if not path:
        return {}
    env = {"PYTHONHOME": "/usr", "PATH": "/usr/bin"}
    run = subprocess.run(
        [path, "-c", "import os; print(os.geteuid())"], capture_output=True, text=True, env=env, timeout=30
    )
    return {"returncode": run.returncode, "euid": run.stdout.strip(), "stderr": run.stderr[-200:]}


def processes() -> dict:
    pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    try:
        with open("/proc/1/cmdline", "rb") as f:
            pid1 = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError as exc:
        pid1 = errname(exc.errno)
    return {"my_pid": os.getpid(), "pids": pids[:50], "pid_count": len(pids), "pid1_cmdline": pid1}


def network() -> dict:
    def udp_connect(host: str, port: int) -> str:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.connect((host, port))
        except OSError as exc:
            return errname(exc.errno)
        finally:
            s.close()
        return "ok"

    try:
        sysfs = sorted(os.listdir("/sys/class/net"))
    except OSError as exc:
        sysfs = [errname(exc.errno)]
    return {
        "interfaces": sysfs,
        "if_nameindex": sorted(name for _, name in socket.if_nameindex()),
        "connect_public": udp_connect("1.1.1.1", 53),
        "connect_link_local": udp_connect("169.254.0.1", 9),
    }


def setns_own_netns() -> str:
    fd = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        return syscall("setns", fd, 0)
    finally:
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--suid-python")
    args = parser.parse_args()
    if os.geteuid() == 0 or os.getuid() == 0:
        # As real root these attempts would succeed and change the host (a tmpfs over /tmp...).
        print(json.dumps({"refused": "the escape probe never runs as root", "uid": os.getuid(), "euid": os.geteuid()}))
        sys.exit(3)

    status = proc_status()
    ring = keyring()
    key = machine_key(args.state_dir)
    escapes = escalation()
    escapes["setns"] = in_child(setns_own_netns)
    suid = setuid_binary(args.suid_python)
    writes = {d: try_create(d) for d in WRITE_CANDIDATES if os.path.isdir(d)}
    procs = processes()
    net = network()
    report = {
        "uid": os.getuid(),
        "euid": os.geteuid(),
        "gid": os.getgid(),
        "groups": os.getgroups(),
        **status,
        "hostname": socket.gethostname(),
        "can_read_keyring": ring["can_read"],
        "can_write_keyring": "ok" in (ring["create"], ring["overwrite"]),
        "machine_key_visible": any(key["exists"].values()) or bool(key["found"]),
        "mount_ok": escapes["mount_tmpfs"] == "ok",
        "unshare_user_ok": escapes["unshare_user"] == "ok",
        "unshare_mount_ok": escapes["unshare_mount"] == "ok",
        "setns_ok": escapes["setns"] == "ok",
        "ptrace_ok": escapes["ptrace"] == "ok",
        "setuid_ok": escapes["setuid_root"] == "ok",
        "setuid_binary_euid": suid.get("euid"),
        "rootfs_writable": any(writes.get(d) == "ok" for d in ("/", "/usr", "/etc")),
        "writable_dirs": sorted(d for d, outcome in writes.items() if outcome == "ok"),
        "host_pids_visible": procs["pid_count"] > 3 or "escape_probe" not in procs["pid1_cmdline"],
        "interfaces": net["interfaces"],
        "network_reachable": "ok" in (net["connect_public"], net["connect_link_local"]),
        "seccomp_denials": seccomp_denials(),
        "details": {
            "keyring": ring,
            "machine_key": key,
            "escalation": escapes,
            "setuid_binary": suid,
            "writes": writes,
            "processes": procs,
            "network": net,
        },
    }
    json.dump(report, sys.stdout, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
