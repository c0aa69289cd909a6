"""Where tappass-host keeps its files (DESIGN §4).

Root mode uses /etc, /var/lib and /run; rootless mode (anyone but root of
the initial user namespace: root inside the user's namespace, which
tappass_host.userns enters, as inside `unshare --map-root-user` or `podman
unshare`, is the user) uses the XDG directories of the invoking user.
`--state-dir` / TAPPASS_HOST_STATE_DIR override the state root. Nothing here
touches the disk.
"""

import os
import re
from collections import namedtuple
from pathlib import Path

from tappass_host.errors import InvalidName

SANDBOX_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")

# Names inside a directory whose root is not one of the classes below.
# The keyring directory (tappass_host.keyring.store), as the agent sees it:
KEYRING_PAYLOAD = "keyring.json"
KEYRING_ENVELOPE = "keyring.dsse.json"
KEYRING_DATA = "..data"
KEYRING_DATA_TMP = "..data_tmp"
KEYRING_STAGING_PREFIX = "..tmp-"
KEYRING_HARNESS_DIR = "harness"  # the harness layer's files (tappass_host.layers.files)
KEYRING_LAYERS_DIR = "layers"  # every other layer's files, under layers/<layer>/
# conmon's files in a sandbox's runtime directory (tappass_host.runtime.monitor):
CONMON_PID = "conmon.pid"
CONTAINER_PID = "container.pid"
CONMON_EXITS = "exits"
CONMON_PERSIST = "persist"
CONMON_EXIT_CODE = "exit"
CONMON_OOM = "oom"
OOM_BASELINE = "oom-baseline"  # the sandbox's OOM-kill counter, and its value at the start
# An attached (foreground) run's files beside its bundle (tappass_host.runtime.attached):
ATTACHED_PID = "attached.pid"
RUNTIME_LOG = "runtime.log"  # the OCI runtime's own messages
# systemd's: a user manager's bus in $XDG_RUNTIME_DIR; a cgroup's controllers (tappass_host.systemd).
USER_BUS = "bus"
CGROUP_CONTROLLERS = "cgroup.controllers"
# The OCI runtime's own state root, per runtime, under the host's runtime directory.
OCI_RUNTIME_STATE = "oci"
SANDBOX_RECORD = "sandbox.json"
# Names inside an image source (tappass_host.image.source): the OCI image
# layout (image-spec layout.md) and a docker-archive's manifest.
OCI_LAYOUT_MARKER = "oci-layout"
OCI_LAYOUT_INDEX = "index.json"
OCI_LAYOUT_BLOBS = "blobs"
DOCKER_ARCHIVE_MANIFEST = "manifest.json"
# Inside the image store's staging directory of one import (tappass_host.image.store):
IMAGE_STAGING_BLOBS = "blobs"
IMAGE_STAGING_ROOTFS = "rootfs"


def oci_layout_blob(hex_digest: str) -> str:
    """A sha256 blob's name inside an OCI image layout."""
    return f"{OCI_LAYOUT_BLOBS}/sha256/{hex_digest}"


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


# collections.namedtuple, not typing.NamedTuple: every command imports this
# module, and `typing` alone is a tenth of what `status` costs (issue 13).
class SandboxPaths(namedtuple("SandboxPaths", "root runtime")):  # both Paths
    __slots__ = ()

    @property
    def record(self) -> Path:
        return self.root / SANDBOX_RECORD

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
    def keyring_expired(self) -> Path:
        return self.root / "keyring-expired.json"

    @property
    def unacked(self) -> Path:
        return self.root / "unacked.json"

    @property
    def keyring_lock(self) -> Path:
        # Outside keyring/: the agent sees that directory and must not see this.
        return self.root / "keyring.lock"

    @property
    def workspace(self) -> Path:
        return self.root / "workspace"

    @property
    def workspace_image(self) -> Path:
        return self.root / "workspace.img"

    @property
    def workspace_trim_mount(self) -> Path:
        return self.root / ".workspace-trim"

    @property
    def workspace_refilled(self) -> Path:
        """Set by the daemon's keep_reserved when it reserved the mounted image
        again after a trim (tappass_host.workspace.release reads it)."""
        return self.runtime / "workspace.refilled"

    @property
    def workspace_new_mount(self) -> Path:
        return self.root / ".workspace-new"

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
    def run_intent(self) -> Path:
        """A detached run's intent to run, kept across reboots (runtime.runintent)."""
        return self.root / "run-intent.json"

    @property
    def run_state(self) -> Path:
        return self.runtime / "state.json"

    @property
    def exit_lock(self) -> Path:
        return self.runtime / "exit.lock"

    @property
    def bundle(self) -> Path:
        return self.runtime / "bundle"

    @property
    def bundle_config(self) -> Path:
        return self.bundle / "config.json"

    @property
    def bundle_layers(self) -> Path:
        """What the layers rendered: provenance, warnings, hot-reload/restart sets."""
        return self.bundle / "layers.json"

    @property
    def layer_inputs(self) -> Path:
        return self.bundle / "layer-inputs.json"

    @property
    def rootfs(self) -> Path:
        return self.bundle / "rootfs"

    @property
    def image_layer(self) -> Path:
        """An image-based run's own overlay directories (runtime.imageroot):
        upper and work, over the store's shared root; gone after the run."""
        return self.runtime / "image-overlay"

    @property
    def image_upper(self) -> Path:
        return self.image_layer / "upper"

    @property
    def image_work(self) -> Path:
        return self.image_layer / "work"


class HostPaths(namedtuple("HostPaths", "state runtime")):  # both Paths
    __slots__ = ()

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

    def trusted_key(self, key_id: str) -> Path:
        return self.trust / f"{key_id}.pub"

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

    @property
    def enroll_lock(self) -> Path:
        return self.sandboxes / ".enroll.lock"

    @property
    def agent_ids_lock(self) -> Path:
        return self.state / "agent-ids.lock"

    @property
    def leases(self) -> Path:
        return self.state / "network" / "leases.json"

    @property
    def start_lock(self) -> Path:
        return self.runtime / "start.lock"

    @property
    def pause_pid(self) -> Path:
        """Rootless: the pause process holding the user's namespace (tappass_host.userns)."""
        return self.runtime / "pause.pid"

    @property
    def pause_lock(self) -> Path:
        return self.runtime / "pause.lock"

    @property
    def daemon_socket(self) -> Path:
        """The daemon's doorbell (tappass_host.runtime.doorbell)."""
        return self.runtime / "daemon.sock"

    @property
    def schema_ok(self) -> Path:
        """Cache of OCI configs that passed the schema check, one empty file per digest."""
        return self.runtime / "schema-ok"

    @property
    def bundle_cache(self) -> Path:
        """Bundles starts prepared, kept for the next start of the same inputs
        (tappass_host.oci.bundle_cache), 0700, one 0600 entry per key."""
        return self.state / "bundle-cache"

    def bundle_cache_entry(self, key: str) -> Path:
        return self.bundle_cache / f"{key}.json"

    @property
    def toml_cache(self) -> Path:
        """The parses of the TOML documents starts read, by digest of their bytes
        (tappass_host.toml_document), 0700, one 0600 entry per document."""
        return self.state / "toml-cache"

    def toml_cache_entry(self, digest: str) -> Path:
        return self.toml_cache / f"{digest}.json"

    @property
    def network(self) -> Path:
        """The egress proxy's runtime directory (tappass_host.network)."""
        return self.runtime / "network"

    @property
    def network_control_socket(self) -> Path:
        return self.network / "control.sock"

    @property
    def proxy_pid(self) -> Path:
        return self.network / "proxy.pid"

    @property
    def proxy_log(self) -> Path:
        return self.network / "proxy.log"

    @property
    def network_records(self) -> Path:
        return self.network / "sandboxes"

    def network_record(self, name: str) -> Path:
        return self.network_records / f"{check_sandbox_name(name)}.json"

    @property
    def images(self) -> Path:
        """The local image store (tappass_host.image.store), 0700."""
        return self.state / "images"

    @property
    def image_blobs(self) -> Path:
        """Verified blobs, content-addressed: <hex> of their sha256."""
        return self.images / "blobs" / "sha256"

    @property
    def image_records(self) -> Path:
        """One <hex>.json per image (hex of its manifest digest): the image exists iff it does."""
        return self.images / "images"

    def image_record(self, hex_digest: str) -> Path:
        return self.image_records / f"{hex_digest}.json"

    @property
    def image_rootfs_dir(self) -> Path:
        return self.images / "rootfs"

    def image_rootfs(self, hex_digest: str) -> Path:
        """The unpacked, read-only root of the images of config digest <hex>, shared by
        every sandbox using one."""
        return self.image_rootfs_dir / hex_digest

    @property
    def image_staging(self) -> Path:
        return self.images / "staging"

    @property
    def image_lock(self) -> Path:
        return self.images / "store.lock"

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
            if SANDBOX_NAME.fullmatch(p.name) and (p / SANDBOX_RECORD).is_file()
        ]
