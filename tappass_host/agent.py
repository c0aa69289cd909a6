"""Agent packages (DESIGN §8): a directory holding `tappass-agent.toml`, or
an installed distribution declaring an entry point in group `tappass.agents`
whose value names a module; the module's directory is the package.

A spec containing '/' is a directory (`./my-agent`, `/opt/agents/x`); a bare
name is only ever an installed distribution, never a directory of that name
in the current directory, which whoever controls the cwd could plant.

The package directory is mounted read-only at /opt/agent.
"""

import os
import posixpath
import re
import stat
from collections import namedtuple
from pathlib import Path
from types import MappingProxyType

from tappass_host import toml_document
from tappass_host.errors import TappassError

MANIFEST = "tappass-agent.toml"
MAX_MANIFEST_BYTES = 256 * 1024
RESTART_POLICIES = ("no", "on-failure", "always")
ROOTFS_TYPES = ("host", "image")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KEYS = {"name", "version", "entrypoint", "restart", "env", "rootfs"}
MOUNT_POINT = "/opt/agent"
# The sandbox's PATH (the OCI template's) unless the manifest's [env] sets one.
SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Where the `host` rootfs shows the host's own files (bound read-only, or the
# merged-/usr links to them).
HOST_VIEW = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


class BadAgent(TappassError):
    """The agent package or its manifest is unusable."""


# name, version: str; entrypoint: tuple[str, ...]; directory: Path; restart: str;
# env: a read-only mapping of str; rootfs: "host" or "image"; image: for rootfs
# "image", the image source (tappass_host.image.source)
AgentManifest = namedtuple(
    "AgentManifest", "name version entrypoint directory restart env rootfs image",
    defaults=("no", MappingProxyType({}), "host", ""))


def _locate(spec: str) -> Path:
    if "/" in spec:
        path = Path(spec)
        try:
            if not path.is_dir():
                raise BadAgent(f"agent package {spec!r} is not a directory")
            return path.resolve()
        except OSError as exc:  # EACCES: a directory on the way is not searchable by you
            raise BadAgent(f"agent package {spec!r} cannot be reached: {exc.strerror}") from None
    from importlib.metadata import entry_points
    from importlib.util import find_spec

    for ep in entry_points(group="tappass.agents"):
        if ep.name == spec or (ep.dist and ep.dist.name == spec):
            module = find_spec(ep.module)
            if module and module.origin:
                return Path(module.origin).resolve().parent
    raise BadAgent(f"agent package {spec!r} is not an installed distribution with a "
                   f"'tappass.agents' entry point (for a directory, give its path: ./{spec})")


def load(spec: str, paths=None) -> AgentManifest:
    """The manifest of the package `spec`; `paths` (HostPaths): whose cache
    its parse may be kept in (tappass_host.toml_document)."""
    directory = _locate(spec)
    manifest = directory / MANIFEST
    data = _read_manifest(manifest)
    try:
        doc = toml_document.parse(data, paths)
    except UnicodeDecodeError as exc:
        raise BadAgent(f"{manifest} is not UTF-8 text (byte {exc.start} is not UTF-8)") from None
    except ValueError as exc:
        raise BadAgent(f"{manifest} is not valid TOML: {exc}") from None
    return _parse(doc, directory, manifest)


def _read_manifest(manifest: Path) -> bytes:
    """The manifest's bytes: a regular file of at most MAX_MANIFEST_BYTES (the
    package is hostile input: not a FIFO to hang on, nor a file to fill memory)."""
    try:
        fd = os.open(manifest, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise BadAgent(f"agent package {manifest.parent} has no {MANIFEST}") from None
    except OSError as exc:
        raise BadAgent(f"cannot read {manifest}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadAgent(f"{manifest} is not a regular file")
        data = b""
        while len(data) <= MAX_MANIFEST_BYTES and (chunk := os.read(fd, MAX_MANIFEST_BYTES + 1)):
            data += chunk
    except OSError as exc:
        raise BadAgent(f"cannot read {manifest}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_MANIFEST_BYTES:
        raise BadAgent(f"{manifest} is larger than {MAX_MANIFEST_BYTES // 1024} KiB")
    return data


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
            isinstance(v, str) and "\0" not in v and _ENV_NAME.fullmatch(k)
            for k, v in env.items()):
        raise BadAgent(f"{where}: [env] must map variable names to string values (no NUL)")
    table = doc.get("rootfs", {})
    rootfs = table.get("type", "host") if isinstance(table, dict) else None
    if rootfs not in ROOTFS_TYPES:
        raise BadAgent(f"{where}: [rootfs] type must be one of {', '.join(ROOTFS_TYPES)}")
    image = table.get("image", "")
    if set(table) - {"type", "image"} or not isinstance(image, str) or (
            bool(image) != (rootfs == "image")):
        raise BadAgent(f"{where}: [rootfs] holds 'type' and, with type \"image\", "
                       "'image' (an image source: oci:DIR, sha256:<digest>...)")
    return AgentManifest(name=doc["name"], version=doc["version"], entrypoint=tuple(entrypoint),
                         directory=directory, restart=restart, env=dict(env), rootfs=rootfs,
                         image=image)


def _host_path(manifest: AgentManifest, path: str) -> str | None:
    """Where the sandbox path `path` is on the host, or None when it lies
    somewhere only the running sandbox has (/workspace, /tmp...)."""
    path = posixpath.normpath(path)
    if path == MOUNT_POINT or path.startswith(MOUNT_POINT + "/"):
        return os.path.join(manifest.directory, path[len(MOUNT_POINT):].lstrip("/"))
    if any(path == d or path.startswith(d + "/") for d in HOST_VIEW):
        return path
    return None


def _executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def check_entrypoint(manifest: AgentManifest) -> None:
    """Refuse, before anything is created, an entrypoint the sandbox cannot run
    (the runtimes' own message for it is obscure and comes late)."""
    program = manifest.entrypoint[0]
    if manifest.rootfs != "host":
        return  # in an image: checked in its root (tappass_host.runtime.imageroot)
    if "/" not in program:
        search = manifest.env.get("PATH", SANDBOX_PATH).split(":")
        if not any(_executable(host) for d in search if d.startswith("/")
                   and (host := _host_path(manifest, posixpath.join(d, program)))):
            raise BadAgent(f"agent {manifest.name!r}: entrypoint {program!r} is not an "
                           f"executable on the sandbox's PATH ({':'.join(search)})")
        return
    if not program.startswith("/"):
        return  # relative to /workspace: only the running sandbox has it
    host = _host_path(manifest, program)
    if host is not None and not _executable(host):
        where = f" (in the package, {host})" if host != program else ""
        raise BadAgent(f"agent {manifest.name!r}: entrypoint {program} does not exist in the "
                       f"sandbox or is not executable{where}")


def check_readable(manifest: AgentManifest, uid: int, gid: int) -> None:
    """The package is mounted as is at /opt/agent: the agent (`uid`:`gid` on
    the host) must be able to enter and read it, or it dies with EACCES."""
    st = os.stat(manifest.directory)
    if st.st_uid == uid:
        bits = (st.st_mode >> 6) & 0o5
    elif st.st_gid == gid:
        bits = (st.st_mode >> 3) & 0o5
    else:
        bits = st.st_mode & 0o5
    if bits != 0o5:
        raise BadAgent(f"agent package {manifest.directory} is not readable by the agent "
                       f"(uid {uid}, mode {st.st_mode & 0o7777:o}): make it world-readable "
                       "(chmod o+rx)")
