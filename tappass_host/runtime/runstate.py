"""A sandbox's run state, as plain files: `<runtime>/<name>/state.json`
describes the last start, `exit.json` in the sandbox's state dir the last
exit. Whether it runs, the host's start lock, and the OCI runtime it ran
under are all read from these.
"""

import json
from pathlib import Path

from tappass_host.errors import NotFound, TappassError
from tappass_host.paths import HostPaths, SandboxPaths
from tappass_host.processes import process_alive

# clock (datetime), signal, runtime.monitor and statefile (contextlib) are
# imported where an exit is read or written, or state written: `logs` and
# `status` never get there (issue 13: signal alone is 3M instructions,
# datetime 5M, contextlib 3M).


class LifecycleError(TappassError):
    pass


def monitor_files(sandbox: SandboxPaths):
    """conmon's files of the sandbox's run (runtime.monitor.MonitorFiles)."""
    from tappass_host.runtime.monitor import MonitorFiles

    return MonitorFiles(sandbox.runtime)


def state_file(sandbox: SandboxPaths) -> Path:
    return sandbox.run_state


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_bytes())
    except (FileNotFoundError, ValueError):
        return None


def write_state(sandbox: SandboxPaths, state: dict) -> None:
    from tappass_host import statefile

    sandbox.runtime.mkdir(parents=True, exist_ok=True)
    statefile.write_runtime_file(state_file(sandbox), json.dumps(state, indent=2).encode(), 0o644)


def runtime_of(paths: HostPaths, state: dict, default: str | None = None):
    """The OCI runtime (runtime.ociruntime.OCIRuntime) of the run `state` describes:
    the same runtime and binary; `default` when state.json names none.

    A binary start found on PATH is found there again, as start found it; one
    that is not (config `runtime_path`) is checked again as start checked it
    (its `--version`). Before, every stop ran `<runtime> --version` of the
    binary on PATH too, a runtime invocation start never made (issue 13)."""
    from tappass_host.runtime.ociruntime import OCIRuntime, on_path

    name = state.get("runtime") or default
    recorded = state.get("runtime_binary", "")
    if recorded and recorded == on_path(name or ""):
        recorded = ""
    return OCIRuntime.find(name, paths.runtime, recorded)


def is_running(sandbox: SandboxPaths) -> bool:
    state = read_json(state_file(sandbox))
    if not state:
        return False
    if state.get("foreground"):
        return process_alive(state.get("pid"))
    return process_alive(state.get("conmon_pid"), "conmon") and process_alive(state.get("pid"))


def host_lock(paths: HostPaths):
    """Serializes starts, so `max_sandboxes` holds under concurrent starts
    (`with host_lock(paths):`)."""
    from tappass_host import statefile

    paths.runtime.mkdir(parents=True, exist_ok=True)
    return statefile.locked(paths.start_lock)


def running_names(paths: HostPaths) -> list[str]:
    return [n for n in paths.sandbox_names() if is_running(paths.sandbox(n))]


def ensure_known(paths: HostPaths, name: str) -> SandboxPaths:
    sandbox = paths.sandbox(name)
    if not sandbox.record.is_file():
        raise NotFound(f"no sandbox named {name!r} (run 'tappass-host init {name} ...' first)")
    return sandbox


def restart_aspects(keyring: dict, names: frozenset[str]) -> str:
    """A digest of the keyring aspects whose change needs a restart."""
    import hashlib

    picked = {}
    for name in sorted(names):
        aspect, _, key = name.partition(".")
        value = keyring.get(aspect, {})
        picked[name] = value.get(key) if key and isinstance(value, dict) else value
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()


def write_exit(paths: HostPaths, name: str, code: int | None, oom: bool,
               started_at: str | None = None) -> dict:
    """Record an exit (conmon reports a signal death as 128 + signal).

    Exactly once per run: conmon's exit hook and `stop` both get here for the
    run that started at `started_at`, at the same moment as a rule; the second
    one returns the first one's record without a second audit event. A run that
    `stop` ended (`stop_signalled` in its state.json) gets its `sandbox.stopped`
    event in the same append as `sandbox.exited`: one fsync for both. The
    daemon's supervision is told at once (a datagram to its doorbell, if it
    listens)."""
    from tappass_host import clock, statefile
    from tappass_host.runtime import doorbell

    sandbox = paths.sandbox(name)
    sandbox.runtime.mkdir(parents=True, exist_ok=True)
    with statefile.locked(sandbox.exit_lock):
        previous = read_json(sandbox.exit_record)
        if started_at and previous and previous.get("started_at") == started_at:
            return previous
        record = {**exit_details(code, oom, clock.now_text("microseconds")), "started_at": started_at}
        statefile.write_atomic(sandbox.exit_record, json.dumps(record).encode(), 0o644)
        events = [("sandbox.exited", record)]
        state = read_json(state_file(sandbox)) or {}
        if started_at and state.get("started_at") == started_at and state.get("stop_signalled"):
            events.append(("sandbox.stopped", {"code": code, "by": state["stopped_by"]}))
        from tappass_host.audit import AuditLog

        AuditLog.for_host(paths).append_all(events, sandbox=name)
    doorbell.ring(paths, name)
    return record


def exit_details(code: int | None, oom: bool, finished_at: str | None) -> dict:
    import signal as signals

    signal = code - 128 if code is not None and code > 128 else None
    return {"code": code, "signal": signals.Signals(signal).name if signal and
            signal in signals.Signals._value2member_map_ else signal,
            "oom": oom, "finished_at": finished_at}


def last_exit(sandbox: SandboxPaths, state: dict) -> dict | None:
    """The last exit: exit.json, or, in the moment between the agent's end and
    conmon's exit hook writing exit.json, what conmon has already recorded."""
    record = read_json(sandbox.exit_record)
    started = state.get("started_at")
    if started and not state.get("foreground") and (
            record is None or (record.get("finished_at") or "") < started):
        files = monitor_files(sandbox)
        code = files.exit_code()
        if code is not None:
            return exit_details(code, files.oom_killed(), None)
    return record


def record_exit_from_monitor(paths: HostPaths, name: str) -> dict:
    """The exit hook conmon runs: its files -> exit.json + audit."""
    files = monitor_files(paths.sandbox(name))
    started_at = (read_json(state_file(paths.sandbox(name))) or {}).get("started_at")
    return write_exit(paths, name, files.exit_code(), files.oom_killed(), started_at)
