"""Applying one image layer (a tar changeset, image-spec layer.md) under a
root directory without ever reading or writing outside it.

Invariants, each with the test in tests/test_image_unpack.py that attacks it:
1. Names are checked before anything is written: an absolute name, a `..`
   component, a NUL or an over-long name is refused (LayerRejected, reason
   `path`), never rewritten.
2. The kernel resolves every entry's parent directory under the root:
   openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV) from the
   root's fd. A symlink on the way, absolute or relative, from this layer or
   a lower one, resolves as it will inside the sandbox, never into the host's
   tree; `..` stops at the root. The entry itself is made with *at calls on
   that parent's fd that never follow a final symlink (O_CREAT|O_EXCL|
   O_NOFOLLOW, mkdirat, symlinkat, linkat without AT_SYMLINK_FOLLOW,
   unlinkat); whatever held its name before is removed, never written through.
3. Symlinks are created exactly as the layer writes them (`/etc/alternatives/x`
   stays absolute): they work inside the sandbox and are only ever resolved
   by (2) while unpacking.
4. A hard link's target is resolved like (2) and must be a regular file
   already under the root; the link is made without following it.
5. Device nodes, FIFOs and sockets are skipped and counted (the runtime
   gives the sandbox its /dev); sparse files and unknown entry types are
   refused.
6. Nothing is chowned to the tar's uid/gid: every file belongs to the user
   who imports (root in root mode). Setuid, setgid and group/other write bits
   are dropped; directories keep owner rwx so the store can remove them.
7. Whiteouts (`.wh.NAME`, `.wh..wh..opq`) remove only what lower layers put
   there, resolved like (2); a whiteout is never created as a file.
8. Bounds, checked before the bytes are written: one file's size, all
   layers' unpacked bytes and entries (config `images.*`), the header bytes
   between two entries (a pax header is held in memory) and the bytes after
   the tar's end.
9. The decompressed layer hashes to the diff_id the image config names, or
   it is refused. The caller unpacks into a staging root and throws it away
   on any refusal, so a refused layer leaves nothing behind.
"""

import ctypes
import errno
import gzip
import hashlib
import os
import shutil
import stat
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO

from tappass_host import libc
from tappass_host.image.manifest import LAYERS, ImageRejected

SYS_OPENAT2 = 437  # x86_64 and aarch64 alike
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10
RESOLVE = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
MAX_NAME_BYTES = 4096
MAX_HEADER_BYTES = 256 * 1024  # between two entries: headers, pax records, long names
MAX_TRAILER_BYTES = 16 * 1024 * 1024  # after the end-of-archive blocks
CHUNK = 1024 * 1024
FILE_MODE_MASK = 0o1755  # drops setuid, setgid, group and other write


class LayerRejected(ImageRejected):
    """A layer failed an unpacking rule; `reason` is its code."""


@dataclass(frozen=True)
class Limits:
    max_unpacked_bytes: int
    max_file_bytes: int
    max_entries: int

    @classmethod
    def from_config(cls, config) -> "Limits":
        mib = 1024 * 1024
        return cls(config["images.max_unpacked_mb"] * mib, config["images.max_file_mb"] * mib,
                   config["images.max_entries"])


@dataclass
class Budget:
    """What an image's layers have used so far of its Limits."""

    limits: Limits
    unpacked_bytes: int = 0
    entries: int = 0
    skipped: dict[str, int] = field(default_factory=dict)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


def openat2(dirfd: int, path: str, flags: int, resolve: int = RESOLVE) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, 0, resolve)
    name = os.fsencode(path)
    while True:
        try:
            return libc.syscall(SYS_OPENAT2, ctypes.c_int(dirfd), ctypes.c_char_p(name),
                                ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
        except OSError as exc:
            if exc.errno == errno.EAGAIN:  # a rename raced the lookup; nothing else writes here
                continue
            if exc.errno == errno.ENOSYS:
                raise LayerRejected("unsupported",
                                    "unpacking needs openat2 (Linux 5.6 or later)") from None
            raise OSError(exc.errno, exc.strerror, path) from None


def entry_name(name: str, what: str = "entry") -> str:
    """The layer's name for an entry, normalized; refused if it could leave the root."""
    if "\0" in name or len(os.fsencode(name)) > MAX_NAME_BYTES:
        raise LayerRejected("path", f"{what} name is over-long or holds a NUL")
    if name.startswith("/"):
        raise LayerRejected("path", f"{what} {name[:200]!r} is an absolute name")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise LayerRejected("path", f"{what} {name[:200]!r} goes up with '..'")
    return "/".join(parts)


class _Stream:
    """The decompressed layer as tarfile reads it: hashed for the diff_id,
    with a byte budget while tarfile reads headers (not file data)."""

    def __init__(self, raw: BinaryIO):
        self.raw = raw
        self.hash = hashlib.sha256()
        self.header_budget: int | None = None

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size if size is not None and size >= 0 else CHUNK)
        self.hash.update(data)
        if self.header_budget is not None:
            self.header_budget -= len(data)
            if self.header_budget < 0:
                raise LayerRejected("too_large", f"an entry's headers are over "
                                                 f"{MAX_HEADER_BYTES} bytes")
        return data

    def drain(self, limit: int) -> None:
        while self.raw and (data := self.read(CHUNK)):
            limit -= len(data)
            if limit < 0:
                raise LayerRejected("too_large", "the layer has more than "
                                                 f"{MAX_TRAILER_BYTES} bytes after its end")


def _decompressed(blob: BinaryIO, media_type: str) -> BinaryIO:
    compression = LAYERS[media_type]
    if compression == "gzip":
        return gzip.GzipFile(fileobj=blob, mode="rb")
    if compression == "zstd":
        raise LayerRejected("unsupported", "zstd-compressed layers are not supported (Python's "
                                           "standard library has no zstd); re-save the image "
                                           "with gzip layers")
    return blob


class _Root:
    def __init__(self, root_fd: int):
        self.fd = root_fd

    def open_dir(self, rel: str, create: bool, flags: int = os.O_PATH) -> int:
        """An fd of directory `rel` resolved under the root (invariant 2);
        missing directories are made (0755) when `create`."""
        if not rel:
            return openat2(self.fd, ".", flags | os.O_DIRECTORY)
        try:
            return openat2(self.fd, rel, flags | os.O_DIRECTORY)
        except FileNotFoundError:
            if not create:
                raise
        except NotADirectoryError:
            raise LayerRejected("path", f"{rel[:200]!r} is not a directory") from None
        except OSError as exc:
            raise self._refusal(rel, exc) from None
        done = ""
        for part in rel.split("/"):
            parent = self.open_dir(done, create=False)
            try:
                os.mkdir(part, 0o755, dir_fd=parent)
            except FileExistsError:
                pass
            finally:
                os.close(parent)
            done = f"{done}/{part}" if done else part
            try:
                os.close(openat2(self.fd, done, os.O_PATH | os.O_DIRECTORY))
            except FileNotFoundError:
                raise LayerRejected("path", f"{done[:200]!r} is a symlink to nowhere, and "
                                            "an entry needs a directory there") from None
            except NotADirectoryError:
                raise LayerRejected("path", f"{done[:200]!r} is not a directory") from None
            except OSError as exc:
                raise self._refusal(done, exc) from None
        return openat2(self.fd, rel, flags | os.O_DIRECTORY)

    @staticmethod
    def _refusal(rel: str, exc: OSError) -> LayerRejected:
        if exc.errno == errno.ELOOP:
            return LayerRejected("path", f"{rel[:200]!r} has too many symlinks")
        if exc.errno == errno.EXDEV:
            return LayerRejected("path", f"{rel[:200]!r} crosses a mount")
        return LayerRejected("path", f"{rel[:200]!r}: {exc.strerror}")


def _lstat(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _remove(name: str, dir_fd: int) -> None:
    st = _lstat(name, dir_fd)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)  # fd-based: never follows a symlink
    else:
        os.unlink(name, dir_fd=dir_fd)


def _split(name: str) -> tuple[str, str]:
    parent, _, base = name.rpartition("/")
    return parent, base


class _Layer:
    def __init__(self, root: _Root, budget: Budget):
        self.root = root
        self.budget = budget
        self.written: set[str] = set()

    def apply(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> int:
        """Apply one entry; returns how many of its data bytes it left for
        tarfile to skip (a whiteout's, which should have none)."""
        name = entry_name(member.name)
        limits = self.budget.limits
        self.budget.entries += 1
        if self.budget.entries > limits.max_entries:
            raise LayerRejected("too_large", f"the image has more than {limits.max_entries} "
                                             "entries")
        if not name:
            return 0  # the root itself: its mode is the store's
        parent, base = _split(name)
        if base.startswith(WHITEOUT):
            if member.isreg() and member.size > limits.max_file_bytes:
                raise LayerRejected("too_large", f"whiteout {name[:200]!r} carries "
                                                 f"{member.size} bytes")
            self._whiteout(parent, base)
            return member.size if member.isreg() else 0
        if member.ischr() or member.isblk() or member.isfifo():
            kind = "devices" if member.ischr() or member.isblk() else "fifos"
            self.budget.skipped[kind] = self.budget.skipped.get(kind, 0) + 1
            return 0
        if member.issparse():
            raise LayerRejected("entry_type", f"{name[:200]!r} is a sparse file")
        if not (member.isdir() or member.isreg() or member.issym() or member.islnk()):
            raise LayerRejected("entry_type", f"{name[:200]!r} has entry type "
                                              f"{member.type!r}")
        parent_fd = self.root.open_dir(parent, create=True)
        try:
            if member.isdir():
                self._directory(member, base, parent_fd)
            elif member.isreg():
                self._file(tar, member, name, base, parent_fd)
            elif member.issym():
                if "\0" in member.linkname or len(os.fsencode(member.linkname)) > MAX_NAME_BYTES:
                    raise LayerRejected("path", f"{name[:200]!r}'s target is over-long or "
                                                "holds a NUL")
                _remove(base, parent_fd)
                os.symlink(member.linkname, base, dir_fd=parent_fd)
            else:
                self._hard_link(member, name, base, parent_fd)
        finally:
            os.close(parent_fd)
        self.written.add(name)
        return 0

    def _directory(self, member: tarfile.TarInfo, base: str, parent_fd: int) -> None:
        st = _lstat(base, parent_fd)
        if st is not None and not stat.S_ISDIR(st.st_mode):
            os.unlink(base, dir_fd=parent_fd)
            st = None
        if st is None:
            os.mkdir(base, 0o700, dir_fd=parent_fd)
        fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=parent_fd)
        try:
            os.fchmod(fd, (member.mode & FILE_MODE_MASK) | 0o700)
        finally:
            os.close(fd)

    def _file(self, tar: tarfile.TarFile, member: tarfile.TarInfo, name: str, base: str,
              parent_fd: int) -> None:
        limits = self.budget.limits
        if member.size > limits.max_file_bytes:
            raise LayerRejected("too_large", f"{name[:200]!r} is {member.size} bytes, over "
                                             f"{limits.max_file_bytes}")
        self.budget.unpacked_bytes += member.size
        if self.budget.unpacked_bytes > limits.max_unpacked_bytes:
            raise LayerRejected("too_large", f"the image unpacks to more than "
                                             f"{limits.max_unpacked_bytes} bytes")
        _remove(base, parent_fd)
        fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=parent_fd)
        try:
            source = tar.extractfile(member)
            left = member.size
            while left:
                data = source.read(min(CHUNK, left))
                if not data:
                    raise LayerRejected("malformed", f"{name[:200]!r} is truncated")
                left -= len(data)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            os.fchmod(fd, member.mode & FILE_MODE_MASK)
            os.utime(fd, ns=(member.mtime * 10**9,) * 2)
        finally:
            os.close(fd)

    def _hard_link(self, member: tarfile.TarInfo, name: str, base: str, parent_fd: int) -> None:
        target = entry_name(member.linkname, "hard link target")
        target_parent, target_base = _split(target)
        if not target_base:
            raise LayerRejected("hard_link", f"{name[:200]!r} links to the root")
        try:
            target_fd = self.root.open_dir(target_parent, create=False)
        except FileNotFoundError:
            raise LayerRejected("hard_link", f"{name[:200]!r} links to {target[:200]!r}, "
                                             "which is not in the image") from None
        try:
            st = _lstat(target_base, target_fd)
            if st is None or not stat.S_ISREG(st.st_mode):
                raise LayerRejected("hard_link", f"{name[:200]!r} links to {target[:200]!r}, "
                                                 "which is not a regular file in the image")
            if target == name:
                return  # a link to itself: the file is already there
            _remove(base, parent_fd)
            os.link(target_base, base, src_dir_fd=target_fd, dst_dir_fd=parent_fd,
                    follow_symlinks=False)
        finally:
            os.close(target_fd)

    def _whiteout(self, parent: str, base: str) -> None:
        try:
            parent_fd = self.root.open_dir(parent, create=False, flags=os.O_RDONLY)
        except FileNotFoundError:
            return  # nothing below to hide
        try:
            if base == OPAQUE:
                for child in os.listdir(parent_fd):
                    if (f"{parent}/{child}" if parent else child) not in self.written:
                        _remove(child, parent_fd)
            elif base.startswith(WHITEOUT + WHITEOUT):
                pass  # aufs bookkeeping (.wh..wh.plnk and kin), not a whiteout
            else:
                hidden = base[len(WHITEOUT):]
                if hidden in ("", ".", "..") or "/" in hidden:
                    raise LayerRejected("path", f"whiteout {base[:200]!r} names no entry")
                if (f"{parent}/{hidden}" if parent else hidden) not in self.written:
                    _remove(hidden, parent_fd)
        finally:
            os.close(parent_fd)


def unpack_layer(blob: BinaryIO, media_type: str, diff_id: str, root_fd: int,
                 budget: Budget) -> None:
    """Apply the layer `blob` (already verified against its descriptor) under
    the directory `root_fd`; raises LayerRejected on any rule above."""
    stream = _Stream(_decompressed(blob, media_type))
    layer = _Layer(_Root(root_fd), budget)
    try:
        stream.header_budget = MAX_HEADER_BYTES  # open() reads the first header
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            unread = 0
            while True:
                stream.header_budget = MAX_HEADER_BYTES + unread
                member = tar.next()
                stream.header_budget = None
                if member is None:
                    break
                tar.members.clear()  # tarfile keeps every header; a layer may have millions
                unread = layer.apply(tar, member)
        stream.drain(MAX_TRAILER_BYTES)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise LayerRejected("malformed", f"layer {diff_id[:19]} is not a readable tar: "
                                         f"{exc}") from None
    actual = "sha256:" + stream.hash.hexdigest()
    if actual != diff_id:
        raise LayerRejected("digest", f"layer {diff_id[:19]} unpacks to {actual[:19]}, not "
                                      "the diff_id its config names")
