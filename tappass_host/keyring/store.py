"""The keyring directory the agent reads: one complete version at a time.

The scheme is the kubelet's atomic writer. Invariants:
  * `..data` is absent (no keyring yet) or a relative link to a complete,
    fsynced version directory; it is the only name that ever flips.
  * `keyring.json`, `keyring.dsse.json`, `harness` and `layers` are
    relative links through `..data`, so every open of them sees exactly one
    version. `harness/` and `layers/` hold the appliers' files
    (tappass_host.layers.files), rendered for that version.
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

`complete` replaces the appliers' files of the current version (a start
whose inputs render other files than the last flip did): the whole version
is written again under a staging name and exchanged with the current one in
one renameat2(RENAME_EXCHANGE), so `..data` never changes nor dangles.

All of this runs under an exclusive lock on a file outside the directory.

The store is the directory's one writer and its one reader: every other
module asks it (`read_current`, `current_version`, `is_current`, `follow`),
lock-free, through the top-level links (tests/test_keyring_readers.py).
"""

import errno
import json
import os
import re
from collections.abc import Callable
from datetime import datetime
from pathlib import Path, PurePosixPath

from tappass_host import libc
from tappass_host.clock import parse_timestamp
from tappass_host.errors import TappassError
from tappass_host.keyring import KeyringVersion, VerifiedKeyring
from tappass_host.paths import KEYRING_DATA as DATA
from tappass_host.paths import KEYRING_DATA_TMP as DATA_TMP
from tappass_host.paths import KEYRING_ENVELOPE, KEYRING_HARNESS_DIR, KEYRING_LAYERS_DIR, KEYRING_PAYLOAD
from tappass_host.paths import KEYRING_STAGING_PREFIX as STAGING_PREFIX
from tappass_host.statefile import fsync_dir, fsync_path, locked, write_file_durably

KEYRING_FILES = (KEYRING_PAYLOAD, KEYRING_ENVELOPE)
FILE_DIRS = (KEYRING_HARNESS_DIR, KEYRING_LAYERS_DIR)  # the appliers' files
LINKS = (*KEYRING_FILES, *FILE_DIRS)
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


class ExchangeUnsupported(TappassError):
    """The state filesystem cannot exchange two directories atomically."""


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> None:
    try:
        libc.renameat2(a, b, _RENAME_EXCHANGE)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise ExchangeUnsupported(f"the filesystem of {a.parent} cannot exchange directories "
                                      "atomically (renameat2 RENAME_EXCHANGE): keep the state "
                                      "directory on a local filesystem (ext4, xfs, btrfs, tmpfs)")
        raise OSError(exc.errno, exc.strerror, str(b)) from None


def _applier_path(relpath: str) -> PurePosixPath:
    """A path the appliers' files may take (tappass_host.layers.files checked it)."""
    path = PurePosixPath(relpath)
    if path.is_absolute() or ".." in path.parts or len(path.parts) < 2 or path.parts[0] not in FILE_DIRS:
        raise ValueError(f"applier file {relpath!r:.100} is not under {' or '.join(FILE_DIRS)}/")
    return path


def _remove_tree(path: Path) -> None:
    """rmtree, making our own 0550 directories writable again if we lack the
    capability to ignore their mode (rootless)."""
    import shutil  # only writers remove: `status` reads

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

    def transaction(self) -> "_Transaction":
        """Hold the store's lock, with leftovers of a crashed write removed
        (`with store.transaction():`)."""
        return _Transaction(self)

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

    def read_current(self) -> dict | None:
        """The current payload; None when there is none, or none readable."""
        try:
            return json.loads((self.dir / KEYRING_PAYLOAD).read_bytes())
        except (OSError, ValueError):
            return None

    def is_current(self, envelope: bytes) -> bool:
        """True when `envelope` is the one in place."""
        try:
            return (self.dir / KEYRING_ENVELOPE).read_bytes() == envelope
        except OSError:
            return False

    def follow(self, derive: Callable[[dict], object]) -> "Follower":
        """`derive(current payload)`, derived again only after a flip."""
        return Follower(self.dir / KEYRING_PAYLOAD, derive)

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

    def flip(self, keyring: VerifiedKeyring, files: dict[str, bytes] | None = None) -> None:
        """`files`: the appliers' files, by path in the version directory."""
        previous = self.current_dirname()
        target = keyring.version.dirname
        self._stage(self.dir / target, {KEYRING_PAYLOAD: keyring.payload_bytes,
                                        KEYRING_ENVELOPE: keyring.envelope_bytes}, files or {})

        tmp_link = self.dir / DATA_TMP
        tmp_link.unlink(missing_ok=True)
        os.symlink(target, tmp_link)
        os.rename(tmp_link, self.dir / DATA)
        fsync_dir(self.dir)

        self._ensure_links()
        self._collect_garbage(keep={target, previous})

    def complete(self, wanted: dict[str, bytes]) -> bool:
        """Make the current version hold `wanted` as its appliers' files;
        True if they had to change. Call inside `transaction`, with files
        rendered for what `read_current()` returned in it."""
        current = self.current_dirname()
        if current is None:
            return False
        version = self.dir / current
        keyring = {name: (version / name).read_bytes() for name in KEYRING_FILES}
        # a version written before `layers/` existed is completed too: no dangling link
        if self._applier_files(version) == wanted and all(
                (version / top).is_dir() for top in FILE_DIRS):
            return False
        staging = self.dir / f"{STAGING_PREFIX}{os.urandom(6).hex()}"
        try:
            self._stage(staging, keyring, wanted)
            _exchange(staging, version)
            fsync_dir(self.dir)
        finally:
            _remove_tree(staging)  # the old files, once exchanged
        return True

    def _applier_files(self, version: Path) -> dict[str, bytes]:
        found = {}
        for top in FILE_DIRS:
            for dirpath, _, filenames in os.walk(version / top):
                for name in filenames:
                    path = Path(dirpath) / name
                    found[path.relative_to(version).as_posix()] = path.read_bytes()
        return found

    def _stage(self, staging: Path, keyring: dict[str, bytes], applier: dict[str, bytes]) -> None:
        files = {Path(name): keyring[name] for name in KEYRING_FILES}
        for relpath, data in applier.items():
            files[Path(_applier_path(relpath))] = data
        staging.mkdir(mode=0o700)
        for top in FILE_DIRS:
            (staging / top).mkdir(mode=0o700)
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


class Follower:  # not typing.Generic: `status` imports this module (issue 13)
    """What a reader keeps of the current payload (`derive` of it), derived
    again only when `keyring.json` names another file. One open and one
    fstat when it does not: the egress proxy asks at every connection."""

    def __init__(self, payload: Path, derive: Callable[[dict], object]):
        self._payload = payload
        self._derive = derive
        self._stamp: tuple | None = None
        self._derived = None

    def current(self):
        """`derive` of the current payload; None when there is none, or none readable."""
        try:
            fd = os.open(self._payload, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            stamp = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
            if stamp != self._stamp:
                with os.fdopen(os.dup(fd), "rb") as f:
                    self._derived = self._derive(json.loads(f.read()))
                self._stamp = stamp
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)
        return self._derived


def expires_at(payload: dict) -> datetime | None:
    """When a payload `read_current` returned expires; None if it does not say."""
    try:
        return parse_timestamp(payload["expires_at"])
    except (KeyError, TypeError, ValueError):
        return None


def expired(payload: dict, now: datetime) -> bool:
    """True when a payload `read_current` returned has expired at `now`, or
    does not say when it expires."""
    expires = expires_at(payload)
    return expires is None or expires <= now


def store_of(sandbox) -> KeyringStore:
    """The store of a sandbox (sandbox: SandboxPaths), to read: writing
    needs the agent's group (store_for)."""
    return KeyringStore(sandbox.keyring, sandbox.keyring_lock)


def store_for(paths, record) -> KeyringStore:
    """The store of the sandbox `record` describes (paths: HostPaths)."""
    from tappass_host.ids import keyring_group

    sandbox = paths.sandbox(record.name)
    return KeyringStore(sandbox.keyring, sandbox.keyring_lock, group=keyring_group(record))


class _Transaction:
    """A KeyringStore's lock held (KeyringStore.transaction). A class, not a
    contextlib.contextmanager: contextlib was 2 ms of every start (issue 13)."""

    __slots__ = ("store", "lock")

    def __init__(self, store: KeyringStore):
        self.store, self.lock = store, locked(store.lock_path)

    def __enter__(self) -> KeyringStore:
        self.store.dir.parent.mkdir(parents=True, exist_ok=True)
        self.lock.__enter__()
        try:
            self.store._prepare_top()
            self.store.recover()
        except BaseException:
            self.lock.__exit__(None, None, None)
            raise
        return self.store

    def __exit__(self, *exc) -> None:
        self.lock.__exit__(*exc)
