"""Runs inside the sandbox, as the agent, before the agent: puts this process
under a Landlock ruleset, then execs the agent's argv (which inherits it)
with the agent's environment.

    /usr/bin/python3 -I -S landlock_exec.py --env FILE CLASS=PATH... -- ARGV...

This process starts with a fixed environment of tappass-host's, never the
agent's: glibc acts on variables (GCONV_PATH, LOCPATH, LC_ALL, LD_*...) while
python3 starts, before any ruleset. The agent's environment is FILE (entries
`NAME=VALUE`, each ended by a NUL byte), read here as data and applied only
at the final execve, after the ruleset. CLASS is one of the access classes
below; the kernel layer writes the rules (tappass_host/layers/kernel.py).
Only rights the running kernel's ABI knows are handled (best-effort per ABI,
as the kernel's Landlock docs advise); a path the sandbox lacks is skipped.
Anything else that goes wrong fails closed: the agent never runs unconfined.
Self-contained on purpose (it runs on the sandbox's python3, not
tappass-host's) and limited to os, ctypes and struct, so it adds only a few
milliseconds to a start.
"""

import ctypes
import os
import stat
import struct
import sys

# Syscall numbers: the same on x86_64 and aarch64 (both use the unified table from 424 up).
CREATE_RULESET, ADD_RULE, RESTRICT_SELF = 444, 445, 446
CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH = 1
PR_SET_NO_NEW_PRIVS = 38

EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REFER, TRUNCATE, IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
ABI1_RIGHTS = (1 << 13) - 1          # execute .. make_sym
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV
EVERYTHING = (1 << 64) - 1           # masked down to what the ABI handles
ENV_LIMIT = 1 << 20                  # bytes of environment; Linux allows 2 MiB of argv + env

CLASSES = {
    "rx": READ_FILE | READ_DIR | EXECUTE,        # system and agent code
    "r": READ_FILE | READ_DIR,                   # config, keyring, read-only data
    "rw": EVERYTHING,                            # workspace, /tmp, /dev/shm
    "dev": READ_FILE | WRITE_FILE | TRUNCATE | IOCTL_DEV,   # /dev/null, terminals
    "rdev": READ_FILE,                           # /dev/urandom
}


class Refused(Exception):
    pass


def handled_rights(abi: int) -> int:
    rights = ABI1_RIGHTS
    if abi >= 2:
        rights |= REFER
    if abi >= 3:
        rights |= TRUNCATE
    if abi >= 5:
        rights |= IOCTL_DEV
    return rights


def parse(argv: list[str]) -> tuple[str, list[tuple[int, str]], list[str]]:
    if len(argv) < 2 or argv[0] != "--env" or "--" not in argv[2:]:
        raise Refused("usage: landlock_exec.py --env FILE CLASS=PATH... -- ARGV...")
    split = argv.index("--", 2)
    rules = []
    for spec in argv[2:split]:
        name, _, path = spec.partition("=")
        if name not in CLASSES or not path.startswith("/"):
            raise Refused(f"bad rule {spec!r}")
        rules.append((CLASSES[name], path))
    if split + 1 == len(argv):
        raise Refused("no command to run")
    return argv[1], rules, argv[split + 1:]


def read_env(path: str) -> dict[bytes, bytes]:
    """The agent's environment, as data: nothing here interprets a value."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            data = os.read(fd, ENV_LIMIT + 1)
        finally:
            os.close(fd)
    except OSError as error:
        raise Refused(f"cannot read the agent's environment {path}: {error.strerror}") from None
    if len(data) > ENV_LIMIT or data[-1:] not in (b"", b"\0"):
        raise Refused(f"the agent's environment {path} is malformed")
    env = {}
    for entry in data.split(b"\0")[:-1]:
        name, equals, value = entry.partition(b"=")
        if not equals or not name:
            raise Refused(f"the agent's environment {path} is malformed")
        env[name] = value
    return env


class Kernel:
    def __init__(self):
        libc = ctypes.CDLL(None, use_errno=True)
        self._syscall = libc.syscall
        self._syscall.restype = ctypes.c_long
        self._prctl = libc.prctl

    def call(self, what: str, number: int, *args) -> int:
        result = self._syscall(number, *args)
        if result < 0:
            raise Refused(f"{what}: {os.strerror(ctypes.get_errno())}")
        return result

    def abi(self) -> int:
        result = self._syscall(CREATE_RULESET, None, ctypes.c_size_t(0),
                               ctypes.c_uint32(CREATE_RULESET_VERSION))
        return max(result, 0)

    def no_new_privs(self) -> None:
        self._prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # the runtime set it already; harmless


def restrict(kernel: Kernel, rules: list[tuple[int, str]]) -> None:
    abi = kernel.abi()
    if abi < 1:
        raise Refused("the kernel offers no Landlock (disabled or unsupported)")
    handled = handled_rights(abi)
    attr = struct.pack("=Q", handled)  # handled_access_fs only: accepted by every ABI
    ruleset = kernel.call("landlock_create_ruleset", CREATE_RULESET, attr,
                          ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    for rights, path in rules:
        add_rule(kernel, ruleset, rights & handled, path)
    kernel.no_new_privs()
    kernel.call("landlock_restrict_self", RESTRICT_SELF, ruleset, ctypes.c_uint32(0))
    os.close(ruleset)


def add_rule(kernel: Kernel, ruleset: int, rights: int, path: str) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # not in this sandbox: nothing to allow
    except OSError as error:
        raise Refused(f"{path}: {error.strerror}") from None
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            rights &= FILE_RIGHTS
        attr = struct.pack("=Qi", rights, fd)  # struct landlock_path_beneath_attr (packed)
        kernel.call(f"landlock_add_rule {path}", ADD_RULE, ruleset, RULE_PATH_BENEATH, attr,
                    ctypes.c_uint32(0))
    finally:
        os.close(fd)


def main(argv: list[str]) -> None:
    try:
        env_file, rules, command = parse(argv)
        env = read_env(env_file)  # before the ruleset, which does not allow it
        restrict(Kernel(), rules)
    except Refused as refusal:
        sys.stderr.write(f"tappass landlock: {refusal}; the agent is not started\n")
        os._exit(126)
    try:
        execvpe(command, env)
    except OSError as error:
        sys.stderr.write(f"tappass landlock: cannot run {command[0]}: {error.strerror}\n")
        os._exit(127 if isinstance(error, FileNotFoundError) else 126)


def execvpe(command: list[str], env: dict[bytes, bytes]) -> None:
    """os.execvpe's search of the agent's PATH, without os.execvpe: it imports
    `warnings`, and after the ruleset this python may read no module (in an
    image it is the host's, under HOST_USR, which the ruleset leaves out)."""
    program = os.fsencode(command[0])
    if b"/" in program:
        os.execve(program, command, env)
    first = last = None
    for directory in env.get(b"PATH", b"/bin:/usr/bin").split(b":"):
        try:
            os.execve(directory + b"/" + program if directory else program, command, env)
        except (FileNotFoundError, NotADirectoryError) as error:
            last = error
        except OSError as error:
            last = error
            first = first or error
    raise first or last


if __name__ == "__main__":
    main(sys.argv[1:])
