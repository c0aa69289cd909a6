"""systemd on this host: the shipped units (DESIGN §3, systemd/), rendered
for this installation and installed, and the systemd cgroup driver.

The units name `/usr/bin/tappass-host`; rendering points ExecStart at the
tappass-host this code was installed with (a venv, /usr/local, …), so an
installed unit always starts the same tappass-host that installed it.

Where systemd is PID 1, it owns the cgroup tree: each sandbox's cgroup is
then a transient scope `tappass-<name>.scope` in the sandbox's own slice in
`tappass.slice`, which the runtime asks systemd for (its `--systemd-cgroup`,
with linux.cgroupsPath `tappass-<name>.slice:tappass:<name>`), so
`systemd-cgls` and `systemctl status tappass.slice` show the sandboxes, and
restarting a unit never touches them.
Rootless, the user's own systemd manager (user@UID.service, running while
the user is logged in or lingering) plays that part as it does for rootless
podman: where it runs, with its bus at $XDG_RUNTIME_DIR/bus, on cgroup v2
with the memory, pids and cpu controllers delegated to it, the scope is
`tappass-<name>.scope` in the user manager's `tappass.slice` (`systemctl
--user status tappass.slice`), and the limits are enforced. Without it, a
rootless sandbox runs degraded (tappass_host.layers.resources), and
`delegation_advice` says how to get one.
Elsewhere (no systemd as PID 1) the runtime makes the cgroup itself, as
before.
"""

import os
import stat
import sys
from pathlib import Path

from tappass_host import paths, shipped, statefile
from tappass_host.errors import NotFound, TappassError
from tappass_host.paths import is_rootless

UNITS = ("tappass-host.service", "tappass-host@.service", "tappass-host-egress.service")
SHIPPED_EXECUTABLE = "/usr/bin/tappass-host"
DEFAULT_DIR = Path("/etc/systemd/system")
# What ProtectHome=yes (tappass-host.service, tappass-host@.service) makes
# empty and inaccessible to the unit's processes.
PROTECTED_HOMES = (Path("/root"), Path("/home"), Path("/run/user"))
PROTECTED_HOME_UNITS = ("tappass-host.service", "tappass-host@.service")
SLICE = "tappass.slice"
SCOPE_PREFIX = "tappass"
SYSTEM_BUS = Path("/run/dbus/system_bus_socket")
# On since the cgroup v2 lane passed with it (scripts/test-vm driver): scopes in
# tappass.slice under crun and runc, limits, live updates, OOM reports (from
# the sandbox's slice: conmon missed every one there).
SYSTEMD_DRIVER = True


USER_DRIVER = True
DELEGATED_CONTROLLERS = frozenset({"cpu", "memory", "pids"})


def manages_cgroups() -> bool:
    """Whether sandboxes' cgroups are systemd's to create: systemd is PID 1
    (sd_booted(3)) and, as root in the host's user namespace, the system
    driver is on and the runtimes can reach it on the system bus; rootless,
    the user's own manager is there to ask (user_bus)."""
    if not os.path.isdir("/run/systemd/system"):
        return False
    if is_rootless():
        return USER_DRIVER and user_bus() is not None
    return SYSTEMD_DRIVER and SYSTEM_BUS.exists()


def user_bus() -> Path | None:
    """Rootless: the bus of the user's own systemd manager, where it can hold
    a sandbox's limits (cgroup v2, its cgroup has the controllers of
    DELEGATED_CONTROLLERS); None otherwise."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if not runtime or not os.path.isabs(runtime):
        return None
    bus = Path(runtime) / paths.USER_BUS
    try:
        if not stat.S_ISSOCK(bus.stat().st_mode):
            return None
    except OSError:
        return None
    return bus if DELEGATED_CONTROLLERS <= _delegated(host_uid()) else None


def _user_manager_cgroup(uid: int) -> Path:
    return Path(f"/sys/fs/cgroup/user.slice/user-{uid}.slice/user@{uid}.service")


def _delegated(uid: int) -> set[str]:
    """The controllers user `uid`'s manager has (none where it does not run)."""
    try:
        return set((_user_manager_cgroup(uid) / paths.CGROUP_CONTROLLERS).read_text().split())
    except OSError:
        return set()


def host_uid() -> int:
    """Our uid in the host's user namespace (rootless tappass-host works as uid
    0 in the user's own namespace: tappass_host.userns)."""
    try:
        with open("/proc/self/uid_map") as f:
            for line in f:
                inside, outside, _ = (int(field) for field in line.split())
                if inside == os.getuid():
                    return outside
    except (OSError, ValueError):
        pass
    return os.getuid()


def delegation_advice() -> str:
    """Rootless, where the runtime cannot apply cgroup limits: what would
    give the user a cgroup of its own ("" where nothing would)."""
    if not (os.path.exists("/sys/fs/cgroup/cgroup.controllers")
            and os.path.isdir("/run/systemd/system")):
        return ""  # cgroup v1 is never delegated to a user; without systemd, nothing delegates
    uid = host_uid()
    manager = _user_manager_cgroup(uid)
    if not manager.is_dir():
        import pwd

        try:
            user = pwd.getpwuid(uid).pw_name
        except KeyError:
            user = str(uid)
        return (f"the user's systemd manager is not running: `loginctl enable-linger {user}` "
                "(as root) keeps it running")
    missing = sorted(DELEGATED_CONTROLLERS - _delegated(uid))
    if missing:
        return (f"user@{uid}.service is not delegated the {', '.join(missing)} controller(s): "
                "as root, a drop-in for user@.service with [Service] Delegate=cpu memory pids, "
                "then systemctl daemon-reload")
    if not os.environ.get("XDG_RUNTIME_DIR"):
        return (f"XDG_RUNTIME_DIR is not set: export XDG_RUNTIME_DIR=/run/user/{uid} "
                "(a login session sets it)")
    return (f"the user's systemd manager has no bus at {os.environ['XDG_RUNTIME_DIR']}/bus "
            "(as root: apt-get install dbus-user-session)")


def cgroup_flags() -> list[str]:
    """The OCI runtime's global flags for where a sandbox's cgroup lives."""
    return ["--systemd-cgroup"] if manages_cgroups() else []


def runtime_environ() -> dict[str, str] | None:
    """The environment an OCI runtime runs in (None: ours, as is). Under the
    systemd driver the runtime asks systemd for the sandbox's scope over
    D-Bus. As root, the system manager's: crun 1.8 asks the user's bus first
    when it finds one ($DBUS_SESSION_BUS_ADDRESS, $XDG_RUNTIME_DIR/bus), and
    from root's login session it made the scope under user@0.service (seen in
    the cgroup v2 lane), so neither reaches it. Rootless, the user's
    manager's."""
    if not manages_cgroups():
        return None
    if is_rootless():
        # runc finds the user's uid behind our namespace with busctl --user.
        return {**os.environ, "DBUS_STARTER_BUS_TYPE": "user",
                "DBUS_SESSION_BUS_ADDRESS": f"unix:path={user_bus()}"}
    environ = {key: value for key, value in os.environ.items()
               if key not in ("DBUS_SESSION_BUS_ADDRESS", "XDG_RUNTIME_DIR")}
    return {**environ, "DBUS_STARTER_BUS_TYPE": "system"}


def cgroups_path(name: str) -> str:
    """linux.cgroupsPath of sandbox `name` under the systemd driver: the
    scope tappass-<name>.scope in the sandbox's own slice (sandbox_slice)."""
    return f"{sandbox_slice(name)}:{SCOPE_PREFIX}:{name}"


def sandbox_slice(name: str) -> str:
    """The slice of sandbox `name`'s scope, in tappass.slice (a dash in a
    slice's name means nesting: the name's own are escaped). systemd removes
    a scope, and its cgroup, as soon as its last process ends, before
    conmon can read the OOM kill from it (conmon#426, seen in the cgroup v2
    lane); the slice stays, and counts its scopes' OOM kills
    (tappass_host.runtime.attached.oom_counter)."""
    return f"{SCOPE_PREFIX}-{name.replace('-', chr(92) + 'x2d')}.slice"


def executable() -> str:
    """The tappass-host console script of this installation."""
    beside = Path(sys.executable).parent / "tappass-host"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    import shutil  # not at import: systemd.py is on every stop's path (issue 13)

    found = shutil.which("tappass-host")
    if found:
        return str(Path(found).resolve())
    raise NotFound("cannot find the tappass-host executable of this installation "
                   "(give one with --exec PATH)")


def _interpreter(script: Path) -> Path | None:
    """The program a `#!` line names (a console script's python), if any."""
    try:
        with open(script, "rb") as f:
            first = f.readline(4096)
    except OSError:
        return None
    if not first.startswith(b"#!") or not first[2:].split():
        return None
    return Path(first[2:].split()[0].decode(errors="replace"))


def hidden_by_protect_home(exec_path: str | None = None) -> list[Path]:
    """What the units would run from under /root, /home or /run/user, which
    their ProtectHome=yes hides: the executable, the python its `#!` line
    names (symlinks resolved, as exec resolves them) and, for this
    installation, the tappass_host package itself (an editable install)."""
    exec_path = exec_path or executable()
    used = [Path(exec_path), Path(os.path.realpath(exec_path))]
    interpreter = _interpreter(Path(exec_path))
    if interpreter is not None:
        used += [interpreter, Path(os.path.realpath(interpreter))]
    if exec_path == executable():
        used.append(Path(os.path.realpath(Path(__file__).parent)))
    hidden = []
    for path in used:
        if any(path.is_relative_to(home) for home in PROTECTED_HOMES) and path not in hidden:
            hidden.append(path)
    return hidden


def render(name: str, exec_path: str | None = None) -> str:
    if name not in UNITS:
        raise NotFound(f"no unit named {name!r} (have {', '.join(UNITS)})")
    text = shipped.systemd_unit(name).read_text(encoding="utf-8")
    exec_path = exec_path or executable()
    if not os.path.isabs(exec_path) or any(c.isspace() for c in exec_path):
        raise TappassError(f"the executable must be an absolute path without spaces: {exec_path!r}")
    return text.replace(f"ExecStart={SHIPPED_EXECUTABLE} ", f"ExecStart={exec_path} ")


def install(directory: Path = DEFAULT_DIR, exec_path: str | None = None) -> list[Path]:
    """Write every unit into `directory` (atomically, 0644); returns their paths."""
    rendered = {name: render(name, exec_path) for name in UNITS}  # all or nothing
    if not directory.is_dir():
        raise NotFound(f"{directory} is not a directory")
    written = []
    for name, text in rendered.items():
        statefile.write_atomic(directory / name, text.encode(), 0o644)
        written.append(directory / name)
    return written
