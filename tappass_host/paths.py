"""Where tappass-host keeps its files (DESIGN §4).

Root mode uses /etc, /var/lib and /run; rootless mode (anyone but root of
the initial user namespace: root inside `unshare --map-root-user` or `podman
unshare` is the user) uses the XDG directories of the invoking user.
`--state-dir` / TAPPASS_HOST_STATE_DIR override the state root. Nothing here
touches the disk.
"""

import os
import re
from dataclasses import dataclass
from pathlib import Path

from tappass_host.errors import InvalidName

SANDBOX_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")


def check_sandbox_name(name: str) -> str:
    if not isinstance(name, str) or not SANDBOX_NAME.fullmatch(name):
        raise InvalidName(
            f"invalid sandbox name {name!r}: use 1-63 characters of a-z 0-9 _ . -, "
            "starting with a letter or digit"
        )
    return name


def is_rootless() -> bool:
    """True unless we are uid 0 in the initial user namespace (crun's test)."""
    if os.geteuid() != 0:
        return True
    try:
        with open("/proc/self/uid_map") as f:
            fields = f.readline().split()
    except OSError:
        return False
    return fields[:3] != ["0", "0", "4294967295"]


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value else Path.home() / fallback


def default_config_file() -> Path:
    if not is_rootless():
        return Path("/etc/tappass-host/config.toml")
    return _xdg("XDG_CONFIG_HOME", ".config") / "tappass-host" / "config.toml"


def _default_state_dir() -> Path:
    if not is_rootless():
        return Path("/var/lib/tappass-host")
    return _xdg("XDG_STATE_HOME", ".local/state") / "tappass-host"


def _default_runtime_dir(state: Path, state_overridden: bool) -> Path:
    if state_overridden:
        # Tests and CI give a private state dir; keep runtime state beside it
        # so that parallel runs never share a runtime root.
        return state / "run"
    if not is_rootless():
        return Path("/run/tappass-host")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return Path(xdg) / "tappass-host" if xdg else state / "run"


@dataclass(frozen=True)
class SandboxPaths:
    root: Path
    runtime: Path

    @property
    def record(self) -> Path:
        return self.root / "sandbox.json"

    @property
    def identity(self) -> Path:
        return self.root / "identity"

    @property
    def cert(self) -> Path:
        return self.identity / "cert.pem"

    @property
    def ca(self) -> Path:
        return self.identity / "ca.pem"

    @property
    def keyring(self) -> Path:
        return self.root / "keyring"

    @property
    def keyring_lock(self) -> Path:
        # Outside keyring/: the agent sees that directory and must not see this.
        return self.root / "keyring.lock"

    @property
    def workspace(self) -> Path:
        return self.root / "workspace"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def agent_log(self) -> Path:
        return self.logs / "agent.log"

    @property
    def exit_record(self) -> Path:
        return self.root / "exit.json"

    @property
    def bundle(self) -> Path:
        return self.runtime / "bundle"


@dataclass(frozen=True)
class HostPaths:
    state: Path
    runtime: Path

    @classmethod
    def resolve(cls, state_dir: str | os.PathLike | None = None) -> "HostPaths":
        state_dir = state_dir or os.environ.get("TAPPASS_HOST_STATE_DIR")
        state = Path(state_dir).absolute() if state_dir else _default_state_dir()
        return cls(state=state, runtime=_default_runtime_dir(state, bool(state_dir)))

    @property
    def machine_key(self) -> Path:
        return self.state / "machine" / "key.pem"

    @property
    def trust(self) -> Path:
        return self.state / "trust"

    @property
    def consumed_bootstraps(self) -> Path:
        return self.state / "consumed-bootstraps"

    @property
    def audit_log(self) -> Path:
        return self.state / "audit" / "audit.jsonl"

    @property
    def audit_key(self) -> Path:
        return self.state / "audit" / "audit-key.pem"

    @property
    def sandboxes(self) -> Path:
        return self.state / "sandboxes"

    def sandbox(self, name: str) -> SandboxPaths:
        check_sandbox_name(name)
        return SandboxPaths(root=self.sandboxes / name, runtime=self.runtime / name)

    def sandbox_names(self) -> list[str]:
        try:
            entries = sorted(self.sandboxes.iterdir())
        except FileNotFoundError:
            return []
        return [
            p.name
            for p in entries
            if SANDBOX_NAME.fullmatch(p.name) and (p / "sandbox.json").is_file()
        ]
