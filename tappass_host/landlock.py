"""Landlock, host side: which ABI this kernel offers, where the sandbox
launcher that applies the ruleset lives (tappass_host/sandbox_launcher/), and
how the agent's environment reaches the agent past it.

The runtime starts the launcher's python3 with process.env, and glibc acts on
some variables before any ruleset exists (GCONV_PATH + LOCPATH + LC_ALL load
a gconv module, LD_* the loader's libraries): code of the agent's would run
unconfined. So with the launcher, process.env is LAUNCHER_ENV, fixed, and
the environment the layers rendered goes to AGENT_ENV, a file in the
sandbox's read-only rootfs that the launcher reads as data and applies at its
final execve, after the ruleset (which does not allow reading it).

`TAPPASS_HOST_LANDLOCK_ABI` is a test hook: read only here, by the
tappass-host process on the host (never by anything inside a sandbox), it can
only *lower* the detected ABI, e.g. `=0` to see how a host without Landlock
behaves. With `kernel_layer = "required"` that still fails the start.
"""

import os
from pathlib import Path

from tappass_host import libc

TEST_HOOK_ENV = "TAPPASS_HOST_LANDLOCK_ABI"
SYS_CREATE_RULESET = 444  # x86_64 and aarch64 alike
CREATE_RULESET_VERSION = 1

PYTHON = "/usr/bin/python3"  # the sandbox rootfs's (host rootfs: the host's)
LAUNCHER_DIR = "/run/tappass/launcher"
LAUNCHER = f"{LAUNCHER_DIR}/landlock_exec.py"
AGENT_ENV = "/run/tappass/agent.env"
LAUNCH = [PYTHON, "-I", "-S", LAUNCHER, "--env", AGENT_ENV]
# An image's root need not hold a python3: there the kernel layer binds the
# host's /usr read-only at HOST_USR and runs the host's python3 through the
# host's dynamic loader (host_launch), whose libraries come from HOST_USR too.
# The ruleset does not list HOST_USR: after it, the agent cannot read it.
HOST_USR = "/run/tappass/hostusr"
# In an image, what the host's loader and python3 look for before the ruleset
# is the image's (hostile input): LC_ALL=C and TZ=: keep glibc from reading
# its locale and zone files, and host_launch's python3, not isolated (-I
# would ignore it), takes PYTHONHOME: else it looks for lib/python311.zip up
# from HOST_USR/bin, in the image's /run/tappass, /run and /, and imports
# from the first it finds. LAUNCH's -I ignores PYTHONHOME.
LAUNCHER_ENV = ("PATH=/usr/bin:/bin", "LC_ALL=C", "TZ=:", f"PYTHONHOME={HOST_USR}")


def kernel_abi() -> int:
    """The kernel's Landlock ABI version; 0 when unsupported or disabled."""
    import ctypes

    try:
        return libc.syscall(SYS_CREATE_RULESET, None, ctypes.c_size_t(0),
                            ctypes.c_uint32(CREATE_RULESET_VERSION))
    except OSError:  # ENOSYS, EOPNOTSUPP: none
        return 0


def host_abi() -> int:
    abi = kernel_abi()
    override = os.environ.get(TEST_HOOK_ENV, "").strip()
    if override.isdigit():
        abi = min(abi, int(override))
    return abi


def missing(abi: int) -> str | None:
    """Why Landlock cannot confine an agent on this host, or None if it can."""
    if abi < 1:
        return "the kernel offers no Landlock (ABI 0)"
    if not os.path.isfile(PYTHON):  # rootfs type host: the host's /usr
        return f"the sandbox rootfs has no {PYTHON} to run the Landlock launcher"
    return None


def host_launch() -> list[str] | None:
    """The launcher's argv prefix (like LAUNCH) for a root without python3:
    the host's python3 and its ELF interpreter, as seen under HOST_USR; None
    when they are not both under the host's /usr (nothing to bind then)."""
    python = os.path.realpath(PYTHON)
    try:
        with open(python, "rb") as f:
            interpreter = _elf_interpreter(f.read(64 * 1024))
    except OSError:
        return None
    loader = os.path.realpath(interpreter) if interpreter else ""
    if not (python.startswith("/usr/") and loader.startswith("/usr/")):
        return None

    def seen(path: str) -> str:
        return HOST_USR + path[len("/usr"):]

    # --inhibit-cache: the image's /etc/ld.so.cache. Its /etc/ld.so.preload,
    # which no loader option turns off, is masked by runtime.imageroot.
    return [seen(loader), "--inhibit-cache", "--library-path", seen(os.path.dirname(loader)),
            seen(python), "-s", "-S", LAUNCHER, "--env", AGENT_ENV]


def _elf_interpreter(head: bytes) -> str:
    """PT_INTERP of a little-endian ELF64 executable whose program headers
    lie in `head`, or ""."""
    import struct

    if head[:6] != b"\x7fELF\x02\x01":
        return ""
    phoff, = struct.unpack_from("<Q", head, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
    for i in range(phnum):
        at = phoff + i * phentsize
        if at + 0x28 > len(head):
            return ""
        kind, _, offset, _, _, size = struct.unpack_from("<IIQQQQ", head, at)
        if kind == 3:  # PT_INTERP
            return head[offset:offset + size].split(b"\0", 1)[0].decode(errors="replace")
    return ""


def launcher_source() -> Path:
    """The host directory bind-mounted read-only at LAUNCHER_DIR."""
    return Path(__file__).resolve().with_name("sandbox_launcher")


def command(rules: list[str], argv: list[str], launch: list[str] = LAUNCH) -> list[str]:
    return [*launch, *rules, "--", *argv]


def launches(args: list[str]) -> list[str] | None:
    """Which launch (LAUNCH or host_launch()) `args` starts with, if any."""
    if args[:len(LAUNCH)] == LAUNCH:
        return LAUNCH
    if args[:1] and args[0].startswith(HOST_USR + "/") and (host := host_launch()) \
            and args[:len(host)] == host:
        return host
    return None


def launch_prefix(args: list[str]) -> list[str]:
    """The launcher part of a process's args (up to `--`), or [] if it has none;
    `shell` puts it before its own command so it runs under the same ruleset."""
    if not launches(args) or "--" not in args:
        return []
    return args[:args.index("--") + 1]


def encode_env(env: list[str]) -> bytes:
    """AGENT_ENV's format (oci.bundle checked each entry): NAME=VALUE, NUL-ended."""
    return b"".join(entry.encode() + b"\0" for entry in env)
