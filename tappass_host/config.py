"""tappass-host's configuration: `config.toml`, every key defaulted.

A key not listed in DEFAULTS is rejected with its dotted name; a value of
the wrong type is rejected with the key and the expected type. The file is
optional: without it every default applies.
"""

import copy
from collections import namedtuple
from pathlib import Path

from tappass_host import toml_document
from tappass_host.errors import ConfigError

OCI_SCHEMA_DIR = "/usr/share/gocode/src/github.com/opencontainers/runtime-spec/schema"

DEFAULTS: dict = {
    "runtime": "crun",
    "runtime_path": "",  # empty: look the runtime up on PATH
    "conmon_path": "",
    "oci_schema_dir": OCI_SCHEMA_DIR,  # "" turns the schema check off
    "agent_id_range": "200000-299999",
    "max_sandboxes": 8,
    "kernel_layer": "required",  # required | best-effort
    "on_expiry": "keep",  # keep | stop
    "on_image_revoked": "keep",  # keep | stop: a flip no longer allows a running sandbox's image
    "restart_on_policy_change": False,
    "appliers": [
        "identity", "filesystem", "keyring", "kernel",
        "network", "resources", "harness", "gateway",
    ],
    "log_max_bytes": 10 * 1024 * 1024,
    "trust": {"keys": []},
    "limits": {  # host maxima a keyring's `process` aspect may ask for
        "memory_mb": 16384,
        "pids_max": 4096,
        "cpu_millis": 8000,
    },
    "sync": {
        "keepalive_timeout_s": 45,
        "backoff_initial_s": 0.5,
        "backoff_max_s": 30.0,
    },
    "filesystem": {
        # each sandbox's workspace is a filesystem of this size (root mode; 0: a plain
        # directory on the state filesystem, no limit); tappass_host/workspace.py
        "workspace_mb": 1024,
    },
    "supervision": {  # the daemon's restarts per the agent's restart policy
        "backoff_initial_s": 1.0,
        "backoff_max_s": 60.0,
        "stable_after_s": 60.0,  # a run this long starts the backoff over
    },
    "images": {  # bounds on an image import (tappass_host/image/unpack.py)
        "max_unpacked_mb": 16384,  # all layers of one image, unpacked
        "max_file_mb": 4096,  # one file in a layer
        "max_entries": 1_000_000,  # tar entries over all layers of one image
    },
    "network": {
        "address_pool": "169.254.64.0/18",
        "proxy_port": 3128,
        "hosts_file": "",  # "": the system resolver; a path: a hosts-format file, consulted first
        "header_timeout_s": 10.0,  # the egress proxy drops a request head slower than this
        "allow_ports": [443, 80],  # the only ports the egress proxy connects to
    },
}

CHOICES = {
    "runtime": ("crun", "runc"),
    "kernel_layer": ("required", "best-effort"),
    "on_expiry": ("keep", "stop"),
    "on_image_revoked": ("keep", "stop"),
}

# Numbers outside these bounds (inclusive; None: unbounded) are refused.
BOUNDS = {
    "max_sandboxes": (1, None),
    "log_max_bytes": (4096, None),
    "limits.memory_mb": (1, None),
    "limits.pids_max": (1, None),
    "limits.cpu_millis": (1, None),
    "sync.keepalive_timeout_s": (1.0, None),
    "sync.backoff_initial_s": (0.01, None),
    "sync.backoff_max_s": (0.01, None),
    "filesystem.workspace_mb": (0, None),
    "supervision.backoff_initial_s": (0.01, None),
    "supervision.backoff_max_s": (0.01, None),
    "supervision.stable_after_s": (0.0, None),
    "images.max_unpacked_mb": (1, None),
    "images.max_file_mb": (1, None),
    "images.max_entries": (1, None),
    "network.proxy_port": (1, 65535),
    "network.header_timeout_s": (0.1, None),
}


class Config(namedtuple("Config", "values source")):
    """values: the merged settings (dict); source: the file read (Path), None for none."""

    __slots__ = ()

    def __getitem__(self, key: str):
        node = self.values
        for part in key.split("."):
            node = node[part]
        return node

    @property
    def agent_id_range(self) -> tuple[int, int]:
        low, high = (int(x) for x in self["agent_id_range"].split("-"))
        return low, high


def _type_name(value) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a table"}[type(value)]


def _merge(defaults: dict, given: dict, prefix: str) -> dict:
    merged = copy.deepcopy(defaults)
    for key, value in given.items():
        name = prefix + key
        if key not in defaults:
            raise ConfigError(f"unknown config key {name!r}")
        default = defaults[key]
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {name!r} must be a table")
            merged[key] = _merge(default, value, name + ".")
            continue
        ok = isinstance(value, type(default)) and not (
            isinstance(value, bool) and not isinstance(default, bool)
        )
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            ok, value = True, float(value)
        if not ok:
            raise ConfigError(f"config key {name!r} must be {_type_name(default)}")
        if name in CHOICES and value not in CHOICES[name]:
            raise ConfigError(f"config key {name!r} must be one of {', '.join(CHOICES[name])}")
        if name in BOUNDS:
            _check_bounds(name, value, *BOUNDS[name])
        merged[key] = value
    return merged


def _check_bounds(name: str, value, low, high) -> None:
    if value < low or (high is not None and value > high):
        within = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ConfigError(f"config key {name!r} must be {within}")


def _check_address_pool(text: str) -> None:
    """IPv4, with room for at least one /30 (a sandbox's link)."""
    import ipaddress

    try:
        pool = ipaddress.IPv4Network(text)
    except ValueError:
        raise ConfigError("config key 'network.address_pool' must be an IPv4 network such as "
                          "'169.254.64.0/18'") from None
    if pool.prefixlen > 30:
        raise ConfigError("config key 'network.address_pool' must be a /30 or larger")


def _check_allow_ports(ports: list) -> None:
    if not all(isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536 for p in ports):
        raise ConfigError("config key 'network.allow_ports' must be a list of port numbers "
                          "between 1 and 65535")


def _check_hosts_file(text: str) -> None:
    if text and not text.startswith("/"):
        raise ConfigError("config key 'network.hosts_file' must be an absolute path (or \"\")")


def _check_agent_id_range(text: str) -> None:
    try:
        low, high = (int(x) for x in text.split("-"))
    except ValueError:
        raise ConfigError("config key 'agent_id_range' must look like '200000-299999'") from None
    if not 0 < low <= high:
        raise ConfigError("config key 'agent_id_range' must be a non-empty range above 0")


def load(path: Path | None, required: bool = False, paths=None) -> Config:
    """Load `path` over the defaults. A missing file is fine unless `required`.
    `paths` (HostPaths): whose cache its parse may be kept in
    (tappass_host.toml_document)."""
    given: dict = {}
    data = b""
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            if required:
                raise ConfigError(f"config file {path} does not exist") from None
            path = None
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    if data.strip():  # tomllib (its regexes) only for a file that says something
        try:
            given = toml_document.parse(data, paths)
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start} is "
                              "not UTF-8)") from None
        except ValueError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    values = _merge(DEFAULTS, given, "")
    _check_agent_id_range(values["agent_id_range"])
    _check_address_pool(values["network"]["address_pool"])
    _check_hosts_file(values["network"]["hosts_file"])
    _check_allow_ports(values["network"]["allow_ports"])
    return Config(values=values, source=path)
