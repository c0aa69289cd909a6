"""A sandbox's persisted intent to run: `<state>/sandboxes/<name>/run-intent.json`.

`state.json` lives in the runtime directory (`/run/tappass-host`), which a reboot empties.
What the daemon needs to bring a sandbox back lives here, under the state directory: every
detached `start` records its run (agent, runtime, image, restart policy, `started_at`) with the
boot it ran in; an operator's stop removes it, and a foreground start replaces nothing (its
unit, not the daemon, restarts it). The daemon's supervision (daemon/supervision.py), finding
the intent of a run whose runtime state is gone (another boot, or the runtime directory
wiped) and that had not ended on its own, restarts the sandbox per its restart policy.
"""

import json

from tappass_host import statefile
from tappass_host.processes import boot_id
from tappass_host.paths import SandboxPaths
from tappass_host.runtime.runstate import is_running, read_json, state_file

RECORDED = ("agent", "runtime", "runtime_binary", "image", "restart_policy", "started_at")


class LostRun:
    """A run that should be live but whose runtime state is gone. A plain class:
    typing.NamedTuple's import was 12M instructions of every `stop`,
    collections.namedtuple's class 0.4M (issue 13)."""
    __slots__ = ("intent", "reason", "exit")

    def __init__(self, intent: dict, reason: str, exit: dict | None):
        self.intent = intent  # what start recorded (the fields of RECORDED, boot_id)
        self.reason = reason  # "reboot" (another boot) | "run_state_lost" (this boot, state.json gone)
        self.exit = exit  # the run's exit record, if it had ended before


def record(sandbox: SandboxPaths, state: dict) -> None:
    """Called by a detached start once its run is up, with the run's state.json fields."""
    intent = {k: state[k] for k in RECORDED if state.get(k) is not None}
    statefile.write_atomic(sandbox.run_intent,
                           json.dumps({**intent, "boot_id": boot_id()}).encode(), 0o644)


def clear(sandbox: SandboxPaths) -> None:
    sandbox.run_intent.unlink(missing_ok=True)


def read(sandbox: SandboxPaths) -> dict | None:
    intent = read_json(sandbox.run_intent)
    return intent if isinstance(intent, dict) and intent.get("agent") else None


def lost(sandbox: SandboxPaths) -> LostRun | None:
    """The recorded run, when its runtime state is gone; None when there is no intent, the
    sandbox runs, or its state.json of this boot is there (supervision as usual)."""
    intent = read(sandbox)
    if intent is None or is_running(sandbox):
        return None
    if intent.get("boot_id") != boot_id():
        reason = "reboot"
    elif read_json(state_file(sandbox)) is None:
        reason = "run_state_lost"
    else:
        return None
    ended = read_json(sandbox.exit_record)
    if not (isinstance(ended, dict) and ended.get("started_at")
            and ended["started_at"] == intent.get("started_at")):
        ended = None
    return LostRun(intent, reason, ended)
