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

TEST_HOOK_ENV = "TAPPASS_HOST_LANDLOCK_ABI"
SYS_CREATE_RULESET = 444  # x86_64 and aarch64 alike
CREATE_RULESET_VERSION = 1

PYTHON = "/usr/bin/python3"  # the sandbox rootfs's (host rootfs: the host's)
LAUNCHER_DIR = "/run/tappass/launcher"
LAUNCHER = f"{LAUNCHER_DIR}/landlock_exec.py"
AGENT_ENV = "/run/tappass/agent.env"
LAUNCH = [PYTHON, "-I", "-S", LAUNCHER, "--env", AGENT_ENV]
LAUNCHER_ENV = ("PATH=/usr/bin:/bin",)


def kernel_abi() -> int:
    """The kernel's Landlock ABI version; 0 when unsupported or disabled."""
    import ctypes

    syscall = ctypes.CDLL(None, use_errno=True).syscall
    syscall.restype = ctypes.c_long
    return max(syscall(SYS_CREATE_RULESET, None, ctypes.c_size_t(0),
                       ctypes.c_uint32(CREATE_RULESET_VERSION)), 0)


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


def launcher_source() -> Path:
    """The host directory bind-mounted read-only at LAUNCHER_DIR."""
    return Path(__file__).resolve().with_name("sandbox_launcher")


def command(rules: list[str], argv: list[str]) -> list[str]:
    return [*LAUNCH, *rules, "--", *argv]


def launch_prefix(args: list[str]) -> list[str]:
    """The launcher part of a process's args (up to `--`), or [] if it has none;
    `shell` puts it before its own command so it runs under the same ruleset."""
    if args[:len(LAUNCH)] != LAUNCH or "--" not in args:
        return []
    return args[:args.index("--") + 1]


def encode_env(env: list[str]) -> bytes:
    """AGENT_ENV's format (oci.bundle checked each entry): NAME=VALUE, NUL-ended."""
    return b"".join(entry.encode() + b"\0" for entry in env)
