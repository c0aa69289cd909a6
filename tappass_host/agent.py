"""Agent packages (DESIGN §8): a directory holding `tappass-agent.toml`, or
an installed distribution declaring an entry point in group `tappass.agents`
whose value names a module; the module's directory is the package.

The package directory is mounted read-only at /opt/agent.
"""

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from tappass_host.errors import TappassError

MANIFEST = "tappass-agent.toml"
RESTART_POLICIES = ("no", "on-failure", "always")
ROOTFS_TYPES = ("host",)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KEYS = {"name", "version", "entrypoint", "restart", "env", "rootfs"}


class BadAgent(TappassError):
    """The agent package or its manifest is unusable."""


@dataclass(frozen=True)
class AgentManifest:
    name: str
    version: str
    entrypoint: tuple[str, ...]
    directory: Path
    restart: str = "no"
    env: dict[str, str] = field(default_factory=dict)
    rootfs: str = "host"


def _locate(spec: str) -> Path:
    path = Path(spec)
    if path.is_dir():
        return path.resolve()
    if "/" in spec or spec.startswith("."):
        raise BadAgent(f"agent package {spec!r} is not a directory")
    from importlib.metadata import entry_points
    from importlib.util import find_spec

    for ep in entry_points(group="tappass.agents"):
        if ep.name == spec or (ep.dist and ep.dist.name == spec):
            module = find_spec(ep.module)
            if module and module.origin:
                return Path(module.origin).resolve().parent
    raise BadAgent(f"agent package {spec!r} is neither a directory nor an installed "
                   "distribution with a 'tappass.agents' entry point")


def load(spec: str) -> AgentManifest:
    directory = _locate(spec)
    manifest = directory / MANIFEST
    try:
        with open(manifest, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise BadAgent(f"agent package {directory} has no {MANIFEST}") from None
    except tomllib.TOMLDecodeError as exc:
        raise BadAgent(f"{manifest} is not valid TOML: {exc}") from None
    return _parse(doc, directory, manifest)


def _parse(doc: dict, directory: Path, where: Path) -> AgentManifest:
    if unknown := sorted(set(doc) - _KEYS):
        raise BadAgent(f"{where}: unknown key {unknown[0]!r}")
    for key in ("name", "version"):
        if not isinstance(doc.get(key), str) or not doc[key]:
            raise BadAgent(f"{where}: {key!r} is required and must be a string")
    entrypoint = doc.get("entrypoint")
    if (not isinstance(entrypoint, list) or not entrypoint
            or not all(isinstance(a, str) and a for a in entrypoint)):
        raise BadAgent(f"{where}: 'entrypoint' is required: a non-empty list of strings (argv)")
    restart = doc.get("restart", "no")
    if restart not in RESTART_POLICIES:
        raise BadAgent(f"{where}: 'restart' must be one of {', '.join(RESTART_POLICIES)}")
    env = doc.get("env", {})
    if not isinstance(env, dict) or not all(
            isinstance(v, str) and _ENV_NAME.fullmatch(k) for k, v in env.items()):
        raise BadAgent(f"{where}: [env] must map variable names to string values")
    table = doc.get("rootfs", {})
    rootfs = table.get("type", "host") if isinstance(table, dict) else None
    if rootfs not in ROOTFS_TYPES:
        raise BadAgent(f"{where}: [rootfs] type must be one of {', '.join(ROOTFS_TYPES)}")
    return AgentManifest(name=doc["name"], version=doc["version"], entrypoint=tuple(entrypoint),
                         directory=directory, restart=restart, env=dict(env), rootfs=rootfs)
