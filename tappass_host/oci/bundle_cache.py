"""Work not redone at start (issue 13): the bundle a start prepared (appliers
→ render → invariants → schema, tappass_host.oci.bundle) is kept, and a later
start of the same inputs reuses it, so that only the per-run parts run: the
keyring version's files completed, the bundle's files written, the rootfs's
mount points made (`install`). On a reuse nothing that renders or checks a
config is even imported.

Reused only when nothing the full path read has changed:

- the key, a digest of every input: the keyring payload, the sandbox record
  (but the agent, runtime and image that `start` itself writes into it, which
  the key holds as this start's), the agent manifest as parsed (all `start`
  reads of the package: the package is hostile input, and the manifest is
  every byte of it that reaches the config), the whole config and its file's
  path, the host facts the layers read (`host_facts`, the systemd cgroup
  driver, an image root's launcher), the sandbox's paths, the package's code
  (a wheel install's RECORD, else every file of the package) and the OCI
  schema's files (fingerprints: name, size, mtime, inode),
  the Python version;
- the host paths the layers and the invariants looked at (`fact_paths`: every
  bind source, the state, keyring and workspace directories, the host's /lib*
  links, the launcher's python3, each `filesystem.read_only` path, a network
  namespace joined by path): each path's realpath and file type (and for a
  namespace, whether it is one of the host's), taken before the invariants
  passed, must be the same again. A path swapped for a symlink into the state
  directory, or for a socket, is a miss, and the full path refuses it.

Only the built-in appliers: a third-party applier's code is not in the
fingerprint, so a config naming one is never kept.

Entries are `<state>/bundle-cache/<key>.json` (paths.HostPaths.bundle_cache),
a cache of this user's alone (tappass_host.private_cache: 0600 in a 0700
directory, a digest line before the body, at most MAX_ENTRIES); an entry that
is unreadable, corrupt, of another format or key is a miss, never an error: the
full path runs and replaces it.
"""

import binascii
import hashlib
import json
import os
import stat
import sys
from collections import namedtuple
from collections.abc import Iterable
from pathlib import Path

from tappass_host import __version__, landlock, systemd
from tappass_host.oci import rootfs
from tappass_host.paths import HostPaths
from tappass_host.processes import is_host_netns
from tappass_host.private_cache import PrivateCache
from tappass_host.statefile import write_runtime_file

FORMAT = 1
MAX_ENTRIES = 64
BUILTIN_APPLIERS = frozenset(("identity", "filesystem", "keyring", "kernel", "network",
                              "resources", "harness", "gateway"))  # tappass_host.layers.BUILTIN
PACKAGE = Path(__file__).resolve().parent.parent
WHEEL_RECORD = "tappass_host-{version}.dist-info/RECORD"  # the install's metadata, beside PACKAGE
# The record's fields `start` writes itself, after the bundle: the key holds them as
# this start's (the manifest's directory, the runtime, the image).
RECORD_WRITTEN_BY_START = ("agent", "runtime", "image")


class Prepared(namedtuple("Prepared", "config layers inputs agent_env mounts files warnings "
                                       "restart unavailable facts")):
    """What a start writes into its bundle, rendered and checked once:
    config: bytes, config.json; layers: bytes, layers.json (provenance,
    warnings, ...); inputs: bytes, layer-inputs.json (tappass_host.layers.files);
    agent_env: list[str] | None, the launcher's AGENT_ENV (None: no launcher);
    mounts: list[str], mount destinations, made in the rootfs; files:
    dict[str, bytes], every layer's files in the keyring version; warnings:
    tuple[str, ...]; restart: frozenset[str]; unavailable: tuple[tuple[str,
    str], ...]; facts: dict[str, list], fact_paths -> path_fact, before the
    invariants."""

    __slots__ = ()


# --- the key ---------------------------------------------------------------


def host_facts(agent, rootless: bool, runtime: str, egress_proxy: str = "") -> dict:
    """What the host offers the sandbox, as tappass_host.layers.Host's fields.
    `agent`: the sandbox's tappass_host.ids.AgentIds."""
    cgroups = not rootless or systemd.manages_cgroups() or _delegated_cgroup()
    return {"rootless": rootless, "agent_uid": agent.uid, "agent_gid": agent.gid,
            "uid_mappings": tuple(agent.uid_mappings), "gid_mappings": tuple(agent.gid_mappings),
            "machine": os.uname().machine, "landlock_abi": landlock.host_abi(),
            "cgroups": cgroups, "cgroups_advice": "" if cgroups else systemd.delegation_advice(),
            "runtime": runtime, "egress_proxy": egress_proxy}


def _delegated_cgroup() -> bool:
    """Rootless: whether the runtime can make a cgroup for the sandbox, i.e.
    cgroup v2 with our own cgroup writable by us (systemd's delegation).
    cgroup v1 hierarchies are never delegated to a user."""
    try:
        if not os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
            return False
        with open("/proc/self/cgroup") as f:
            own = next(line[3:].strip() for line in f if line.startswith("0::"))
    except (OSError, StopIteration):
        return False
    return os.access(f"/sys/fs/cgroup{own}", os.W_OK)


def fingerprint(files: Iterable[str | Path], salt: str = "") -> str:
    """A digest of `files`' names, sizes, mtimes and inodes (missing ones left out)."""
    seen = [salt]
    for entry in files:
        try:
            st = os.stat(entry)
        except OSError:
            continue
        seen.append((str(entry), st.st_size, st.st_mtime_ns, st.st_ino))
    return hashlib.sha256(repr(seen).encode()).hexdigest()


def schema_fingerprint(schema_dir: str) -> str:
    """What the OCI schema check's verdict depends on besides the config: the
    schema's files and the module that checks (tappass_host.oci.schema)."""
    try:
        entries = sorted(Path(schema_dir).glob("*.json"))
    except OSError:
        entries = []
    return fingerprint([*entries, Path(__file__).with_name("schema.py")],
                       str(Path(schema_dir).resolve()))


def _code_files() -> list[str]:
    """What tells this package's code apart from another's: a wheel install's
    RECORD beside it (pip writes it anew, with every file's hash, on each
    install); in a source checkout, every file."""
    record = PACKAGE.parent / WHEEL_RECORD.format(version=__version__)
    return [str(record)] if record.is_file() else _package_files()


def _package_files() -> list[str]:
    """Every file of the package but bytecode (data/ followed: in a checkout it
    holds links to the shipped templates and profiles)."""
    found = []
    for directory, subdirs, names in os.walk(PACKAGE, followlinks=True):
        subdirs[:] = sorted(d for d in subdirs if d != "__pycache__")
        found += [os.path.join(directory, n) for n in sorted(names)]
    return found


def key(paths: HostPaths, name: str, record, keyring: dict, manifest, config,
        host: dict, image: str | None = None) -> str | None:
    """The digest of every input of a start's bundle (`image`: the digest of
    the image it runs from); None when it cannot be known (a third-party
    applier)."""
    appliers = config["appliers"]
    if not set(appliers) <= BUILTIN_APPLIERS:
        return None
    sandbox = paths.sandbox(name)
    schema_dir = config["oci_schema_dir"]
    doc = json.loads(record.to_json())
    for field in RECORD_WRITTEN_BY_START:
        doc.pop(field, None)
    inputs = {
        "format": FORMAT,
        "tappass_host": [__version__, str(PACKAGE), fingerprint(_code_files())],
        "python": sys.hexversion,
        "name": name,
        "paths": [str(paths.state), str(paths.runtime), str(sandbox.root), str(sandbox.runtime)],
        "record": doc,
        "keyring": keyring,
        "manifest": _manifest_doc(manifest),
        "config": config.values,
        "config_source": str(config.source) if config.source else None,
        "host": host,
        "systemd_cgroups": systemd.manages_cgroups(),
        "image": image,
        "image_launch": landlock.host_launch() if manifest.rootfs == "image" else None,
        "schema": schema_fingerprint(schema_dir) if schema_dir else None,
    }
    data = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(data.encode()).hexdigest()


def _manifest_doc(manifest) -> dict:
    """Every field of the agent manifest (tappass_host.agent.AgentManifest)."""
    return {**manifest._asdict(), "env": dict(manifest.env)}


# --- what the layers and invariants looked at on the host ------------------


def fact_paths(config: dict, keyring: dict, state_dir: Path, keyring_dir: Path,
               workspace_dir: Path) -> list[str]:
    """The host paths whose realpath and type the full path read for `config`."""
    found = {str(state_dir), str(keyring_dir), str(workspace_dir), landlock.PYTHON,
             *rootfs.MERGED_USR_LINKS}
    for mount in config.get("mounts") or []:
        if isinstance(mount, dict) and isinstance(mount.get("source"), str) and (
                mount["source"].startswith("/")):
            found.add(mount["source"])
    for path in ((keyring.get("filesystem") or {}).get("read_only") or []):
        if isinstance(path, str):
            found.add(path)
    return sorted(found)


def _netns_paths(config: dict) -> list[str]:
    namespaces = (config.get("linux") or {}).get("namespaces") or []
    return sorted({ns["path"] for ns in namespaces
                   if isinstance(ns, dict) and isinstance(ns.get("path"), str)})


def path_facts(paths: Iterable[str], netns: Iterable[str] = ()) -> dict[str, list]:
    """For each path: [realpath, file type (0: missing)]; for each network
    namespace path also whether it is one of the host's."""
    facts: dict[str, list] = {}
    for path in paths:
        try:
            kind = stat.S_IFMT(os.stat(path).st_mode)
        except OSError:
            kind = 0
        facts[path] = [_realpath(path), kind]
    for path in netns:
        facts["netns:" + path] = [_realpath(path), _is_host_netns(path)]
    return facts


def _realpath(path: str) -> str | None:
    try:
        return os.path.realpath(path)
    except OSError:  # e.g. a /proc/<pid>/ns link of a process not ours to read
        return None


def facts_of(config: dict, keyring: dict, state_dir: Path, keyring_dir: Path,
             workspace_dir: Path) -> dict[str, list]:
    """`path_facts` of everything `config`'s full path looked at (taken before
    the invariants check it)."""
    return path_facts(fact_paths(config, keyring, state_dir, keyring_dir, workspace_dir),
                      _netns_paths(config))


def _is_host_netns(path: str) -> bool | None:
    try:
        return is_host_netns(os.stat(path))
    except OSError:
        return None


def _same_facts(stored: dict[str, list]) -> bool:
    netns = [p[len("netns:"):] for p in stored if p.startswith("netns:")]
    return path_facts([p for p in stored if not p.startswith("netns:")], netns) == stored


# --- entries ---------------------------------------------------------------


def _cache(paths: HostPaths) -> PrivateCache:
    return PrivateCache(paths.bundle_cache, MAX_ENTRIES)


def _encode(key: str, prepared: Prepared) -> bytes:
    body = json.dumps({
        "format": FORMAT, "key": key,
        "config": prepared.config.decode(), "layers": prepared.layers.decode(),
        "inputs": prepared.inputs.decode(), "agent_env": prepared.agent_env,
        "mounts": prepared.mounts,
        "files": {path: binascii.b2a_base64(data, newline=False).decode()
                  for path, data in prepared.files.items()},
        "warnings": list(prepared.warnings), "restart": sorted(prepared.restart),
        "unavailable": [list(pair) for pair in prepared.unavailable],
        "facts": prepared.facts,
    }, sort_keys=True, separators=(",", ":")).encode()
    return body


def _decode(body: bytes, key: str) -> Prepared | None:
    try:
        doc = json.loads(body)
        if doc["format"] != FORMAT or doc["key"] != key:
            return None
        agent_env = doc["agent_env"]
        if agent_env is not None and not all(isinstance(e, str) for e in agent_env):
            return None
        return Prepared(
            config=doc["config"].encode(), layers=doc["layers"].encode(),
            inputs=doc["inputs"].encode(), agent_env=agent_env,
            mounts=[str(m) for m in doc["mounts"]],
            files={str(p): binascii.a2b_base64(v) for p, v in doc["files"].items()},
            warnings=tuple(str(w) for w in doc["warnings"]),
            restart=frozenset(str(r) for r in doc["restart"]),
            unavailable=tuple((str(a), str(b)) for a, b in doc["unavailable"]),
            facts={str(p): list(v) for p, v in doc["facts"].items()})
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error):
        return None


def lookup(paths: HostPaths, key: str | None) -> Prepared | None:
    """The prepared bundle kept under `key`, if it is intact and the host
    paths it was checked against are as they were; else None."""
    if key is None:
        return None
    body = _cache(paths).read(paths.bundle_cache_entry(key).name)
    prepared = _decode(body, key) if body is not None else None
    if prepared is None or not _same_facts(prepared.facts):
        return None
    return prepared


def keep(paths: HostPaths, key: str | None, prepared: Prepared) -> None:
    """Keep `prepared` (which passed the invariants and the schema) for the
    next start of the same inputs. A cache: failing to write it is nothing."""
    if key is not None:
        _cache(paths).write(paths.bundle_cache_entry(key).name, _encode(key, prepared))


# --- a start's own part ----------------------------------------------------


def reuse(paths: HostPaths, name: str, record, keyring: dict, key: str | None) -> Prepared | None:
    """The kept bundle for `key`, completed into the keyring version and
    installed; None (nothing written) when there is none, or when a flip
    landed since `keyring` was read (its files are to be rendered for it)."""
    from tappass_host.keyring.store import store_for

    prepared = lookup(paths, key)
    if prepared is None:
        return None
    store = store_for(paths, record)
    with store.transaction():
        if store.read_current() != keyring:
            return None
        store.complete(prepared.files)
    install(paths, name, record, prepared)
    return prepared


def install(paths: HostPaths, name: str, record, prepared: Prepared) -> None:
    """Write `prepared` into `name`'s bundle directory (made, like the rootfs's
    mount points, for this run)."""
    sandbox = paths.sandbox(name)
    sandbox.bundle.mkdir(parents=True, exist_ok=True)
    rootfs.prepare(sandbox.rootfs, prepared.mounts)
    _write_agent_env(sandbox.rootfs, record, prepared.agent_env)
    write_runtime_file(sandbox.layer_inputs, prepared.inputs, 0o600)
    write_runtime_file(sandbox.bundle_config, prepared.config, 0o600)
    write_runtime_file(sandbox.bundle_layers, prepared.layers, 0o600)


def _write_agent_env(rootfs_dir: Path, record, env: list[str] | None) -> None:
    """The agent's environment for the Landlock launcher, in the read-only
    rootfs (landlock.AGENT_ENV), readable by the agent's group only; none
    without the launcher (a stale one would be readable by the agent then)."""
    from tappass_host.ids import keyring_group

    path = rootfs_dir / landlock.AGENT_ENV.lstrip("/")
    if env is None:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_runtime_file(path, landlock.encode_env(env), 0o440)
    if (group := keyring_group(record)) is not None:
        os.chown(path, -1, group)
