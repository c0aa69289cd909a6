"""An ext4 image mounted through a loop device, as `mount -o loop` does it,
without its process (issue 13: two `mount` runs and subprocess's import were
a tenth of every `start --foreground --rm`).

Invariants:
- one image is never behind two loop devices: two filesystems over the same
  blocks would corrupt it. An image already bound to a device (mounted in
  another mount namespace) is mounted from that device;
- a device this module binds is freed with its last user (LO_FLAGS_AUTOCLEAR):
  the last unmount, or, when the mount fails, our own close of it;
- a device is held open from before its binding is read until the mount
  holds it. A bound device's last user may let go at any moment (udev's probe
  after the unmount that made the image, a container's mount namespace ending),
  and the autoclear that follows fails every read of it with EIO: a device we
  hold cannot begin to be cleared, and one already being cleared reads as
  unbound (LOOP_GET_STATUS64: ENXIO).

Sequence of `mount`:
  1. the image's device, if one is bound to it (sysfs lists the bound
     devices; LOOP_GET_STATUS64 names each one's backing inode), opened, and
     its binding read again through that descriptor;
  2. else a free device (LOOP_CTL_GET_FREE) bound to the open image with
     LOOP_CONFIGURE (LOOP_SET_FD + LOOP_SET_STATUS64 before Linux 5.8),
     autoclear set; a device another process took meanwhile (EBUSY) is passed
     over for the next free one;
  3. mount(2) of the device, our descriptor of it held until then.
"""

import errno
import fcntl
import os
import struct
from pathlib import Path

from tappass_host import libc

LOOP_CONTROL = "/dev/loop-control"
SYS_BLOCK = "/sys/block"
LOOP_SET_FD, LOOP_SET_STATUS64, LOOP_GET_STATUS64 = 0x4C00, 0x4C04, 0x4C05
LOOP_CONFIGURE, LOOP_CTL_GET_FREE = 0x4C0A, 0x4C82
LO_FLAGS_AUTOCLEAR = 4
# struct loop_info64: device, inode, rdevice, offset, sizelimit; number,
# encrypt_type, encrypt_key_size, flags; file_name[64], crypt_name[64],
# encrypt_key[32]; init[2]
LOOP_INFO64 = struct.Struct("=QQQQQIIII64s64s32sQQ")
LOOP_CONFIG = struct.Struct(f"=II{LOOP_INFO64.size}s64x")  # fd, block_size, info, reserved
MS_NOSUID, MS_NODEV = 2, 4
ATTEMPTS = 16  # free devices taken by others before we give up


class LoopError(OSError):
    """A loop device could not be set up or mounted (errno, one-line reason)."""


def mount(image: Path, mountpoint: Path, fstype: str, options: str) -> None:
    """Mount the filesystem in `image` on `mountpoint` (nosuid, nodev)."""
    device, held = _hold_bound(os.stat(image))
    if device is None:
        device, held = _bind_free(image)
    try:
        _mount(device, mountpoint, fstype, options)
    finally:
        os.close(held)  # the mount holds it now; a failed mount: the last close frees ours


def bound_devices(backing: os.stat_result) -> list[tuple[int, str]]:
    """(device number, name) of each loop device bound to `backing`."""
    found = []
    for name in _bound_names():
        if _backs(_status(f"/dev/{name}"), backing):
            try:
                found.append((os.stat(f"/dev/{name}").st_rdev, name))
            except OSError:
                pass
    return found


def _bound_names() -> list[str]:
    """The loop devices sysfs lists as bound (to any image)."""
    try:
        names = [n for n in os.listdir(SYS_BLOCK) if n.startswith("loop")]
    except OSError:
        return []
    return [n for n in sorted(names) if os.path.isdir(f"{SYS_BLOCK}/{n}/loop")]


def _hold_bound(backing: os.stat_result) -> tuple[str | None, int | None]:
    """A device bound to `backing`, and our open descriptor of it, which keeps it
    bound: its binding is read through that descriptor (a device being cleared,
    or cleared and bound to another image since sysfs listed it, is passed over)."""
    for name in _bound_names():
        device = f"/dev/{name}"
        try:
            fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
        if _backs(_status_of(fd), backing):
            return device, fd
        os.close(fd)
    return None, None


def _backs(info: tuple | None, backing: os.stat_result) -> bool:
    return info is not None and info[1] == backing.st_ino and (
        os.major(info[0]), os.minor(info[0])) == (os.major(backing.st_dev),
                                                  os.minor(backing.st_dev))


def _status(device: str) -> tuple | None:
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _status_of(fd)
    finally:
        os.close(fd)


def _status_of(fd: int) -> tuple | None:
    try:
        return LOOP_INFO64.unpack(fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(LOOP_INFO64.size)))
    except OSError:  # not bound (ENXIO): never bound, or being cleared
        return None


def _bind_free(image: Path) -> tuple[str, int]:
    """A free loop device bound to `image`: its path, and our open descriptor of it."""
    try:
        control = os.open(LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise LoopError(errno.ENODEV, f"this host has no loop devices ({LOOP_CONTROL} is "
                                      "missing: load the loop module, modprobe loop)") from None
    backing = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        for _ in range(ATTEMPTS):
            device = f"/dev/loop{fcntl.ioctl(control, LOOP_CTL_GET_FREE)}"
            fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
            try:
                _configure(fd, backing, os.fsencode(image)[-63:])
            except OSError as exc:
                os.close(fd)
                if exc.errno == errno.EBUSY:  # taken by another process meanwhile
                    continue
                raise LoopError(exc.errno, f"cannot bind {device} to {image}: "
                                           f"{os.strerror(exc.errno)}") from None
            return device, fd
        raise LoopError(errno.EBUSY, f"no free loop device for {image} after {ATTEMPTS} tries")
    finally:
        os.close(backing)
        os.close(control)


def _configure(fd: int, backing: int, name: bytes) -> None:
    info = LOOP_INFO64.pack(0, 0, 0, 0, 0, 0, 0, 0, LO_FLAGS_AUTOCLEAR, name, b"", b"", 0, 0)
    try:
        fcntl.ioctl(fd, LOOP_CONFIGURE, LOOP_CONFIG.pack(backing, 0, info))
        return
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTTY):  # Linux < 5.8: no LOOP_CONFIGURE
            raise
    fcntl.ioctl(fd, LOOP_SET_FD, backing)
    try:
        fcntl.ioctl(fd, LOOP_SET_STATUS64, info)
    except OSError:
        fcntl.ioctl(fd, 0x4C01)  # LOOP_CLR_FD: not left bound without autoclear
        raise


def _mount(device: str, mountpoint: Path, fstype: str, options: str) -> None:
    try:
        libc.mount(device, mountpoint, fstype, MS_NOSUID | MS_NODEV, options)
    except OSError as exc:
        raise LoopError(exc.errno, f"cannot mount {device} as {fstype} on {mountpoint}: "
                                   f"{exc.strerror}") from None
