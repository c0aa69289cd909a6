"""Supervision: what the daemon does about sandboxes that end, expire or
need a restart (DESIGN §6, §9).

- An agent that exits is restarted per its manifest's restart policy
  (`no` | `on-failure` | `always`, recorded as `restart_policy` in state.json
  by `start`), after a capped, jittered backoff that starts over once a run
  has lasted `stable_after_s`.
- A sandbox stopped on purpose (`stopped_by` in state.json, written by
  `runtime.stop.stop` before its signal) is never restarted: not after an
  operator's `tappass-host stop`, and not after an `on_expiry = "stop"` until
  a fresh keyring is in place.
- A keyring that expires without a fresh one is audited once
  (`keyring.expired`); with `on_expiry = "stop"` the sandbox is stopped.
- With `restart_on_policy_change = true`, a sandbox whose keyring changed a
  restart-only aspect (`restart-pending` in status) is restarted.
- A running sandbox's workspace stays reserved on the state filesystem
  (tappass_host/workspace.py), even after a host-wide fstrim.
- A run whose runtime state is gone (a reboot emptied /run; runtime/runintent.py)
  is started again when its restart policy restarts a failed run (`always`,
  `on-failure`: a reboot is no clean exit), audited as `sandbox.restarted`
  (reason `reboot` or `run_state_lost`); with `no` it stays down, audited as
  `sandbox.left_stopped`. An operator's stop removes the intent once it has recorded the exit.

The daemon learns of exits through its doorbell (runtime/doorbell.py).
"""

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from tappass_host import statefile, workspace
from tappass_host.audit import AuditLog
from tappass_host.errors import TappassError
from tappass_host.keyring.store import expires_at, store_of
from tappass_host.paths import HostPaths
from tappass_host.runtime import runintent, runstate
from tappass_host.runtime.runstate import runtime_of
from tappass_host.runtime.start import start
from tappass_host.runtime.status import status
from tappass_host.runtime.stop import stop
from tappass_host.sync.backoff import Backoff
from tappass_host.sync.start_keyring import keyring_for_start

HOOK_GRACE_S = 10.0  # conmon gone, exit hook silent: record the exit ourselves


# --- decisions ------------------------------------------------------------------------


@dataclass(frozen=True)
class SupervisionSettings:
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    stable_after: float = 60.0
    on_expiry: str = "keep"
    restart_on_policy_change: bool = False

    @classmethod
    def from_config(cls, config) -> "SupervisionSettings":
        return cls(backoff_initial=float(config["supervision.backoff_initial_s"]),
                   backoff_max=float(config["supervision.backoff_max_s"]),
                   stable_after=float(config["supervision.stable_after_s"]),
                   on_expiry=config["on_expiry"],
                   restart_on_policy_change=bool(config["restart_on_policy_change"]))


def wants_restart(policy: str, exit_record: dict) -> bool:
    if policy == "always":
        return True
    if policy == "on-failure":
        return exit_record.get("code") != 0 or bool(exit_record.get("oom"))
    return False


def _ends(record: dict | None, state: dict) -> bool:
    """True when exit `record` is that of the run `state` describes."""
    if not record:
        return False
    if record.get("started_at"):
        return record["started_at"] == state.get("started_at")
    return (record.get("finished_at") or "") >= (state.get("started_at") or "~")


def _seconds_between(start: str | None, end: str | None) -> float:
    try:
        return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
    except (TypeError, ValueError):
        return 0.0


class Supervisor:
    """One daemon's supervision of every enrolled sandbox; driven by `tick`
    from the daemon's main thread."""

    def __init__(self, paths: HostPaths, config, settings: SupervisionSettings,
                 log: Callable[[str], None], clock: Callable[[], float] = time.monotonic):
        self.paths = paths
        self.config = config
        self.settings = settings
        self.log = log
        self.clock = clock
        self._backoff: dict[str, Backoff] = {}
        self._new_backoff = lambda: Backoff(settings.backoff_initial, settings.backoff_max)
        self._handled: dict[str, str] = {}  # name -> started_at of the run whose exit we handled
        self._due: dict[str, tuple[float, str]] = {}  # name -> (when, why) of a pending restart
        self._hook_late: dict[str, float] = {}
        self._expiries: dict[str, float] = {}  # name -> wall time its keyring expires
        self._complaint: dict[str, str] = {}

    # -- the daemon's interface --

    def next_due_in(self) -> float | None:
        """Seconds until something is due here (a restart, an expiry)."""
        now, wall = self.clock(), time.time()
        times = [when - now for when, _ in self._due.values()]
        times += [at - wall for at in self._expiries.values() if at > wall]
        return max(0.0, min(times)) if times else None

    def forget(self, name: str) -> None:
        for table in (self._backoff, self._handled, self._due, self._hook_late,
                      self._expiries, self._complaint):
            table.pop(name, None)

    def tick(self, names: list[str], progress: Callable[[], None] = lambda: None) -> None:
        for name in names:
            progress()  # a restart may take long; the daemon's watchdog sees it move on
            try:
                self._check(name)
            except TappassError as exc:
                self._complain(name, str(exc))
            except Exception as exc:
                # one sandbox's odd state (or a full disk) must not take the daemon down
                self._complain(name, f"supervision failed: {type(exc).__name__}: {exc}")

    # -- one sandbox --

    def _check(self, name: str) -> None:
        sandbox = self.paths.sandbox(name)
        keyring = store_of(sandbox).read_current()
        expired = self._watch_expiry(name, keyring)
        lost = runintent.lost(sandbox)
        if lost is not None:
            self._recover(name, lost)
            return
        state = runstate.read_json(runstate.state_file(sandbox))
        if not state or state.get("foreground"):
            return  # never started, or supervised by its own unit (tappass-host@.service)
        if runstate.is_running(sandbox):
            self._check_running(name, state, expired)
            return
        stopped_by = state.get("stopped_by")
        if stopped_by == "operator":  # never undone, even with a restart pending
            runintent.clear(sandbox)  # what a stop that died half-way left, not after a reboot
            if self._due.pop(name, None):
                self.log(f"{name}: stopped by the operator; pending restart called off")
            return
        if name in self._due:  # a restart is pending (or a failed one is retried)
            when, why = self._due[name]
            if self.clock() >= when:
                del self._due[name]
                self._restart(name, state, why)
            return
        if stopped_by == "expiry":
            if keyring and not expired:
                self._restart(name, state, "keyring_refreshed")
            return
        if stopped_by == "policy_change":
            # stopped for a restart that never came (the daemon died in between)
            self._restart(name, state, "policy_change")
            return
        if stopped_by:
            return  # an intent this version does not know: leave it alone
        if self._handled.get(name) != state.get("started_at"):
            self._on_exit(name, state)

    def _check_running(self, name: str, state: dict, expired: bool) -> None:
        self._due.pop(name, None)
        workspace.keep_reserved(self.paths.sandbox(name))
        if expired and self.settings.on_expiry == "stop":
            self.log(f"{name}: keyring expired; stopping the sandbox (on_expiry = stop)")
            stop(self.paths, name, self._runtime(state), intent="expiry")
            return
        if self.settings.restart_on_policy_change and \
                "restart-pending" in status(self.paths, name)["flags"]:
            self.log(f"{name}: the new keyring changes what only a restart applies; restarting")
            stop(self.paths, name, self._runtime(state), intent="policy_change")
            self._restart(name, state, "policy_change")

    def _on_exit(self, name: str, state: dict) -> None:
        """The current run has ended: wait for its exit record, then decide."""
        sandbox = self.paths.sandbox(name)
        record = runstate.read_json(sandbox.exit_record)
        if not _ends(record, state):
            if not self._hook_overdue(name):
                return
            if runstate.monitor_files(sandbox).exit_code() is None:
                self._handled[name] = state.get("started_at")
                self._complain(name, "its monitor ended without recording an exit; "
                                     "not restarting it")
                return
            record = runstate.record_exit_from_monitor(self.paths, name)
        self._hook_late.pop(name, None)
        self._handled[name] = state.get("started_at")
        policy = state.get("restart_policy", "no")
        if not wants_restart(policy, record):
            self.log(f"{name}: exited (code {record.get('code')}); restart policy "
                     f"{policy!r}: left stopped")
            return
        backoff = self._backoff.setdefault(name, self._new_backoff())
        if _seconds_between(state.get("started_at"), record.get("finished_at")) \
                >= self.settings.stable_after:
            backoff.reset()
        delay = backoff.next_delay()
        self._due[name] = (self.clock() + delay, policy)
        self.log(f"{name}: exited (code {record.get('code')}); restart policy {policy!r}: "
                 f"restarting in {delay:.1f} s")

    def _recover(self, name: str, lost: runintent.LostRun) -> None:
        """A run the host should have running lost its runtime state (runtime.runintent)."""
        if name in self._due:  # its restart failed: retried after the backoff
            when, why = self._due[name]
            if self.clock() >= when:
                del self._due[name]
                self._restart(name, lost.intent, why)
            return
        sandbox = self.paths.sandbox(name)
        if lost.reason == "reboot":  # a state.json of another boot names dead processes
            runstate.state_file(sandbox).unlink(missing_ok=True)
        policy = lost.intent.get("restart_policy", "no")
        ended = lost.exit or {"code": None}  # ended by the reboot: no clean exit
        since = lost.intent.get("started_at")
        if wants_restart(policy, ended):
            self.log(f"{name}: its run of {since} was lost ({lost.reason}); restart policy "
                     f"{policy!r}: starting it again")
            self._restart(name, lost.intent, lost.reason)
            return
        if lost.exit is None:  # it was running: say it stays down
            AuditLog.for_host(self.paths).append("sandbox.left_stopped", sandbox=name, details={
                "reason": lost.reason, "restart_policy": policy, "previous_start": since})
            self.log(f"{name}: its run of {since} was lost ({lost.reason}); restart policy "
                     f"{policy!r}: left stopped")
        runintent.clear(sandbox)

    def _hook_overdue(self, name: str) -> bool:
        first = self._hook_late.setdefault(name, self.clock())
        return self.clock() - first >= HOOK_GRACE_S

    def _restart(self, name: str, state: dict, why: str) -> None:
        attempt = self._backoff[name].failures if name in self._backoff else 0
        try:
            AuditLog.for_host(self.paths).append("sandbox.restarted", sandbox=name, details={
                "reason": why, "attempt": attempt, "previous_start": state.get("started_at")})
            started = start(self.paths, name, state["agent"], self.config, state.get("runtime"),
                            keyring=keyring_for_start(self.paths, name, self.config),
                            image=state.get("image"))  # re-admitted by the current keyring
        except (OSError, TappassError) as exc:
            # No run, no exit hook: try again after the next backoff step.
            backoff = self._backoff.setdefault(name, self._new_backoff())
            delay = backoff.next_delay()
            self._due[name] = (self.clock() + delay, why)
            self._complain(name, f"restart failed ({exc}); retrying in {delay:.1f} s")
            return
        self._complaint.pop(name, None)
        self.log(f"{name}: restarted ({why}; pid {started.pid}, "
                 f"policy_version {started.policy_version})")

    def _runtime(self, state: dict):
        return runtime_of(self.paths, state)

    # -- expiry --

    def _watch_expiry(self, name: str, keyring: dict | None) -> bool:
        """True when `keyring` has expired; audits each expired keyring once."""
        expires = expires_at(keyring) if keyring else None
        if expires is None:
            self._expiries.pop(name, None)
            return False
        if expires > datetime.now(timezone.utc):
            self._expiries[name] = expires.timestamp()
            return False
        self._expiries.pop(name, None)
        marker = self.paths.sandbox(name).keyring_expired
        seen = {"policy_version": keyring.get("policy_version"),
                "issued_at": keyring.get("issued_at")}
        try:
            already = json.loads(marker.read_bytes()) == seen
        except (OSError, ValueError):
            already = False
        if not already:
            AuditLog.for_host(self.paths).append("keyring.expired", sandbox=name, details={
                **seen, "expires_at": keyring.get("expires_at"),
                "on_expiry": self.settings.on_expiry})
            statefile.write_atomic(marker, json.dumps(seen).encode(), 0o644)
            self.log(f"{name}: keyring policy_version {seen['policy_version']} expired at "
                     f"{keyring.get('expires_at')} with no fresh one; status shows 'stale'")
        return True

    def _complain(self, name: str, message: str) -> None:
        if self._complaint.get(name) != message:  # one line per trouble, not per tick
            self.log(f"{name}: {message}")
        self._complaint[name] = message
