"""The shipped systemd units (DESIGN §3, systemd/): rendered for this
installation and installed.

The units name `/usr/bin/tappass-host`; rendering points ExecStart at the
tappass-host this code was installed with (a venv, /usr/local, …), so an
installed unit always starts the same tappass-host that installed it.
"""

import os
import shutil
import sys
from pathlib import Path

from tappass_host import shipped, statefile
from tappass_host.errors import NotFound, TappassError

UNITS = ("tappass-host.service", "tappass-host@.service", "tappass-host-egress.service")
SHIPPED_EXECUTABLE = "/usr/bin/tappass-host"
DEFAULT_DIR = Path("/etc/systemd/system")


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
