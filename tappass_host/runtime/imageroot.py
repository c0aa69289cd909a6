"""An image-based sandbox's root (issue 14): the image admitted by the
sandbox's keyring, and the sandbox's own overlay over the store's shared,
read-only copy of it.

The store's root (`<state>/images/rootfs/<hex>`) is never a bundle's
`root.path` itself: runtimes make mount points in their root, and
tappass-host writes the agent's environment file there. Each run gets an
overlay mounted at its bundle's rootfs instead, lower = the store's root,
upper and work in the run's runtime directory (SandboxPaths.image_layer):
what the run adds (mount points, /run/tappass/agent.env) lands in its upper,
which goes with the run; the shared root is never written. The sandbox sees
it read-only all the same (`root.readonly`).

Rootless, tappass-host works in the user's own user and mount namespaces
(tappass_host.userns), as uid 0 there: the store is the user's (under its
state dir, files owned by the user), and the overlay is mounted in that
mount namespace, which the pause process keeps between commands; the host's
mount table never shows it.
"""

import errno
import os
import posixpath
import shutil
from dataclasses import dataclass
from pathlib import Path

from tappass_host import libc
from tappass_host.image import ImageError
from tappass_host.paths import HostPaths, SandboxPaths

MS_NOSUID, MS_NODEV = 0x2, 0x4
MNT_DETACH = 0x2
PRELOAD = "ld.so.preload"  # in the image's /etc
SOURCE_KINDS_WITH_PATHS = ("oci", "oci-archive", "docker-archive")


class ImageDenied(ImageError):
    """The sandbox's keyring does not allow the image (carries `reason`)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class ImageRootUnavailable(ImageError):
    """The image's root cannot be given to this sandbox (rootless, a mount failed,
    its entrypoint is not in the image)."""


@dataclass(frozen=True)
class Admitted:
    digest: str        # the image's manifest digest, what the keyring pinned
    repository: str | None
    lower: Path        # the store's shared root of the image


def source_of(manifest, override: str | None) -> str:
    """The image source to run: `start --image` over the package's `[rootfs]
    image`; a relative path in the package's manifest is the package's."""
    if override:
        return override
    kind, sep, rest = manifest.image.partition(":")
    if sep and kind in SOURCE_KINDS_WITH_PATHS and rest and not rest.startswith("/"):
        return f"{kind}:{manifest.directory / rest}"
    return manifest.image


def admit(paths: HostPaths, config, name: str, reference: str, keyring: dict) -> Admitted:
    """Import `reference` (nothing is unpacked again when the store has it)
    and check the keyring allows it; a refusal is audited (`image.denied`)
    and raised as ImageDenied."""
    from tappass_host.audit import AuditLog
    from tappass_host.image.source import open_source
    from tappass_host.image.store import ImageStore
    from tappass_host.image.unpack import Limits
    from tappass_host.keyring import image_policy

    store = ImageStore(paths, Limits.from_config(config))
    source = open_source(reference, paths)
    try:
        record = store.import_image(source).record
        named = source.name
    finally:
        source.close()
    # An OCI layout's ref.name may be a bare tag ("latest"): no repository then.
    names = [n for n in ([named] if named else record.names) if "/" in n or ":" in n] or [None]
    verdicts = [image_policy.allowed(keyring, record.digest, n) for n in names]
    verdict = next((v for v in verdicts if v), verdicts[0])
    repository = next((n for n, v in zip(names, verdicts) if v), names[0])
    repository = image_policy.repository_of(repository) if repository else None
    if not verdict:
        details = {"digest": record.digest, "reason": verdict.reason,
                   "policy_version": keyring.get("policy_version")}
        if repository:
            details["repository"] = repository
        AuditLog.for_host(paths).append("image.denied", sandbox=name, details=details)
        raise ImageDenied(f"sandbox {name!r} may not run image {record.digest}: {verdict.reason} "
                          f"(keyring policy_version {keyring.get('policy_version')})",
                          "not_allowed")
    return Admitted(record.digest, repository, store.rootfs(record.digest))


def check_entrypoint(manifest, lower: Path) -> None:
    """The entrypoint must be an executable file of the image (resolved in its
    root, absolute symlinks as inside it). Paths only the running sandbox has
    (/opt/agent, /workspace, /tmp...) are for the runtime to find."""
    from tappass_host.agent import MOUNT_POINT, SANDBOX_PATH, BadAgent

    program = manifest.entrypoint[0]
    if "/" in program:
        if not program.startswith("/") or program.startswith(("/opt/", "/workspace", "/tmp/")):
            return
        candidates = [program]
    else:
        candidates = [posixpath.join(d, program)
                      for d in manifest.env.get("PATH", SANDBOX_PATH).split(":")
                      if d.startswith("/") and d != MOUNT_POINT]
    if not any(_executable_in(lower, c) for c in candidates):
        raise BadAgent(f"agent {manifest.name!r}: entrypoint {program!r} is not an executable "
                       "in its image" + ("" if "/" in program else " on the sandbox's PATH"))


def _executable_in(root: Path, path: str) -> bool:
    import stat

    from tappass_host.image.unpack import openat2

    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = openat2(root_fd, path.lstrip("/"), os.O_PATH)
    except OSError:
        return False
    finally:
        os.close(root_fd)
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return stat.S_ISREG(st.st_mode) and bool(st.st_mode & 0o111)


def require_root(rootless: bool) -> None:
    """Root, or rootless inside the user's own namespace (tappass_host.userns),
    where its mount namespace takes the overlay."""
    if rootless and os.geteuid() != 0:
        raise ImageRootUnavailable(
            "an image-based sandbox needs root, or the user's own namespace (which every "
            "command enters): this process is in neither")


def mount(sandbox: SandboxPaths, lower: Path) -> None:
    """The run's overlay at its bundle's rootfs, over `lower`."""
    unmount(sandbox)  # a crashed run's
    for directory in (sandbox.image_upper, sandbox.image_work, sandbox.rootfs):
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(sandbox.image_upper, 0o755)  # the root directory the agent sees
    dirs = {"lowerdir": lower, "upperdir": sandbox.image_upper, "workdir": sandbox.image_work}
    for path in dirs.values():
        if any(c in str(path) for c in ",:\\"):
            raise ImageRootUnavailable(f"{path} holds ',', ':' or '\\', which overlayfs "
                                       "options cannot carry: choose another state directory")
    options = ",".join(f"{k}={v}" for k, v in dirs.items())
    try:
        libc.mount("overlay", sandbox.rootfs, "overlay", MS_NOSUID | MS_NODEV, options)
    except OSError as exc:
        raise ImageRootUnavailable(f"mount of an image root failed: {exc.strerror}") from None
    try:
        _mask_preload(sandbox.rootfs)
    except BaseException:
        unmount(sandbox)
        raise


def _mask_preload(rootfs: Path) -> None:
    """An empty /etc/ld.so.preload in the run's upper, over whatever the image
    has there. The Landlock launcher runs the host's dynamic loader in the
    image's root before its ruleset, and that loader loads what the root's
    /etc/ld.so.preload names (no option turns it off): an image could run
    code there unconfined. So an image's own preload list never applies,
    and an image whose /etc is not a directory (a symlink would take the
    loader elsewhere) is refused."""
    import stat

    etc = os.path.join(rootfs, "etc")
    try:
        if not stat.S_ISDIR(os.lstat(etc).st_mode):
            raise ImageRootUnavailable("the image's /etc is not a directory")
    except FileNotFoundError:
        os.mkdir(etc, 0o755)
    directory = os.open(etc, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        try:
            if stat.S_ISDIR(os.lstat(PRELOAD, dir_fd=directory).st_mode):
                shutil.rmtree(PRELOAD, dir_fd=directory)
            else:
                os.unlink(PRELOAD, dir_fd=directory)
        except FileNotFoundError:
            pass
        os.close(os.open(PRELOAD, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o644, dir_fd=directory))
    finally:
        os.close(directory)


def mounted(sandbox: SandboxPaths) -> bool:
    return os.path.ismount(sandbox.rootfs)


def unmount(sandbox: SandboxPaths) -> None:
    """Undo `mount`: the overlay goes, and the run's upper with it."""
    if mounted(sandbox):
        try:
            _umount(sandbox.rootfs)
        except ImageRootUnavailable:
            _umount(sandbox.rootfs, MNT_DETACH)
    shutil.rmtree(sandbox.image_layer, ignore_errors=True)


def _umount(rootfs: Path, flags: int = 0) -> None:
    try:
        libc.umount2(rootfs, flags)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return  # not mounted (any more)
        raise ImageRootUnavailable(f"umount2 of an image root failed: {exc.strerror}") from None
