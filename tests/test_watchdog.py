"""systemd's watchdog is not starved while the daemon's main loop waits: a real daemon with
WATCHDOG_USEC set pings the NOTIFY_SOCKET this test listens on while its certificate renewal
hangs on a control plane that takes the request and never answers (the renewal gives up at
its own timeout). Under systemd, a gap longer than WatchdogSec gets a working daemon killed,
over and over while the control plane is slow, or while it restarts sandboxes after a reboot.
"""

import socket
import threading
import time
from pathlib import Path

import patience
from daemon_fixture import *  # noqa: F403
from daemon_fixture import SYNC_CONFIG, enroll
from devplane_fixture import wait_for
from tappass_host import sandbox_record
from test_bounded_answers import HostileControlPlane


class SilentControlPlane(HostileControlPlane):
    """A certificate request is taken and never answered (held until the client hangs up)."""

    def __init__(self, devplane, directory: Path):
        super().__init__(devplane, directory, bomb=b"")
        self.answers["/certificate"] = "held"
        self.held_at: float | None = None  # when the renewal's request was in
        self.given_up_at: float | None = None  # when its client hung up

    def _held(self, handler):
        if self.held_at is not None:
            self._unavailable(handler)
            return
        self.held_at = time.monotonic()
        handler.connection.settimeout(patience.seconds(120))
        try:
            handler.rfile.read(1)  # b"" once the client hangs up
        except OSError:
            pass
        self.given_up_at = time.monotonic()
        handler.close_connection = True


class NotifyListener:
    """The NOTIFY_SOCKET: every datagram with the time it came."""

    def __init__(self, path: Path):
        self.address = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.address)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, bytes]] = []
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closing.is_set():
            try:
                data = self.sock.recv(256)
            except socket.timeout:
                continue
            self.messages.append((time.monotonic(), data))

    def pings_between(self, start: float, end: float) -> int:
        return sum(1 for at, data in self.messages if data == b"WATCHDOG=1" and start < at < end)

    def close(self) -> None:
        self._closing.set()
        self._thread.join()
        self.sock.close()


def test_the_watchdog_is_pinged_while_a_renewal_hangs_on_the_control_plane(
        make_devplane, host, tmp_path, daemons, name):
    devplane = make_devplane(cert_ttl=patience.seconds(4))  # renewal due at about half of it
    host.config.write_text(SYNC_CONFIG)
    enroll(devplane, host, name)
    silent = SilentControlPlane(devplane, tmp_path)
    record = sandbox_record.load(host.paths, name)
    record = record._replace(sync_url=silent.url)
    sandbox_record.save(host.paths.sandbox(name), record)
    listener = NotifyListener(tmp_path / "notify.sock")
    try:
        daemon = daemons(host, env={"NOTIFY_SOCKET": listener.address,
                                    "WATCHDOG_USEC": "500000"})
        wait_for(lambda: silent.held_at is not None, timeout=60)
        wait_for(lambda: silent.given_up_at is not None, timeout=60)
        daemon.wait_line(f"{name}: certificate renewal failed")
        assert any(data == b"READY=1" for _, data in listener.messages)
        # the main loop sat in the renewal all along; the pings went on (every 0.25 s)
        during = listener.pings_between(silent.held_at, silent.given_up_at)
        assert during >= 2, (f"{during} WATCHDOG=1 in the "
                             f"{silent.given_up_at - silent.held_at:.1f} s the renewal hung")
        # and after it, still
        after = time.monotonic()
        wait_for(lambda: listener.pings_between(after, float("inf")) >= 2)
    finally:
        listener.close()
        silent.close()


def test_a_main_loop_stuck_past_its_stall_bound_is_left_to_systemd(tmp_path, monkeypatch):
    """The other half: pings come only while the loop moves on. A loop that has not beaten
    for over `stall_s` (hung in one step) gets no more pings, so systemd restarts the daemon;
    a beat brings them back."""
    from tappass_host.daemon.notify import Watchdog

    listener = NotifyListener(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
    now = [0.0]
    watchdog = Watchdog(0.02, stall_s=10.0, clock=lambda: now[0])
    watchdog.start()
    try:
        wait_for(lambda: listener.pings_between(0, float("inf")) >= 2)
        now[0] = 10.5  # no beat for 10.5 s of the loop's clock
        time.sleep(0.1)  # a ping already on its way
        quiet_since = time.monotonic()
        time.sleep(patience.seconds(0.5))  # 25 intervals
        assert listener.pings_between(quiet_since, float("inf")) == 0
        watchdog.beat()
        again = time.monotonic()
        wait_for(lambda: listener.pings_between(again, float("inf")) >= 2)
    finally:
        watchdog.stop()
        listener.close()
