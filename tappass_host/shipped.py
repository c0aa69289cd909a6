"""Files that ship inside the package (DESIGN §3).

`oci/templates/`, `seccomp-profiles/` and `systemd/` live at the top of the
source tree; `tappass_host/data/` holds symlinks to them, which the wheel
build follows, so an installed tappass-host finds the same files here
without the source tree.
"""

import json
import platform
from importlib.resources import files
from importlib.resources.abc import Traversable

from tappass_host.errors import NotFound, TappassError

# platform.machine() spellings -> the arch suffix of our profile files
_PROFILE_ARCH = {
    "x86_64": "x86_64",
    "amd64": "x86_64",
    "aarch64": "aarch64",
    "arm64": "aarch64",
}


def _data(*parts: str) -> Traversable:
    resource = files("tappass_host").joinpath("data", *parts)
    if not resource.is_file():
        raise NotFound(f"shipped file data/{'/'.join(parts)} is missing from the tappass-host install")
    return resource


def template(name: str = "base.json") -> Traversable:
    return _data("oci-templates", name)


def seccomp_profile(machine: str | None = None) -> Traversable:
    machine = machine or platform.machine()
    arch = _PROFILE_ARCH.get(machine.lower())
    if arch is None:
        raise TappassError(f"no agent seccomp profile for architecture {machine!r} (have x86_64, aarch64)")
    return _data("seccomp-profiles", f"agent-{arch}.json")


def systemd_unit(name: str) -> Traversable:
    return _data("systemd", name)


def load_json(resource: Traversable) -> dict:
    return json.loads(resource.read_text(encoding="utf-8"))
