"""The keyring directory the agent reads: one complete version at a time.

The scheme is the kubelet's atomic writer. Invariants:
  * `..data` is absent (no keyring yet) or a relative link to a complete,
    fsynced version directory; it is the only name that ever flips.
  * `keyring.json`, `keyring.dsse.json` and `harness` are relative links
    through `..data`, so every open of them sees exactly one version.
  * a new version is always newer than `..data` (the verifier refuses
    rollback and replay), so a version directory newer than `..data` is the
    leftover of an interrupted write, as are `..data_tmp` and `..tmp-*`:
    `recover` removes them, so they can never become current.

Sequence of `flip`:
  1. write every file into `..v<version>`, set owners and modes (files
     0440, directories 0550), then fsync each file and each directory that
     holds one (all written before any is synced: one journal commit);
  2. link `..data_tmp -> ..v<version>`, rename it over `..data`, fsync the
     keyring directory: this rename is the commit point;
  3. create the top-level links if missing (first flip only);
  4. remove every version directory but the new one and the previous one.

All of this runs under an exclusive lock on a file outside the directory.
"""

import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

from tappass_host.clock import parse_timestamp
from tappass_host.keyring import KeyringVersion, VerifiedKeyring
from tappass_host.statefile import fsync_dir, fsync_path, locked, write_file_durably

DATA = "..data"
DATA_TMP = "..data_tmp"
STAGING_PREFIX = "..tmp-"
LINKS = ("keyring.json", "keyring.dsse.json", "harness")
_VERSION_DIR = re.compile(r"\.\.v(\d{10})-(\d{8}T\d{6}Z)")

FILE_MODE = 0o440
DIR_MODE = 0o550
TOP_MODE = 0o750


def _version_of(dirname: str) -> KeyringVersion | None:
    m = _VERSION_DIR.fullmatch(dirname)
    if not m:
        return None
    stamp = m.group(2)
    iso = f"{stamp[:4]}-{stamp[4:6]}-{stamp[6:8]}T{stamp[9:11]}:{stamp[11:13]}:{stamp[13:15]}Z"
    return KeyringVersion(int(m.group(1)), parse_timestamp(iso))


def _remove_tree(path: Path) -> None:
    """rmtree, making our own 0550 directories writable again if we lack the
    capability to ignore their mode (rootless)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
        return
    try:
        shutil.rmtree(path)
    except PermissionError:
        for dirpath, _, _ in os.walk(path):
            os.chmod(dirpath, 0o700)
        shutil.rmtree(path)


class KeyringStore:
    def __init__(self, directory: Path, lock_path: Path, group: int | None = None):
        self.dir = Path(directory)
        self.lock_path = Path(lock_path)
        self.group = group  # the agent's gid: files are root:<group>

    @contextmanager
    def transaction(self):
        """Hold the store's lock, with leftovers of a crashed write removed."""
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        with locked(self.lock_path):
            self._prepare_top()
            self.recover()
            yield self

    def _prepare_top(self) -> None:
        self.dir.mkdir(mode=TOP_MODE, exist_ok=True)
        self._own(self.dir, TOP_MODE)

    def _own(self, path: Path, mode: int) -> None:
        if self.group is not None:
            os.chown(path, -1, self.group, follow_symlinks=False)
        os.chmod(path, mode)

    def current_dirname(self) -> str | None:
        try:
            return os.readlink(self.dir / DATA)
        except FileNotFoundError:
            return None

    def current_version(self) -> KeyringVersion | None:
        name = self.current_dirname()
        return _version_of(name) if name else None

    def read_current(self) -> bytes | None:
        try:
            return (self.dir / "keyring.json").read_bytes()
        except FileNotFoundError:
            return None

    def adopt_group(self) -> None:
        """Give every file to the store's group (after the agent's gid is allocated)."""
        current = self.current_dirname()
        if self.group is None or current is None or (
                os.stat(self.dir / current).st_gid == self.group):
            return
        for dirpath, dirnames, filenames in os.walk(self.dir):
            for name in dirnames + filenames:
                os.chown(os.path.join(dirpath, name), -1, self.group, follow_symlinks=False)
        os.chown(self.dir, -1, self.group)

    def recover(self) -> None:
        current = self.current_version()
        for entry in os.listdir(self.dir):
            version = _version_of(entry)
            stale = (
                entry.startswith(STAGING_PREFIX)
                or entry == DATA_TMP
                or (version is not None and (current is None or version > current))
            )
            if stale:
                _remove_tree(self.dir / entry)
        if current is not None:
            self._ensure_links()

    def flip(self, keyring: VerifiedKeyring, harness: dict[str, bytes] | None = None) -> None:
        previous = self.current_dirname()
        target = keyring.version.dirname
        self._stage(self.dir / target, keyring, harness or {})

        tmp_link = self.dir / DATA_TMP
        tmp_link.unlink(missing_ok=True)
        os.symlink(target, tmp_link)
        os.rename(tmp_link, self.dir / DATA)
        fsync_dir(self.dir)

        self._ensure_links()
        self._collect_garbage(keep={target, previous})

    def _stage(self, staging: Path, keyring: VerifiedKeyring, harness: dict[str, bytes]) -> None:
        files = {Path("keyring.json"): keyring.payload_bytes,
                 Path("keyring.dsse.json"): keyring.envelope_bytes}
        for relpath, data in harness.items():
            if ".." in Path(relpath).parts or Path(relpath).is_absolute():
                raise ValueError(f"harness file {relpath!r} escapes the harness directory")
            files[Path("harness") / relpath] = data
        staging.mkdir(mode=0o700)
        (staging / "harness").mkdir(mode=0o700)
        for relpath, data in sorted(files.items()):
            (staging / relpath).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_file_durably(staging / relpath, data, FILE_MODE, sync=False)
        for dirpath, _, filenames in os.walk(staging, topdown=False):
            for name in filenames:
                self._own(Path(dirpath) / name, FILE_MODE)
            self._own(Path(dirpath), DIR_MODE)
        for relpath in sorted(files):
            fsync_path(staging / relpath)
        for directory in sorted({staging / relpath.parent for relpath in files}):
            fsync_dir(directory)

    def _ensure_links(self) -> None:
        missing = [name for name in LINKS if not (self.dir / name).is_symlink()]
        for name in missing:
            tmp = self.dir / f"{name}.tmp"
            tmp.unlink(missing_ok=True)
            os.symlink(f"{DATA}/{name}", tmp)
            os.rename(tmp, self.dir / name)
        if missing:
            fsync_dir(self.dir)

    def _collect_garbage(self, keep: set[str | None]) -> None:
        for entry in os.listdir(self.dir):
            if _version_of(entry) is not None and entry not in keep:
                _remove_tree(self.dir / entry)


def store_for(paths, record) -> KeyringStore:
    """The store of the sandbox `record` describes (paths: HostPaths)."""
    from tappass_host.ids import keyring_group

    sandbox = paths.sandbox(record.name)
    return KeyringStore(sandbox.keyring, sandbox.keyring_lock, group=keyring_group(record))
