"""Apply, then acknowledge (DESIGN §7): the one path from an envelope the
control plane sent to the ack that tells it the outcome. The daemon's
workers (tappass_host.daemon.worker) and `start`'s one-time pull (pull.py)
deliver through it.

An ack the control plane cannot take now is kept, the latest only (it
supersedes older ones), in memory and in the sandbox's unacked.json, and
sent again by `retry`: with the next keepalive, after the next reconnect, or
by the next daemon.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass

from tappass_host import clock, statefile
from tappass_host.controlplane.client import SyncTransport
from tappass_host.controlplane.errors import ControlPlaneError
from tappass_host.errors import describe
from tappass_host.keyring import Limits
from tappass_host.keyring.store import store_of
from tappass_host.paths import HostPaths
from tappass_host.sync.receive import APPLIED, is_current, Outcome, receive


def current_version(paths: HostPaths, name: str) -> int | None:
    version = store_of(paths.sandbox(name)).current_version()
    return version.policy_version if version else None


@dataclass
class Ack:
    policy_version: int
    status: str
    reason: str | None
    at: str
    failed: bool = False

    def save(self, path) -> bool:
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


class Delivery:
    """One sandbox's envelopes, applied and acknowledged through `transport`."""

    def __init__(self, paths: HostPaths, name: str, transport: SyncTransport, *,
                 limits: Limits = Limits(), log: Callable[[str], None] = lambda line: None):
        self.paths = paths
        self.name = name
        self.transport = transport
        self.limits = limits
        self.log = log
        self._unacked_file = paths.sandbox(name).unacked
        self._unacked: Ack | None = Ack.load(self._unacked_file)
        self._unacked_saved = self._unacked is not None

    def deliver(self, data: bytes, claimed_version: int | None = None, *,
                announce: Callable[[Outcome], None] = lambda outcome: None) -> Outcome:
        """Receive `data` (verify, flip, live limits: sync.receive), call
        `announce` with the outcome, then acknowledge it. Raises what receive
        raises when the keyring in place is still the old one."""
        try:
            outcome = receive(self.paths, self.name, data, limits=self.limits,
                              claimed_version=claimed_version)
        except Exception as exc:
            if not is_current(self.paths, self.name, data):
                raise
            # flipped, and then something failed (its audit, on a full disk): the
            # agent has it, so the control plane learns it is applied

            outcome = Outcome(APPLIED, current_version(self.paths, self.name),
                              live_error=f"after the flip: {describe(exc)}")
        announce(outcome)
        self.acknowledge(outcome.policy_version or 0, outcome.status, outcome.reason)
        return outcome

    def acknowledge(self, policy_version: int, status: str, reason: str | None) -> None:
        """Send the ack of an outcome now; kept for `retry` if it cannot be sent."""
        self._unacked = Ack(policy_version, status, reason, clock.now_text("microseconds"))
        self.retry()

    def retry(self) -> None:
        """Send the kept ack, if there is one."""
        ack = self._unacked
        if ack is None:
            return
        try:
            self.transport.ack(self.name, ack.policy_version, ack.status, ack.reason,
                               applied_at=ack.at)
        except ControlPlaneError as exc:
            if not ack.failed:  # one line per ack, not per retry; said once it is saved
                ack.failed = True
                self._unacked_saved = ack.save(self._unacked_file) or self._unacked_saved
                self.log(f"{self.name}: ack of policy_version {ack.policy_version} failed "
                         f"({exc}); kept for a retry")
            return
        if ack.failed:
            self.log(f"{self.name}: ack of policy_version {ack.policy_version} sent on retry")
        if self._unacked_saved:  # this one, or an older one it supersedes
            self._unacked_file.unlink(missing_ok=True)
            self._unacked_saved = False
        if self._unacked is ack:
            self._unacked = None
