"""Atomic writes of state files.

Invariant: a reader (or a crash at any instant) sees either the complete old
file or the complete new one, never a prefix. Sequence:
  1. write the bytes to a temp file in the same directory (O_EXCL, final mode),
  2. fsync the temp file,
  3. rename it over the target,
  4. fsync the directory so the rename itself is durable.
"""

import fcntl
import os
from pathlib import Path


def fsync_path(path: Path, flags: int = 0) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fsync_path(path, os.O_DIRECTORY)


def write_file_durably(path: Path, data: bytes, mode: int = 0o644, sync: bool = True) -> None:
    """Create `path` (which must not exist) with `data`, and fsync it unless
    the caller will (`sync=False`: several files then cost one journal commit)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fchmod(fd, mode)  # the umask must not widen or narrow the mode
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.urandom(4).hex()}")
    try:
        write_file_durably(tmp, data, mode)
        os.rename(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_runtime_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Atomic (temp file + rename) but not fsynced: runtime files are rewritten
    by every start and live under /run, which a crash empties anyway; the
    durable state (sandbox.json, exit.json, the keyring, audit) is fsynced."""
    tmp = path.with_name(f".{path.name}.tmp-{os.urandom(4).hex()}")
    try:
        write_file_durably(tmp, data, mode, sync=False)
        os.rename(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def prune_oldest(directory: Path, limit: int) -> None:
    """A bounded cache directory: past `limit` entries, the oldest go until half remain."""
    entries = list(directory.iterdir())
    if len(entries) > limit:
        for entry in sorted(entries, key=lambda e: e.stat().st_mtime_ns)[:len(entries) - limit // 2]:
            entry.unlink(missing_ok=True)


class locked:
    """`with locked(path):` holds an exclusive lock on the lock file `path`
    (made 0600 if missing) for the block; the kernel drops it if the process
    dies. A class, not a contextlib.contextmanager: contextlib is 3M
    instructions of `status`, which imports this module and never locks (issue 13)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(self.fd)
            raise

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


def remove_tree(top: Path) -> None:
    """Remove the directory `top` and everything in it, best effort, like
    shutil.rmtree(ignore_errors=True) without shutil's import (bz2, lzma and
    zlib: several ms of every `start --rm`, issue 13). Symlinks are removed,
    never followed, and nothing on another filesystem mounted below `top`
    (one still busy) is touched."""
    try:
        device = os.lstat(top).st_dev
    except OSError:
        return
    for directory, subdirs, names, fd in os.fwalk(top, topdown=False):
        if os.fstat(fd).st_dev != device:
            continue
        for name in names:
            _unlink_at(name, fd)
        for name in subdirs:
            try:
                os.rmdir(name, dir_fd=fd)
            except NotADirectoryError:  # a symlink to a directory
                _unlink_at(name, fd)
            except OSError:
                pass
    try:
        os.rmdir(top)
    except OSError:
        pass


def _unlink_at(name: str, fd: int) -> None:
    try:
        os.unlink(name, dir_fd=fd)
    except OSError:
        pass
