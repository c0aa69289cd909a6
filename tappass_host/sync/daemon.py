"""`tappass-host daemon`: one SSE stream per enrolled sandbox (DESIGN §7).

Each sandbox gets a worker thread: pull the latest keyring, then hold the
event stream from the current policy_version; every event goes through
`receive` (the keyring core, then live limits) and is acknowledged. A broken
or stalled stream is reopened after a capped, jittered backoff; the last
good keyring stays in place meanwhile. The main thread rescans the state
directory for sandboxes enrolled or removed, renews certificates when due,
and pings systemd. Everything waits on events with timeouts: an idle daemon
sleeps.
"""

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from tappass_host.errors import TappassError
from tappass_host.keyring.verify import Limits
from tappass_host.paths import HostPaths
from tappass_host.sync.backoff import Backoff
from tappass_host.sync.notify import sd_notify, watchdog_interval
from tappass_host.sync.receive import APPLIED, is_current, receive
from tappass_host.sync.renewal import RenewalSchedule
from tappass_host.sync.transport import SyncClient, SyncError, SyncTransport

Log = Callable[[str], None]
READY_WAIT_S = 10.0
JOIN_S = 5.0


@dataclass(frozen=True)
class SyncSettings:
    keepalive_timeout: float = 45.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    limits: Limits = Limits()
    rescan_interval: float = 2.0

    @classmethod
    def from_config(cls, config) -> "SyncSettings":
        return cls(keepalive_timeout=float(config["sync.keepalive_timeout_s"]),
                   backoff_initial=float(config["sync.backoff_initial_s"]),
                   backoff_max=float(config["sync.backoff_max_s"]),
                   limits=Limits(**config["limits"]))


def current_version(paths: HostPaths, name: str) -> int | None:
    from tappass_host import sandbox as sandbox_record
    from tappass_host.keyring.update import store_for

    version = store_for(paths, sandbox_record.load(paths, name)).current_version()
    return version.policy_version if version else None


class SandboxWorker:
    """Keeps one sandbox's keyring in step with the control plane."""

    def __init__(self, paths: HostPaths, name: str, settings: SyncSettings,
                 transport: SyncTransport, log: Log):
        self.paths = paths
        self.name = name
        self.settings = settings
        self.transport = transport
        self.log = log
        self.stopping = threading.Event()
        self.settled = threading.Event()  # the first stream is open, or failed once
        self._thread = threading.Thread(target=self._run, name=f"sync-{name}", daemon=True)
        self._last_rejected: bytes | None = None
        self._trouble: str | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.transport.abort()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        backoff = Backoff(self.settings.backoff_initial, self.settings.backoff_max)
        while not self.stopping.is_set():
            try:
                self._session(backoff)
            except SyncError as exc:
                self._troubled(exc.reason, str(exc))
            except TappassError as exc:
                self._troubled("error", str(exc))
            self.settled.set()
            if self.stopping.wait(backoff.next_delay()):
                break

    def _session(self, backoff: Backoff) -> None:
        data = self.transport.pull_latest(self.name)
        backoff.reset()
        if data is not None and not is_current(self.paths, self.name, data):
            self._handle(data, None)
        since = current_version(self.paths, self.name)
        for event in self.transport.events(self.name, since,
                                           on_open=lambda: self._opened(since)):
            if self.stopping.is_set():
                return
            self._handle(event.data, event.id)

    def _opened(self, since: int | None) -> None:
        again = " again" if self._trouble else ""
        self._trouble = None
        self.log(f"{self.name}: stream open{again} (policy_version {since})")
        self.settled.set()

    def _troubled(self, reason: str, message: str) -> None:
        if self.stopping.is_set():
            return
        if reason != self._trouble:  # one line per outage, not per retry
            self.log(f"{self.name}: {message}; retrying with backoff, "
                     f"keeping policy_version {self._version_text()}")
        self._trouble = reason

    def _version_text(self) -> str:
        try:
            return str(current_version(self.paths, self.name))
        except TappassError:
            return "None"

    def _handle(self, data: bytes, event_id: int | None) -> None:
        if data == self._last_rejected:
            return  # resent on reconnect: rejected, audited and acked already
        outcome = receive(self.paths, self.name, data, limits=self.settings.limits,
                          claimed_version=event_id)
        if outcome.status == APPLIED:
            self._last_rejected = None
            line = f"{self.name}: applied policy_version {outcome.policy_version}"
            if outcome.resources is not None:
                line += f"; process limits updated live (pids {outcome.resources['pids']['limit']})"
            if outcome.live_error:
                line += f"; live limits NOT applied: {outcome.live_error}"
        else:
            self._last_rejected = data
            line = f"{self.name}: rejected policy_version {outcome.policy_version}: " \
                   f"{outcome.reason}"
        self.log(line)
        try:
            self.transport.ack(self.name, outcome.policy_version or 0, outcome.status,
                               outcome.reason)
        except SyncError as exc:
            self.log(f"{self.name}: ack of policy_version {outcome.policy_version} failed: {exc}")


class Daemon:
    def __init__(self, paths: HostPaths, settings: SyncSettings, log: Log,
                 transport_factory: Callable[[], SyncTransport] | None = None):
        self.paths = paths
        self.settings = settings
        self.log = log
        self.transport_factory = transport_factory or (
            lambda: SyncClient(paths, keepalive_timeout=settings.keepalive_timeout))
        self.stopping = threading.Event()
        self.workers: dict[str, SandboxWorker] = {}
        self.renewals = RenewalSchedule(paths, log)

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        self._rescan()
        self._wait_settled()
        sd_notify("READY=1")
        self.log(f"daemon: ready, {len(self.workers)} sandbox(es)")
        watchdog = watchdog_interval()
        tick = min(self.settings.rescan_interval, watchdog or self.settings.rescan_interval)
        while not self.stopping.is_set():
            self._rescan()
            self.renewals.tick(sorted(self.workers))
            if watchdog:
                sd_notify("WATCHDOG=1")
            self.stopping.wait(tick)
        self._shutdown()

    def _rescan(self) -> None:
        enrolled = set(self.paths.sandbox_names())
        for name in sorted(enrolled - set(self.workers)):
            worker = SandboxWorker(self.paths, name, self.settings, self.transport_factory(),
                                   self.log)
            self.workers[name] = worker
            worker.start()
            self.log(f"{name}: watching")
        for name in sorted(set(self.workers) - enrolled):
            self.workers.pop(name).stop()
            self.renewals.forget(name)
            self.log(f"{name}: no longer enrolled; stream closed")

    def _wait_settled(self) -> None:
        deadline = time.monotonic() + READY_WAIT_S
        while not self.stopping.is_set() and time.monotonic() < deadline:
            if all(w.settled.is_set() for w in self.workers.values()):
                return
            self.stopping.wait(0.02)

    def _shutdown(self) -> None:
        sd_notify("STOPPING=1")
        for worker in self.workers.values():
            worker.stop()
        deadline = time.monotonic() + JOIN_S
        for worker in self.workers.values():
            worker.join(max(0.0, deadline - time.monotonic()))
        self.log("daemon: stopped")
