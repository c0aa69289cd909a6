"""Layer appliers (DESIGN §8).

An applier is a pure, deterministic function `apply(inputs) -> LayerResult`
of the sandbox record, the verified keyring, the agent manifest and the
host's capabilities. It returns an OCI fragment (merged over the template by
`tappass_host.oci.render`, then held to `tappass_host.oci.invariants`), files
to render into the keyring's version directory (`tappass_host.layers.files`:
under `layers/<layer>/`, the harness layer's under `harness/`), the keyring
aspects it can apply live, and warnings. Appliers run
in the order config `appliers` gives; built-ins live beside this module,
third-party ones register under the entry-point group `tappass_host.appliers`.
"""

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tappass_host.errors import TappassError

ENTRY_POINT_GROUP = "tappass_host.appliers"
BUILTIN = ("identity", "filesystem", "keyring", "kernel", "network", "resources", "harness",
           "gateway")


class UnknownApplier(TappassError):
    pass


class LayerUnavailable(TappassError):
    """A layer needs a kernel feature this host lacks."""


@dataclass(frozen=True)
class Host:
    """What the host offers the sandbox: ids, mode, features."""

    rootless: bool
    agent_uid: int          # the uid the agent runs as inside the sandbox
    agent_gid: int
    uid_mappings: tuple[dict, ...] = ()   # rootless: OCI linux.uidMappings
    gid_mappings: tuple[dict, ...] = ()
    machine: str = "x86_64"
    landlock_abi: int = 0
    cgroups: bool = True    # the runtime can apply linux.resources (rootless: often not)
    cgroups_advice: str = ""  # without them: what would give the user a cgroup of its own
    runtime: str = "crun"   # the OCI runtime that will run the config
    egress_proxy: str = ""  # network mode proxy: the URL of this sandbox's proxy (set by start)


@dataclass(frozen=True)
class LayerInputs:
    name: str
    record: object          # tappass_host.sandbox_record.SandboxRecord
    keyring: dict           # the verified keyring payload
    manifest: object        # tappass_host.agent.AgentManifest
    host: Host
    keyring_dir: Path
    workspace_dir: Path
    rootfs_dir: Path
    config: object          # tappass_host.config.Config


@dataclass(frozen=True)
class LayerResult:
    oci: dict = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    hot_reload: frozenset[str] = frozenset()   # keyring aspects applied live
    restart: frozenset[str] = frozenset()      # aspects whose change needs a restart
    warnings: tuple[str, ...] = ()
    unavailable: tuple[str, ...] = ()         # kernel features missing (best-effort)


Applier = Callable[[LayerInputs], LayerResult]


def load(name: str) -> Applier:
    if name in BUILTIN:
        return importlib.import_module(f"tappass_host.layers.{name}").apply
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return ep.load()
    raise UnknownApplier(f"unknown applier {name!r} in config 'appliers' (built-ins: "
                         f"{', '.join(BUILTIN)}; others register under '{ENTRY_POINT_GROUP}')")


def run(inputs: LayerInputs, names: list[str]) -> list[tuple[str, LayerResult]]:
    return [(name, load(name)(inputs)) for name in names]
