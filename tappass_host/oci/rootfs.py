"""The `host` rootfs: an empty directory holding only mount points and the
merged-/usr symlinks (/bin -> usr/bin …); the layers bind the host's /usr and
/etc over it read-only."""

import os
from pathlib import Path

MERGED_USR_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


def prepare(rootfs: Path, mount_destinations: list[str]) -> None:
    rootfs.mkdir(parents=True, exist_ok=True)
    os.chmod(rootfs, 0o755)
    for link in MERGED_USR_LINKS:
        target = rootfs / link.lstrip("/")
        if os.path.islink(link) and not target.is_symlink():
            os.symlink(os.readlink(link), target)
    for destination in mount_destinations:
        path = rootfs / destination.lstrip("/")
        if not path.is_symlink():
            path.mkdir(parents=True, exist_ok=True)
    tmp = rootfs / "tmp"
    if tmp.is_dir():
        os.chmod(tmp, 0o1777)  # runc gives a tmpfs its mount point's mode
