"""The `host` rootfs: an empty directory holding only mount points and the
merged-/usr symlinks (/bin -> usr/bin …); the layers bind the host's /usr and
/etc over it read-only.

Mount destinations come from layers, third-party ones included: each is
normalized, and one that would reach outside the rootfs (a `..` segment, a
symlink leading out) is refused before any directory is made, since this
runs as root on the host."""

import os
import posixpath
from pathlib import Path

from tappass_host.errors import TappassError

MERGED_USR_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


class MountPointOutsideRootfs(TappassError):
    """A mount destination would make a directory outside the bundle's rootfs."""


def prepare(rootfs: Path, mount_destinations: list[str]) -> None:
    rootfs.mkdir(parents=True, exist_ok=True)
    os.chmod(rootfs, 0o755)
    for link in MERGED_USR_LINKS:
        target = rootfs / link.lstrip("/")
        if os.path.islink(link) and not os.path.lexists(target):  # an image's own /bin stays
            os.symlink(os.readlink(link), target)
    real_root = os.path.realpath(rootfs)
    for path in [mount_point(rootfs, destination, real_root) for destination in mount_destinations]:
        path.mkdir(parents=True, exist_ok=True)
    tmp = rootfs / "tmp"
    if tmp.is_dir():
        os.chmod(tmp, 0o1777)  # runc gives a tmpfs its mount point's mode


def mount_point(rootfs: Path, destination: str, real_root: str | None = None) -> Path:
    """Where `destination` lies under `rootfs` (whose realpath `real_root` is,
    if the caller has it), through the symlinks already there (/bin/x is
    usr/bin/x); refused if that is outside it."""
    if not isinstance(destination, str) or not destination.startswith("/") or (
            ".." in destination.split("/")):
        raise MountPointOutsideRootfs(
            f"mount destination {destination!r:.200} must be an absolute path without '..'")
    path = rootfs / posixpath.normpath(destination).lstrip("/")
    # Where mkdir would really create it: through the symlinks already there.
    existing = path
    while not os.path.lexists(existing):
        existing = existing.parent
    real_root = real_root or os.path.realpath(rootfs)
    real = os.path.realpath(existing)
    if real != real_root and not real.startswith(real_root + "/"):
        raise MountPointOutsideRootfs(
            f"mount destination {destination!r:.200} leads outside the sandbox's rootfs")
    return Path(real) / path.relative_to(existing)
