"""The agent's workspace (`<state>/sandboxes/<name>/workspace`, DESIGN §4): a
filesystem of its own, so that an agent filling it fills nothing else — not
the filesystem that holds the keyrings and the audit log.

Root mode: `workspace.img` beside it is an ext4 image of config
`filesystem.workspace_mb`, loop-mounted (nosuid, nodev) on `workspace/` when
a run starts. Its whole size is reserved on the state filesystem (fallocate)
while mounted, so the agent's writes never allocate there: a full workspace
is ENOSPC inside the sandbox, and a start that cannot reserve the space
fails. The image never takes more than its size on the state filesystem,
whatever the agent does: space it gives back during the run (by punching
holes) was reserved at the start, and is only the agent's to lose. A
host-wide fstrim (fstrim.timer) gives free blocks of a mounted image back:
the daemon's supervision takes them again (keep_reserved). When the
run ends the image's unused part is given back (FITRIM punches it out of the
image) and the image unmounted; its contents persist. A plain workspace
directory from before is copied into the image once.

Rootless (no loop mounts for a user) and `workspace_mb = 0` keep a plain
directory with no size limit; the filesystem layer says so (warning,
`layer.unavailable`, `degraded`).
"""

import os
from pathlib import Path

from tappass_host import libc, loopdev
from tappass_host.errors import TappassError
from tappass_host.paths import SandboxPaths
from tappass_host.processes import wait_until

# noinit_itable: the kernel would zero the inode tables in the background, and a
# loop device zeroes by punching holes, giving back reserved space (nosuid, nodev:
# tappass_host.loopdev)
MOUNT_OPTIONS = "noinit_itable"
MIB = 1024 * 1024
RELEASED_WAIT_S = 2.0  # for the filesystem to be gone everywhere before a trim on a mount of its own
FITRIM = 0xC0185879  # _IOWR('X', 121, struct fstrim_range)
SYS_BLOCK = "/sys/dev/block"


class WorkspaceError(TappassError):
    """The workspace cannot be made, mounted or reserved."""


def image_of(sandbox: SandboxPaths) -> Path:
    return sandbox.workspace_image


def limited(size_mb: int, rootless: bool) -> bool:
    """Whether the workspace gets a filesystem of its own."""
    return size_mb > 0 and not rootless


def attach(sandbox: SandboxPaths, size_mb: int, uid: int, gid: int,
           rootless: bool) -> tuple[str, ...]:
    """Make the workspace ready for a run, owned by the agent (uid, gid on the
    host); returns warnings."""
    workspace = sandbox.workspace
    if not limited(size_mb, rootless):
        workspace.mkdir(parents=True, exist_ok=True)
        _give(workspace, uid, gid)
        return ()
    image = image_of(sandbox)
    if not _mounted_here(sandbox):
        if not image.exists():
            _create(sandbox, size_mb)
        elif _has_entries(workspace):
            raise WorkspaceError(
                f"{workspace} holds files outside its image {image}: move them away "
                "(they would be hidden under the workspace's mount)")
        workspace.mkdir(parents=True, exist_ok=True)
        _mount(image, workspace)
    try:
        _reserve(image)
        _give(workspace, uid, gid)
    except BaseException:
        release(sandbox)
        raise
    have = image.stat().st_size // MIB
    if have != size_mb:
        return (f"the workspace keeps its size of {have} MiB (config filesystem.workspace_mb "
                f"is {size_mb}; an existing workspace is not resized: remove {image} to "
                "start afresh)",)
    return ()


def keep_reserved(sandbox: SandboxPaths) -> None:
    """Reserve a mounted workspace's image again: a host-wide fstrim (e.g.
    fstrim.timer's) gives its free blocks back to the state filesystem. What
    it refilled is noted (workspace_refilled) for `release`."""
    image = image_of(sandbox)
    try:
        mounted = os.stat(sandbox.workspace).st_dev != os.stat(sandbox.root).st_dev
        st = os.stat(image)
    except FileNotFoundError:
        return
    if not mounted:
        return
    if st.st_blocks * 512 < st.st_size:  # trimmed while mounted
        try:
            sandbox.workspace_refilled.touch()
        except OSError:
            pass  # then the next release gives back less: no harm to the run
    _reserve(image)


def release(sandbox: SandboxPaths) -> None:
    """After a run: give the image's unused space back and unmount the
    workspace. A workspace still busy stays mounted (the next start uses it as
    it is), its space reserved again.

    The unused space is trimmed on the workspace's own mount, unless
    keep_reserved refilled the image after a trim during the run: ext4 skips
    the block groups it trimmed before on the same mount, so those are trimmed
    on a mount of their own, after the unmount."""
    if not _mounted_here(sandbox):
        return
    refilled = sandbox.workspace_refilled.exists()
    if not refilled:
        _trim(sandbox.workspace)
    if not _unmount(sandbox.workspace):
        _reserve(image_of(sandbox))
        return
    sandbox.workspace_refilled.unlink(missing_ok=True)
    if refilled:
        _trim_on_own_mount(sandbox)


def _trim_on_own_mount(sandbox: SandboxPaths) -> None:
    """Once the filesystem is gone everywhere: the container's mount namespace,
    which had it too, may outlive the run by a moment, and a mount meanwhile
    would be of the same filesystem (the same device, the same trimmed groups)."""
    image = image_of(sandbox)
    if not wait_until(lambda: not loopdev.bound_devices(os.stat(image)), RELEASED_WAIT_S):
        return  # still in use somewhere: the space stays reserved, as for a busy workspace
    mountpoint = sandbox.workspace_trim_mount
    mountpoint.mkdir(mode=0o700, exist_ok=True)
    try:
        try:
            _mount(image, mountpoint)
        except WorkspaceError:
            return  # as before: a failed trim only keeps the space reserved
        _trim(mountpoint)
        _unmount(mountpoint)
    finally:
        try:
            mountpoint.rmdir()
        except OSError:
            pass  # still mounted (busy): a later release removes it


def _give(workspace: Path, uid: int, gid: int) -> None:
    """The workspace to the agent: its root and, when the sandbox's agent ids
    have moved since the last run (tappass_host.ids: the root belongs to
    other ids than root's), the files the last ids owned."""
    if os.geteuid() == 0:
        st = os.lstat(workspace)
        if st.st_uid != 0 and (st.st_uid, st.st_gid) != (uid, gid):
            _hand_over(workspace, st.st_dev, (st.st_uid, st.st_gid), (uid, gid))
        os.chown(workspace, uid, gid)
    os.chmod(workspace, 0o700)


def _hand_over(top: Path, device: int, old: tuple[int, int], new: tuple[int, int]) -> None:
    """Give every entry under `top` that `old` (uid, gid) owned to `new`:
    symlinks themselves (never followed), nothing on another filesystem. The
    agent is not running (start holds the host lock)."""
    for directory, subdirectories, files in os.walk(top):
        for name in [*subdirectories, *files]:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            if st.st_dev != device:
                if name in subdirectories:
                    subdirectories.remove(name)  # a mount inside: not ours to change
                continue
            uid = new[0] if st.st_uid == old[0] else -1
            gid = new[1] if st.st_gid == old[1] else -1
            if (uid, gid) != (-1, -1):
                os.lchown(path, uid, gid)


def _has_entries(directory: Path) -> bool:
    try:
        with os.scandir(directory) as entries:
            return next(entries, None) is not None
    except FileNotFoundError:
        return False


def _create(sandbox: SandboxPaths, size_mb: int) -> None:
    """A new image; a plain workspace directory's contents are copied in
    before the image takes its name, so a crash half-way loses nothing."""
    image = image_of(sandbox)
    staging = image.with_name(image.name + ".tmp")
    staging.unlink(missing_ok=True)
    try:
        with open(staging, "xb") as f:
            os.fchmod(f.fileno(), 0o600)
            os.ftruncate(f.fileno(), size_mb * MIB)
        # nodiscard: mkfs would punch the image's blocks out again.
        _run([_mkfs(), "-q", "-F", "-t", "ext4", "-m", "0",
              "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1", str(staging)])
        mountpoint = sandbox.workspace_new_mount
        mountpoint.mkdir(mode=0o700, exist_ok=True)
        _mount(staging, mountpoint)
        try:
            os.rmdir(mountpoint / "lost+found")
            if _has_entries(sandbox.workspace):
                _run(["cp", "-a", "--", f"{sandbox.workspace}/.", f"{mountpoint}/"])
        finally:
            _unmount(mountpoint)
            mountpoint.rmdir()
        os.rename(staging, image)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    if _has_entries(sandbox.workspace):  # copied into the image above
        import shutil

        for entry in list(sandbox.workspace.iterdir()):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def _mkfs() -> str:
    import shutil

    found = shutil.which("mkfs.ext4") or shutil.which("mkfs.ext4", path="/usr/sbin:/sbin")
    if not found:
        raise WorkspaceError("mkfs.ext4 is not installed (apt-get install -y e2fsprogs); "
                             "it makes the workspace's filesystem")
    return found


def _mount(image: Path, mountpoint: Path) -> None:
    """The image's filesystem on `mountpoint` through a loop device: the one
    already bound to this image (mounted in another mount namespace), or a new
    one (tappass_host.loopdev)."""
    try:
        loopdev.mount(image, mountpoint, "ext4", MOUNT_OPTIONS)
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        raise WorkspaceError(f"workspace: mount: {exc.strerror or exc}{where}") from None


def _reserve(image: Path) -> None:
    fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as exc:
        raise WorkspaceError(
            f"cannot reserve {os.fstat(fd).st_size // MIB} MiB for the workspace {image}: "
            f"{exc.strerror} (config filesystem.workspace_mb sets the size)") from None
    finally:
        os.close(fd)


def _unmount(mountpoint: Path) -> bool:
    """umount(2), as `umount` does for these mounts without its process: the
    loop device goes with the last unmount (mount -o loop sets autoclear)."""
    try:
        libc.umount2(mountpoint)
    except OSError:
        return False
    return True


def _trim(mountpoint: Path) -> None:
    """What `fstrim` does, without its process: FITRIM over the whole filesystem."""
    import fcntl
    import struct

    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, FITRIM, struct.pack("QQQ", 0, 2 ** 64 - 1, 0))  # start, len, minlen
    except OSError:
        pass  # as before: a failed trim only keeps the space reserved
    finally:
        os.close(fd)


def _mounted_here(sandbox: SandboxPaths) -> bool:
    """Whether the workspace is the mount of this sandbox's own image (a
    filesystem an operator mounted there is never unmounted by us)."""
    image = image_of(sandbox)
    try:
        workspace_dev = os.stat(sandbox.workspace).st_dev
        backing = os.stat(image)
    except FileNotFoundError:
        return False
    # sysfs answers the usual cases without running losetup: the workspace is
    # no loop device at all, or one whose backing file is this image.
    backing_file = ""
    if os.path.isdir(SYS_BLOCK):
        try:
            with open(f"{SYS_BLOCK}/{_maj_min(workspace_dev)}/loop/backing_file") as f:
                backing_file = f.read().rstrip("\n")
        except FileNotFoundError:
            return False  # no loop device
        except OSError:
            pass
    try:
        found = os.stat(backing_file) if backing_file.startswith("/") else None
    except OSError:
        found = None
    if found is not None and (found.st_dev, found.st_ino) == (backing.st_dev, backing.st_ino):
        return True
    # e.g. attached from another mount namespace, where the image has another path
    return workspace_dev in {device for device, _ in loopdev.bound_devices(backing)}


def _maj_min(dev: int) -> str:
    return f"{os.major(dev)}:{os.minor(dev)}"


def _run(argv: list[str], check: bool = True) -> str:
    import subprocess

    try:
        result = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise WorkspaceError(f"{argv[0]} is not installed (util-linux, e2fsprogs)") from None
    if check and result.returncode != 0:
        detail = (result.stderr.strip().splitlines() or ["failed"])[-1]
        raise WorkspaceError(f"workspace: {Path(argv[0]).name}: {detail}")
    return result.stdout
