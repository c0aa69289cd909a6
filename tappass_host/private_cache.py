"""A cache directory of this user's alone, for work not redone (issue 13): the
bundles starts prepared (tappass_host.oci.bundle_cache) and the TOML documents
they parsed (tappass_host.toml_document).

Invariants:
- an entry is used only if it and its directory are this user's and nobody
  else's (a 0700 directory, 0600 regular files, not followed through a
  symlink): what another user could write is never read as ours;
- an entry is `sha256:<hex>` of its body, a newline, and the body; a torn,
  damaged or foreign entry is a miss, never an error;
- a cache never fails its caller: an entry that cannot be written is simply
  not kept. Entries are written whole (temp file + rename) without fsync: a
  crash loses at most an entry, which is a miss.
- bounded: past `max_entries` the least recently used go (a hit sets its mtime).
"""

import hashlib
import os
import stat
from pathlib import Path

from tappass_host.statefile import prune_oldest, write_runtime_file


class PrivateCache:
    __slots__ = ("directory", "max_entries")

    def __init__(self, directory: Path, max_entries: int):
        self.directory, self.max_entries = directory, max_entries

    def read(self, name: str) -> bytes | None:
        """The body kept as `name`, intact and ours; else None."""
        if not self._usable(create=False):
            return None
        entry = self.directory / name
        data = _read_own_file(entry)
        if data is None:
            return None
        header, _, body = data.partition(b"\n")
        if header != _header(body):
            return None
        try:
            os.utime(entry)
        except OSError:
            pass
        return body

    def write(self, name: str, body: bytes) -> None:
        if not self._usable(create=True):
            return
        try:
            write_runtime_file(self.directory / name, _header(body) + b"\n" + body, 0o600)
            prune_oldest(self.directory, self.max_entries)
        except OSError:
            pass

    def _usable(self, create: bool) -> bool:
        try:
            if create:
                self.directory.mkdir(mode=0o700, exist_ok=True)  # in a directory that exists
            st = os.lstat(self.directory)
        except OSError:
            return False
        return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077


def _header(body: bytes) -> bytes:
    return b"sha256:" + hashlib.sha256(body).hexdigest().encode()


def _read_own_file(path: Path) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read()
    except OSError:
        return None
    finally:
        os.close(fd)
