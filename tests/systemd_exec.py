"""A unit's command as systemd would run it, where systemd is not PID 1:
the unit's capability bounding set and no_new_privs (setpriv), then, in a
small launcher, its UMask=, ProtectHostname= (a UTS namespace),
MemoryDenyWriteExecute= (the kernel's PR_SET_MDWE, which refuses what
systemd's seccomp rule refuses: writable+executable mappings and mappings
turning executable; before Linux 6.3, which has none, that seccomp rule) and its SystemCallFilter= with SystemCallErrorNumber=,
expanded from `systemd-analyze syscall-filter` (this systemd's own groups)
and loaded with libseccomp, together with the calls other directives refuse
by seccomp (ProtectHostname=: sethostname, which a runtime calls to name a
sandbox). All of it is inherited by whatever the command runs: runtimes,
conmon, agents. What needs systemd itself (mount namespaces, device
cgroups, address-family, namespace and argument filters) is not rebuilt here.
"""

import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

# Runs as `python -c LAUNCHER UMASK HOSTNAME MDWE ERRNO ALLOW|DENY SYSCALLS -- ARGV...`.
LAUNCHER = r'''
import ctypes, errno, os, sys
umask, own_uts, mdwe, error, mode, names = sys.argv[1:7]
argv = sys.argv[sys.argv.index("--") + 1:]
libc = ctypes.CDLL(None, use_errno=True)
if umask:
    os.umask(int(umask, 8))
if own_uts == "yes" and libc.unshare(0x04000000) != 0:       # CLONE_NEWUTS
    sys.exit(f"unshare(CLONE_NEWUTS): {os.strerror(ctypes.get_errno())}")
seccomp = ctypes.CDLL("libseccomp.so.2")
seccomp.seccomp_init.restype = ctypes.c_void_p
seccomp.seccomp_init.argtypes = [ctypes.c_uint32]
seccomp.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
seccomp.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                     ctypes.c_uint]
seccomp.seccomp_load.argtypes = [ctypes.c_void_p]
allow, refuse = 0x7FFF0000, 0x00050000 | getattr(errno, error or "EPERM")
if mdwe == "yes" and libc.prctl(65, 1, 0, 0, 0) != 0:        # PR_SET_MDWE, REFUSE_EXEC_GAIN
    if ctypes.get_errno() != errno.EINVAL:
        sys.exit(f"prctl(PR_SET_MDWE): {os.strerror(ctypes.get_errno())}")
    # A kernel before 6.3 has no PR_SET_MDWE: systemd's own rule, a filter of its
    # own: mmap W+X, mprotect/pkey_mprotect to X, shmat SHM_EXEC refused.
    class Cmp(ctypes.Structure):  # struct scmp_arg_cmp; op 7: SCMP_CMP_MASKED_EQ
        _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                    ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]
    seccomp.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                               ctypes.c_uint, ctypes.POINTER(Cmp)]
    wx = seccomp.seccomp_init(allow)
    for name, mask in (("mmap", 6), ("mmap2", 6), ("mprotect", 4), ("pkey_mprotect", 4),
                       ("shmat", 0o100000)):
        number = seccomp.seccomp_syscall_resolve_name(name.encode())
        if number >= 0:
            rc = seccomp.seccomp_rule_add_array(wx, refuse, number, 1,
                                                (Cmp * 1)(Cmp(2, 7, mask, mask)))
            if rc < 0:
                sys.exit(f"seccomp_rule_add_array({name}): {os.strerror(-rc)}")
    if seccomp.seccomp_load(wx) < 0:
        sys.exit("seccomp_load (MemoryDenyWriteExecute)")
if mode:
    ctx = seccomp.seccomp_init(refuse if mode == "ALLOW" else allow)
    for name in names.split(","):
        number = seccomp.seccomp_syscall_resolve_name(name.encode())
        if number >= 0:   # not a call of this architecture
            rc = seccomp.seccomp_rule_add(ctx, allow if mode == "ALLOW" else refuse, number, 0)
            if rc < 0:
                sys.exit(f"seccomp_rule_add({name}): {os.strerror(-rc)}")
    rc = seccomp.seccomp_load(ctx)
    if rc < 0:
        sys.exit(f"seccomp_load: {os.strerror(-rc)}")
os.execvp(argv[0], argv)
'''


def directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


def capabilities(unit: Path) -> str:
    """The unit's CapabilityBoundingSet= as setpriv's --bounding-set."""
    caps = directives(unit.read_text())["CapabilityBoundingSet"][0].split()
    return "-all," + ",".join("+" + c.removeprefix("CAP_").lower() for c in caps)


@cache
def syscall_groups() -> dict[str, list[str]]:
    """Each @group of this systemd, as `systemd-analyze syscall-filter` lists it."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing (scripts/setup installs the systemd package)"
    out = subprocess.run([analyze, "syscall-filter"], capture_output=True, text=True,
                         check=True).stdout
    groups: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif current is not None and line.strip() and not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


def expand(entries: list[str]) -> set[str]:
    calls: set[str] = set()
    for entry in entries:
        calls |= expand(syscall_groups()[entry]) if entry.startswith("@") else {entry}
    return calls


# Calls a directive refuses with a seccomp filter of its own (systemd's
# seccomp_protect_hostname, seccomp_protect_syslog, the @module and @clock
# filters of ProtectKernelModules= and ProtectClock=).
IMPLIED_DENIALS = {"ProtectHostname": ["sethostname", "setdomainname"],
                   "ProtectKernelLogs": ["syslog"], "ProtectKernelModules": ["@module"],
                   "ProtectClock": ["@clock"]}


def syscall_filter(unit: dict[str, list[str]]) -> tuple[str, set[str]]:
    """("ALLOW", calls) or ("DENY", calls) as systemd combines the unit's
    SystemCallFilter= lines (an allow list minus `~` lines, or a deny list)
    and the calls other directives refuse; ("", set()) without any."""
    allowed: set[str] | None = None
    denied = expand([call for directive, calls in IMPLIED_DENIALS.items()
                     if unit.get(directive) == ["yes"] for call in calls])
    for value in unit.get("SystemCallFilter", []):
        if value.startswith("~"):
            denied |= expand(value[1:].split())
        else:
            calls = expand(["@default", *value.split()])
            allowed = calls if allowed is None else allowed | calls
    if allowed is not None:
        return "ALLOW", allowed - denied
    return ("DENY", denied) if denied else ("", set())


def is_confined(pid: int) -> bool:
    """Does process `pid` run under a seccomp filter and no_new_privs (as a
    command run through exec_prefix does)?"""
    fields = dict(line.split(":\t", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)
    return fields.get("Seccomp") == "2" and fields.get("NoNewPrivs") == "1"


def exec_prefix(unit_file: Path, python: str = sys.executable) -> list[str]:
    """What to put before a command to run it as `unit_file` has systemd run it."""
    unit = directives(unit_file.read_text())
    mode, calls = syscall_filter(unit)
    prefix = ["setpriv", f"--bounding-set={capabilities(unit_file)}"]
    if unit.get("NoNewPrivileges") == ["yes"]:
        prefix.append("--no-new-privs")
    return [*prefix, python, "-c", LAUNCHER, unit.get("UMask", [""])[0],
            unit.get("ProtectHostname", ["no"])[0],
            unit.get("MemoryDenyWriteExecute", ["no"])[0],
            unit.get("SystemCallErrorNumber", [""])[0], mode, ",".join(sorted(calls)), "--"]
