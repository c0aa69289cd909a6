"""systemd on this host: the shipped units (DESIGN §3, systemd/), rendered
for this installation and installed, and the systemd cgroup driver.

The units name `/usr/bin/tappass-host`; rendering points ExecStart at the
tappass-host this code was installed with (a venv, /usr/local, …), so an
installed unit always starts the same tappass-host that installed it.

Where systemd is PID 1, it owns the cgroup tree: each sandbox's cgroup is
then a transient scope `tappass-<name>.scope` in `tappass.slice`, which the
runtime asks systemd for (its `--systemd-cgroup`, with linux.cgroupsPath
`tappass.slice:tappass:<name>`), so `systemd-cgls` and `systemctl status
tappass.slice` show the sandboxes, and restarting a unit never touches them.
Elsewhere (no systemd as PID 1; rootless) the runtime makes the cgroup
itself, as before. The driver is off for now (SYSTEMD_DRIVER).
"""

import os
import shutil
import sys
from pathlib import Path

from tappass_host import shipped, statefile
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
# Off until the cgroup v2 lane (scripts/test-vm driver) passes with it. Its last
# run: limits, live updates and OOM reports passed under crun and runc, and
# runc's scope was in tappass.slice; crun's was under root's user manager
# (sd-bus picks the bus by the caller's cgroup), which runtime_environ now
# corrects, not yet seen in the lane (issue 12).
SYSTEMD_DRIVER = False


def manages_cgroups() -> bool:
    """Whether sandboxes' cgroups are systemd's to create: the driver is on,
    systemd is PID 1 (sd_booted(3)), the runtimes can reach it on the system
    bus, and we are root in the host's user namespace."""
    return (SYSTEMD_DRIVER and os.path.isdir("/run/systemd/system") and SYSTEM_BUS.exists()
            and not is_rootless())


def cgroup_flags() -> list[str]:
    """The OCI runtime's global flags for where a sandbox's cgroup lives."""
    return ["--systemd-cgroup"] if manages_cgroups() else []


def runtime_environ() -> dict[str, str] | None:
    """The environment an OCI runtime runs in (None: ours, as is). Under the
    systemd driver the runtime asks systemd for the sandbox's scope over
    D-Bus, and sd-bus picks the bus by the caller's cgroup: from a login
    session, root's included, the user's own manager, where crun made the
    scope (under user@0.service, seen in the cgroup v2 lane); the system
    manager owns tappass.slice."""
    if not manages_cgroups():
        return None
    return {**os.environ, "DBUS_STARTER_BUS_TYPE": "system"}


def cgroups_path(name: str) -> str:
    """linux.cgroupsPath of sandbox `name` under the systemd driver: the
    scope tappass-<name>.scope in tappass.slice."""
    return f"{SLICE}:{SCOPE_PREFIX}:{name}"


def executable() -> str:
    """The tappass-host console script of this installation."""
    beside = Path(sys.executable).parent / "tappass-host"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
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
