"""systemd's notify protocol (sd_notify), without a dependency."""

import os
import socket
import threading
import time
from collections.abc import Callable

STALL_S = 300.0  # the longest one step of the main loop (one sandbox's restart) may take


def sd_notify(message: str) -> bool:
    """Send `message` to $NOTIFY_SOCKET; False when not run under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address[0] == "@":
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode(), address)
    except OSError:
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


class Watchdog:
    """WATCHDOG=1 every `interval` from a thread of its own, as long as the main loop shows
    progress (`beat`) within `stall_s`. A long step of the loop (restarting sandboxes after
    a reboot, a renewal waiting on a slow control plane) beats between sandboxes and so
    does not starve systemd's watchdog; a main loop stuck in one step for over `stall_s`,
    or a stopped process (SIGSTOP stops this thread too), stops the pings."""

    def __init__(self, interval: float, stall_s: float = STALL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self.stall_s = stall_s
        self.clock = clock
        self._beat = clock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def beat(self) -> None:
        self._beat = self.clock()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while True:
            if self.clock() - self._beat <= self.stall_s:
                sd_notify("WATCHDOG=1")
            if self._stopping.wait(self.interval):
                return
