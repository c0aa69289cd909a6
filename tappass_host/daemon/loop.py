"""`tappass-host daemon`'s main loop: one worker per enrolled sandbox
(worker.py), certificate renewal, supervision, systemd.

The main thread rescans the state directory for sandboxes enrolled or
removed, renews certificates when due (renewal.py), supervises the sandboxes
(supervision.py: restarts, expiry, restarts on a policy change) and pings
systemd (notify.py: its watchdog pings come from a thread of their own while the main
loop makes progress, sandbox by sandbox). The main thread sleeps on the supervision doorbell,
which an agent's exit hook, a flip and a stop signal ring; its timeout is the
rescan interval or whatever is due sooner. An idle daemon sleeps.
"""

import threading
import time
from collections.abc import Callable

from tappass_host.controlplane.client import ControlPlaneClient, SyncTransport
from tappass_host.daemon.notify import Watchdog, sd_notify, watchdog_interval
from tappass_host.daemon.renewal import RenewalSchedule
from tappass_host.daemon.worker import Log, SandboxWorker, SyncSettings
from tappass_host.errors import describe, TappassError
from tappass_host.network import control
from tappass_host.paths import HostPaths
from tappass_host.runtime.doorbell import Doorbell, ring
from tappass_host.runtime.runstate import host_lock, is_running

READY_WAIT_S = 10.0
JOIN_S = 5.0


class Daemon:
    def __init__(self, paths: HostPaths, settings: SyncSettings, log: Log,
                 transport_factory: Callable[[], SyncTransport] | None = None,
                 supervisor=None):
        self.paths = paths
        self.settings = settings
        self.log = log
        self.transport_factory = transport_factory or (
            lambda: ControlPlaneClient(paths, keepalive_timeout=settings.keepalive_timeout))
        self.stopping = threading.Event()
        self.workers: dict[str, SandboxWorker] = {}
        self.renewals = RenewalSchedule(paths, log)
        self.supervisor = supervisor
        self.doorbell = Doorbell(paths)
        self._step_trouble: dict[str, str] = {}

    def stop(self) -> None:
        """Safe from a signal handler: wakes the main loop at once."""
        self.stopping.set()
        ring(self.paths, "")

    def run(self) -> None:
        self._rescan()
        self._wait_settled()
        sd_notify("READY=1")
        self.log(f"daemon: ready, {len(self.workers)} sandbox(es)")
        interval = watchdog_interval()
        watchdog = Watchdog(interval) if interval else None
        beat = watchdog.beat if watchdog else lambda: None
        if watchdog:
            watchdog.start()
        tick = min(self.settings.rescan_interval, interval or self.settings.rescan_interval)
        try:
            while not self.stopping.is_set():
                beat()
                self._rescan()
                self._reap_network()
                beat()
                self._guarded("renewing certificates",
                              lambda: self.renewals.tick(sorted(self.workers), progress=beat))
                if self.supervisor is not None:
                    self._guarded("supervision",
                                  lambda: self.supervisor.tick(sorted(self.workers), progress=beat))
                self.doorbell.wait(self._sleep_for(tick))
        finally:
            if watchdog:
                watchdog.stop()
        self._shutdown()

    def _guarded(self, what: str, step: Callable[[], None]) -> None:
        """One step of the main loop; its failure (e.g. a full disk) is logged
        and the step is taken again on the next tick, the daemon goes on."""
        try:
            step()
        except Exception as exc:
            line = f"daemon: {what} failed: {type(exc).__name__}: {describe(exc)}"
            if self._step_trouble.get(what) != line:  # once per trouble, not per tick
                self.log(line)
            self._step_trouble[what] = line
        else:
            self._step_trouble.pop(what, None)

    def _reap_network(self) -> None:
        """Remove the namespaces and veths of sandboxes that died with their
        proxy (tappass_host.network); under the start lock, never mid-start."""
        if not control.leftovers(self.paths, is_running):
            return
        try:
            with host_lock(self.paths):
                removed = control.reap(self.paths, is_running)
        except (OSError, TappassError) as exc:
            self.log(f"daemon: cleaning up sandbox networks failed: {exc}")
            return
        if removed:
            self.log(f"daemon: removed the network of stopped sandbox(es) {', '.join(removed)}")

    def _sleep_for(self, tick: float) -> float:
        due = self.supervisor.next_due_in() if self.supervisor is not None else None
        return tick if due is None else min(tick, due + 0.01)

    def _rescan(self) -> None:
        enrolled = set(self.paths.sandbox_names())
        for name in sorted(enrolled - set(self.workers)):
            worker = SandboxWorker(self.paths, name, self.settings, self.transport_factory(),
                                   self.log, on_applied=self._flipped)
            self.workers[name] = worker
            worker.start()
            self.log(f"{name}: watching")
        for name in sorted(set(self.workers) - enrolled):
            self.workers.pop(name).stop()
            self.renewals.forget(name)
            if self.supervisor is not None:
                self.supervisor.forget(name)
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
        self.doorbell.close()
        self.log("daemon: stopped")

    def _flipped(self, name: str) -> None:
        """A worker flipped `name`'s keyring: supervision may have to act
        (restart on a policy change, a fresh keyring after an expiry stop)."""
        ring(self.paths, name)
