"""Files that ship inside the package (DESIGN §3).

`oci/templates/`, `seccomp-profiles/` and `systemd/` live at the top of the
source tree; `tappass_host/data/` holds symlinks to them, which the wheel
build follows, so an installed tappass-host finds the same files here
without the source tree.
"""

import json
import os
from pathlib import Path

from tappass_host.errors import NotFound, TappassError

# The package's own directory: an installed tappass-host is files on disk
# (its Landlock launcher is bind-mounted from there), so importlib.resources,
# which imports zipfile and its readers, would buy nothing on every start.
PACKAGE = Path(__file__).parent

# os.uname().machine spellings -> the arch suffix of our profile files
_PROFILE_ARCH = {
    "x86_64": "x86_64",
    "amd64": "x86_64",
    "aarch64": "aarch64",
    "arm64": "aarch64",
}


def _data(*parts: str) -> Path:
    resource = PACKAGE.joinpath("data", *parts)
    if not resource.is_file():
        raise NotFound(f"shipped file data/{'/'.join(parts)} is missing from the tappass-host install")
    return resource


def template(name: str = "base.json") -> Path:
    return _data("oci-templates", name)


def seccomp_profile(machine: str | None = None) -> Path:
    machine = machine or os.uname().machine
    arch = _PROFILE_ARCH.get(machine.lower())
    if arch is None:
        raise TappassError(f"no agent seccomp profile for architecture {machine!r} (have x86_64, aarch64)")
    return _data("seccomp-profiles", f"agent-{arch}.json")


def systemd_unit(name: str) -> Path:
    return _data("systemd", name)


def load_json(resource: Path) -> dict:
    return json.loads(resource.read_text(encoding="utf-8"))
