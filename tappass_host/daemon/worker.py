"""The daemon's per-sandbox worker: one SSE stream per enrolled sandbox
(DESIGN §7).

Each sandbox gets a worker thread: pull the latest keyring, then hold the
event stream from the current policy_version; every event is delivered
(tappass_host.sync.delivery: received, then acknowledged). A broken
or stalled stream is reopened after a capped, jittered backoff; the last
good keyring stays in place meanwhile. The daemon's main loop (loop.py)
starts and stops the workers.
"""

import threading
from collections.abc import Callable
from dataclasses import dataclass

from tappass_host.audit import AuditLog
from tappass_host.controlplane.client import Keepalive, SyncTransport, TooLarge
from tappass_host.controlplane.errors import ControlPlaneError
from tappass_host.errors import describe, TappassError
from tappass_host.keyring import Limits
from tappass_host.paths import HostPaths
from tappass_host.sync.backoff import Backoff
from tappass_host.sync.delivery import current_version, Delivery
from tappass_host.sync.receive import APPLIED, is_current, Outcome

Log = Callable[[str], None]


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


class SandboxWorker:
    """Keeps one sandbox's keyring in step with the control plane."""

    def __init__(self, paths: HostPaths, name: str, settings: SyncSettings,
                 transport: SyncTransport, log: Log,
                 on_applied: Callable[[str], None] | None = None):
        self.paths = paths
        self.name = name
        self.settings = settings
        self.transport = transport
        self.log = log
        self.on_applied = on_applied or (lambda name: None)
        self.delivery = Delivery(paths, name, transport, limits=settings.limits, log=log)
        self.stopping = threading.Event()
        self.settled = threading.Event()  # the first stream is open, or failed once
        self._thread = threading.Thread(target=self._run, name=f"sync-{name}", daemon=True)
        self._last_rejected: bytes | None = None
        self._trouble: str | None = None
        # retries of an envelope that failed to apply (not rejected: e.g. on
        # a full disk); reset once one is applied or rejected
        self._retry = Backoff(settings.backoff_initial, settings.backoff_max)
        self._applying = False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.transport.abort()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        """Ends only when stopped: whatever fails is logged (and audited when
        it is not the stream's) and tried again after a backoff."""
        reconnect = Backoff(self.settings.backoff_initial, self.settings.backoff_max)
        while not self.stopping.is_set():
            try:
                delay = self._attempt(reconnect)
            except Exception:  # reporting the failure failed (stderr gone?): carry on
                delay = reconnect.next_delay()
            self.settled.set()
            if self.stopping.wait(delay):
                break
        self.transport.close()

    def _attempt(self, reconnect: Backoff) -> float:
        """One session; the delay before the next."""
        self._applying = False
        try:
            self._session(reconnect)
        except ControlPlaneError as exc:
            self._troubled(exc.reason, str(exc))
        except Exception as exc:  # e.g. ENOSPC from a flip: a later try may work
            if isinstance(exc, TappassError) and not self._applying:
                self._troubled("error", str(exc))
            else:
                self._failed(exc)
        return (self._retry if self._applying else reconnect).next_delay()

    def _session(self, backoff: Backoff) -> None:
        data = self.transport.pull_latest(self.name)
        backoff.reset()
        self.delivery.retry()
        if data is not None and not is_current(self.paths, self.name, data):
            self._handle(data, None)
        since = current_version(self.paths, self.name)
        for event in self.transport.events(self.name, since,
                                           on_open=lambda: self._opened(since)):
            if self.stopping.is_set():
                return
            if isinstance(event, Keepalive):
                self.delivery.retry()
            elif isinstance(event, TooLarge):
                self._too_large(event)
            else:
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

    def _failed(self, exc: Exception) -> None:
        """An unexpected failure (not the stream's): logged and audited once
        per kind of failure, not per retry; the keyring in place stays."""
        if self.stopping.is_set():
            return
        message = describe(exc)
        reason = f"failed:{type(exc).__name__}:{getattr(exc, 'errno', None)}"
        if reason == self._trouble:
            return
        self._trouble = reason
        line = (f"{self.name}: {type(exc).__name__}: {message}; retrying with backoff, "
                f"keeping policy_version {self._version_text()}")
        try:
            AuditLog.for_host(self.paths).append("sync.failed", sandbox=self.name, details={
                "error": type(exc).__name__, "message": message})
        except Exception as audit_failure:  # the same full disk, most likely
            line += f" (not audited: {describe(audit_failure)})"
        self.log(line)

    def _version_text(self) -> str:
        try:
            return str(current_version(self.paths, self.name))
        except (OSError, TappassError):
            return "None"

    def _handle(self, data: bytes, event_id: int | None) -> None:
        if data == self._last_rejected:
            return  # resent on reconnect: rejected, audited and acked already
        self._applying = True
        self.delivery.deliver(data, event_id,
                              announce=lambda outcome: self._announce(data, outcome))

    def _announce(self, data: bytes, outcome: Outcome) -> None:
        """After the flip (or the rejection), before the ack: logged, and the
        main loop told, without waiting for the control plane."""
        self._applying = False
        self._retry.reset()
        if self._trouble and self._trouble.startswith("failed:"):
            self._trouble = None  # the next failure is logged again
        if outcome.status == APPLIED:
            self._last_rejected = None
            line = f"{self.name}: applied policy_version {outcome.policy_version}"
            if outcome.resources is not None:
                line += f"; process limits updated live (pids {outcome.resources['pids']['limit']})"
            if outcome.live_error:
                line += f"; NOT done: {outcome.live_error}"
        else:
            self._last_rejected = data
            line = f"{self.name}: rejected policy_version {outcome.policy_version}: " \
                   f"{outcome.reason}"
        self.log(line)
        if outcome.status == APPLIED:
            self.on_applied(self.name)

    def _too_large(self, event: TooLarge) -> None:
        """An event the stream reader dropped unread: over the envelope size
        limit (plus slack for SSE framing), never buffered whole."""
        details = {"reason": "too_large", "bytes_over": event.size}
        if event.id is not None:
            details["policy_version"] = event.id
        AuditLog.for_host(self.paths).append("keyring.rejected", sandbox=self.name,
                                             details=details)
        self.log(f"{self.name}: rejected policy_version {event.id}: too_large "
                 f"(event over {event.size} bytes, dropped unread)")
        self.delivery.acknowledge(event.id or 0, "rejected", "too_large")
