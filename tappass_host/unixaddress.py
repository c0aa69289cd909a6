"""AF_UNIX addresses for sockets in directories of any depth.

A socket path is limited to 108 bytes, state directories are not (tests put
them deep under /tmp). Going through a descriptor of the socket's directory,
`/proc/self/fd/<fd>/<name>` is always short and names the same file.
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def short_address(path: Path) -> Iterator[str]:
    """A short address of `path`, valid inside the `with` block."""
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)
