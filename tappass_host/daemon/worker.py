"""The daemon's per-sandbox worker: one SSE stream per enrolled sandbox
(DESIGN §7).

Each sandbox gets a worker thread: pull the latest keyring, then hold the
event stream from the current policy_version; every event goes through
`receive` (the keyring core, then live limits) and is acknowledged. A broken
or stalled stream is reopened after a capped, jittered backoff; the last
good keyring stays in place meanwhile. The daemon's main loop (loop.py)
starts and stops the workers.
"""

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass

from tappass_host import clock
from tappass_host.errors import TappassError
from tappass_host.keyring import Limits
from tappass_host.paths import HostPaths
from tappass_host.sync.backoff import Backoff
from tappass_host.sync.receive import APPLIED, Outcome, is_current, receive
from tappass_host.sync.transport import Keepalive, SyncError, SyncTransport, TooLarge

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


def current_version(paths: HostPaths, name: str) -> int | None:
    from tappass_host import sandbox_record
    from tappass_host.keyring.store import store_for

    version = store_for(paths, sandbox_record.load(paths, name)).current_version()
    return version.policy_version if version else None


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
        # the latest ack the control plane has not taken; on disk too, so that
        # a daemon restart does not lose it
        self._unacked: Ack | None = Ack.load(self._unacked_file)
        self._unacked_saved = self._unacked is not None
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
        except SyncError as exc:
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
        self._retry_ack()
        if data is not None and not is_current(self.paths, self.name, data):
            self._handle(data, None)
        since = current_version(self.paths, self.name)
        for event in self.transport.events(self.name, since,
                                           on_open=lambda: self._opened(since)):
            if self.stopping.is_set():
                return
            if isinstance(event, Keepalive):
                self._retry_ack()
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
        from tappass_host.errors import describe

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
            from tappass_host.audit import AuditLog

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
        try:
            outcome = receive(self.paths, self.name, data, limits=self.settings.limits,
                              claimed_version=event_id)
        except Exception as exc:
            if not is_current(self.paths, self.name, data):
                raise
            # flipped, and then something failed (its audit, on a full disk): the
            # agent has it, so the control plane learns it is applied
            from tappass_host.errors import describe

            outcome = Outcome(APPLIED, current_version(self.paths, self.name),
                              live_error=f"after the flip: {describe(exc)}")
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
        self._ack(Ack(outcome.policy_version or 0, outcome.status, outcome.reason,
                      clock.now_text("microseconds")))

    def _too_large(self, event: TooLarge) -> None:
        """An event the stream reader dropped unread: over the envelope size
        limit (plus slack for SSE framing), never buffered whole."""
        from tappass_host.audit import AuditLog

        details = {"reason": "too_large", "bytes_over": event.size}
        if event.id is not None:
            details["policy_version"] = event.id
        AuditLog.for_host(self.paths).append("keyring.rejected", sandbox=self.name,
                                             details=details)
        self.log(f"{self.name}: rejected policy_version {event.id}: too_large "
                 f"(event over {event.size} bytes, dropped unread)")
        self._ack(Ack(event.id or 0, "rejected", "too_large", clock.now_text("microseconds")))

    @property
    def _unacked_file(self):
        return self.paths.sandbox(self.name).unacked

    def _ack(self, ack: "Ack") -> None:
        """Acknowledge; one the control plane cannot take now is kept (the
        latest only: it supersedes older ones, in memory and in unacked.json)
        and sent again with the next keepalive, after the next reconnect, or
        by the next daemon."""
        self._unacked = ack
        self._retry_ack()

    def _retry_ack(self) -> None:
        ack = self._unacked
        if ack is None:
            return
        try:
            self.transport.ack(self.name, ack.policy_version, ack.status, ack.reason,
                               applied_at=ack.at)
        except SyncError as exc:
            if not ack.failed:  # one line per ack, not per retry
                self.log(f"{self.name}: ack of policy_version {ack.policy_version} failed "
                         f"({exc}); kept for a retry")
                ack.failed = True
                self._unacked_saved = ack.save(self._unacked_file) or self._unacked_saved
            return
        if ack.failed:
            self.log(f"{self.name}: ack of policy_version {ack.policy_version} sent on retry")
        if self._unacked_saved:  # this one, or an older one it supersedes
            self._unacked_file.unlink(missing_ok=True)
            self._unacked_saved = False
        if self._unacked is ack:
            self._unacked = None


@dataclass
class Ack:
    policy_version: int
    status: str
    reason: str | None
    at: str
    failed: bool = False

    def save(self, path) -> bool:
        from tappass_host import statefile

        doc = {"policy_version": self.policy_version, "status": self.status,
               "reason": self.reason, "at": self.at}
        try:
            statefile.write_atomic(path, json.dumps(doc).encode(), 0o600)
        except OSError:
            return False  # kept in memory all the same
        return True

    @classmethod
    def load(cls, path) -> "Ack | None":
        try:
            doc = json.loads(path.read_bytes())
            return cls(int(doc["policy_version"]), str(doc["status"]), doc.get("reason"),
                       str(doc["at"]), failed=True)
        except (OSError, ValueError, KeyError, TypeError):
            return None
