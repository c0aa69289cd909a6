"""The system calls Python's os module lacks (mount, umount2, setns, unshare,
prctl, renameat2, syncfs, and syscall(2) for those glibc has no wrapper for),
through one handle on the C library, loaded by the first call: ctypes is
imported only by a command that makes one.

A call that fails raises OSError(errno, strerror); the caller adds what it was
doing. The sandbox's Landlock launcher (sandbox_launcher) keeps its own handle:
it runs inside the sandbox without this package.
"""

import os

AT_FDCWD = -100

_handle = None


def _libc():
    global _handle
    if _handle is None:
        import ctypes

        handle = ctypes.CDLL(None, use_errno=True)
        handle.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                                 ctypes.c_ulong, ctypes.c_char_p)
        handle.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
        handle.renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
                                     ctypes.c_char_p, ctypes.c_uint)
        handle.syscall.restype = ctypes.c_long
        _handle = handle
    return _handle


def _checked(result: int) -> int:
    if result == -1:
        import ctypes

        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def _bytes(value) -> bytes | None:
    return None if value is None else os.fsencode(value)


def mount(source, target, fstype, flags: int = 0, data: str | None = None) -> None:
    _checked(_libc().mount(_bytes(source), _bytes(target), _bytes(fstype), flags,
                           _bytes(data)))


def umount2(target, flags: int = 0) -> None:
    _checked(_libc().umount2(os.fsencode(target), flags))


def setns(fd: int, nstype: int) -> None:
    _checked(_libc().setns(fd, nstype))


def unshare(flags: int) -> None:
    _checked(_libc().unshare(flags))


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _checked(_libc().prctl(option, arg2, arg3, arg4, arg5))


def renameat2(old, new, flags: int) -> None:
    _checked(_libc().renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags))


def syncfs(fd: int) -> None:
    _checked(_libc().syncfs(fd))


def syscall(number: int, *args) -> int:
    """syscall(2); `args` as ctypes values of the kernel's types."""
    import ctypes

    return _checked(_libc().syscall(ctypes.c_long(number), *args))
