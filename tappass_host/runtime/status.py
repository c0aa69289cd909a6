"""What `status` shows of a sandbox, from its files only (no runtime call,
no crypto)."""

import json
from datetime import datetime

from tappass_host import clock
from tappass_host.paths import HostPaths
from tappass_host.runtime.runstate import (
    ensure_known, is_running, last_exit, read_json, restart_aspects, state_file)


def status(paths: HostPaths, name: str) -> dict:
    """Everything `status` shows, from files only (no runtime call, no crypto)."""
    from tappass_host.keyring.store import expired, store_of

    sandbox = ensure_known(paths, name)
    state = read_json(state_file(sandbox)) or {}
    running = is_running(sandbox)
    exit_record = None if running else last_exit(sandbox, state)
    keyring = store_of(sandbox).read_current()
    flags = []
    if keyring and expired(keyring, clock.now()):
        flags.append("stale")
    if running and keyring and state.get("restart_aspects") and restart_aspects(
            keyring, frozenset(json.loads(sandbox.bundle_layers.read_text())
                               ["restart"])) != state["restart_aspects"]:
        flags.append("restart-pending")
    if running and keyring and state.get("image") and not image_allowed(keyring, state):
        flags += ["image-revoked"] + ([] if "restart-pending" in flags else ["restart-pending"])
    if state.get("degraded"):
        flags.append("degraded")
    if running:
        phase = "running"
    elif exit_record:
        phase = "exited"
    else:
        phase = "created"
    started = state.get("started_at")
    uptime = None
    if running and started:
        uptime = round((clock.now() - datetime.fromisoformat(started))
                       .total_seconds(), 1)
    return {
        "name": name, "state": phase, "pid": state.get("pid") if running else None,
        "runtime": state.get("runtime"), "uptime_s": uptime, "started_at": started,
        "keyring_version": keyring.get("policy_version") if keyring else None,
        "started_with_version": state.get("policy_version"),
        "exit": exit_record if not running else None, "flags": flags,
        "image": state.get("image"),
    }


def image_allowed(keyring: dict, state: dict):
    """Whether `keyring` still allows the image of the run `state` describes
    (tappass_host.keyring.image_policy.Verdict)."""
    from tappass_host.keyring.image_policy import allowed

    return allowed(keyring, state["image"], state.get("image_repository"))
