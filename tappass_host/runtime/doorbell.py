"""The daemon's doorbell: how it learns at once that a sandbox changed state.

The exit hook conmon runs (`_exited`)
records and audits the exit, then rings the *doorbell*, a datagram socket
in the runtime dir that the daemon listens on; the daemon wakes at once. No
polling loop is needed for promptness; the daemon's periodic rescan (every
couple of seconds, for new enrollments) doubles as a safety net, e.g. for an
exit that happened while no daemon was running. A socket rather than
inotify: no ctypes, no watch per sandbox, and a hook without a listening
daemon just gets ECONNREFUSED.
"""

import os

from tappass_host.paths import HostPaths
from tappass_host.unixaddress import short_address


def ring(paths: HostPaths, name: str) -> None:
    """Tell a listening daemon that `name` changed state; silent if none listens."""
    # The C module: `socket` builds its enums at import, a few ms of every exit hook.
    import _socket

    try:
        with short_address(paths.daemon_socket) as address:
            sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC)
            try:
                sock.setblocking(False)
                sock.sendto(name.encode(), address)
            finally:
                sock.close()
    except OSError:
        pass  # no daemon, or its queue is full: its next rescan sees the exit anyway


class Doorbell:
    """The daemon's end: a datagram socket that wakes it up."""

    def __init__(self, paths: HostPaths):
        import socket

        paths.runtime.mkdir(parents=True, exist_ok=True)
        self.path = paths.daemon_socket
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        with short_address(self.path) as address:
            try:
                os.unlink(address)  # a previous daemon's
            except FileNotFoundError:
                pass
            self.sock.bind(address)
            os.chmod(address, 0o600)

    def wait(self, timeout: float) -> set[str]:
        """Names rung within `timeout` seconds (empty when it timed out)."""
        import select
        import socket

        ready, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        names = set()
        while ready:
            try:
                names.add(self.sock.recv(256, socket.MSG_DONTWAIT).decode(errors="replace"))
            except BlockingIOError:
                break
        return names

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)
