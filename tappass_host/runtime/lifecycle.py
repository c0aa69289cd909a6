"""Sandbox lifecycle: start, stop, the exit hook, and status — all as plain
state on disk, so the CLI is a thin client and no process of ours stays
behind per sandbox (conmon monitors it).

`<runtime>/<name>/state.json` describes the last start; `exit.json` in the
sandbox's state dir describes the last exit.
"""

import json
import os
import signal as signals
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from tappass_host import clock, statefile
from tappass_host.errors import NotFound, TappassError
from tappass_host.paths import HostPaths, SandboxPaths
from tappass_host.runtime import container_id, process_alive, wait_until
from tappass_host.runtime.monitor import MonitorFiles


class LifecycleError(TappassError):
    pass


def monitor_files(sandbox: SandboxPaths) -> MonitorFiles:
    return MonitorFiles(sandbox.runtime)


def state_file(sandbox: SandboxPaths) -> Path:
    return sandbox.run_state


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_bytes())
    except (FileNotFoundError, ValueError):
        return None


def is_running(sandbox: SandboxPaths) -> bool:
    state = read_json(state_file(sandbox))
    if not state:
        return False
    if state.get("foreground"):
        return process_alive(state.get("pid"))
    return process_alive(state.get("conmon_pid"), "conmon") and process_alive(state.get("pid"))


@contextmanager
def host_lock(paths: HostPaths):
    """Serializes starts, so `max_sandboxes` holds under concurrent starts."""
    paths.runtime.mkdir(parents=True, exist_ok=True)
    with statefile.locked(paths.start_lock):
        yield


def running_names(paths: HostPaths) -> list[str]:
    return [n for n in paths.sandbox_names() if is_running(paths.sandbox(n))]


def write_exit(paths: HostPaths, name: str, code: int | None, oom: bool,
               started_at: str | None = None) -> dict:
    """Record an exit (conmon reports a signal death as 128 + signal).

    Exactly once per run: the exit hook and `stop`'s fallback may both get
    here for the run that started at `started_at`; the second one returns the
    first one's record without a second audit event. The daemon's supervision
    is told at once (a datagram to its doorbell, if it listens)."""
    from tappass_host.runtime import doorbell

    sandbox = paths.sandbox(name)
    sandbox.runtime.mkdir(parents=True, exist_ok=True)
    with statefile.locked(sandbox.exit_lock):
        previous = read_json(sandbox.exit_record)
        if started_at and previous and previous.get("started_at") == started_at:
            return previous
        record = {**_exit_details(code, oom, clock.now_text("microseconds")), "started_at": started_at}
        statefile.write_atomic(sandbox.exit_record, json.dumps(record).encode(), 0o644)
        from tappass_host.audit import AuditLog

        AuditLog.for_host(paths).append("sandbox.exited", sandbox=name, details=record)
    doorbell.ring(paths, name)
    return record


def _exit_details(code: int | None, oom: bool, finished_at: str | None) -> dict:
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
            return _exit_details(code, files.oom_killed(), None)
    return record


def exit_hook(paths: HostPaths, name: str) -> dict | None:
    """conmon's exit command. conmon runs it even when `<runtime> create`
    failed, i.e. when no agent ever ran (and `start` has undone itself): it
    then has no exit code, and there is no exit to record."""
    _detach_network(paths, name)
    release_workspace(paths, name)
    if monitor_files(paths.sandbox(name)).exit_code() is None:
        return None
    return record_exit_from_monitor(paths, name)


def record_exit_from_monitor(paths: HostPaths, name: str) -> dict:
    """The exit hook conmon runs: its files -> exit.json + audit."""
    files = monitor_files(paths.sandbox(name))
    started_at = (read_json(state_file(paths.sandbox(name))) or {}).get("started_at")
    return write_exit(paths, name, files.exit_code(), files.oom_killed(), started_at)


def exit_command(paths: HostPaths, name: str) -> list[str]:
    return [sys.executable, "-m", "tappass_host", "--state-dir", str(paths.state),
            "_exited", name]


def write_state(sandbox: SandboxPaths, state: dict) -> None:
    from tappass_host.oci.bundle import write_runtime_file

    sandbox.runtime.mkdir(parents=True, exist_ok=True)
    write_runtime_file(state_file(sandbox), json.dumps(state, indent=2).encode(), 0o644)


def stop(paths: HostPaths, name: str, runtime, timeout: float = 10,
         intent: str = "operator") -> dict:
    """Stop a running sandbox. `intent` (operator | expiry | policy_change) is
    recorded in state.json before the signal: the daemon's supervision never
    restarts a sandbox stopped on purpose (supervision.py)."""
    sandbox = paths.sandbox(name)
    state = read_json(state_file(sandbox))
    if not state or not is_running(sandbox):
        raise not_running(paths, name)
    write_state(sandbox, {**state, "stopped_by": intent})
    cid = container_id(name)
    runtime.kill(cid, "SIGTERM")
    if not wait_until(lambda: not process_alive(state["pid"]), timeout):
        runtime.kill(cid, "SIGKILL")
        wait_until(lambda: not process_alive(state["pid"]), 10)
    wait_until(lambda: not process_alive(state.get("conmon_pid"), "conmon"), 10)
    hook_ran = wait_until(lambda: (read_json(sandbox.exit_record) or {}).get("finished_at", "")
                     >= state["started_at"], 10)
    unrecorded = []
    try:
        exit_record = (read_json(sandbox.exit_record) if hook_ran
                       else record_exit_from_monitor(paths, name))
    except (OSError, TappassError) as exc:
        files = monitor_files(sandbox)
        exit_record = _exit_details(files.exit_code(), files.oom_killed(), clock.now_text("microseconds"))
        unrecorded.append(("its exit", exc))
    runtime.delete(cid)
    _detach_network(paths, name)
    release_workspace(paths, name)
    from tappass_host.audit import AuditLog

    try:
        AuditLog.for_host(paths).append("sandbox.stopped", sandbox=name,
                                        details={"code": exit_record.get("code"), "by": intent})
    except (OSError, TappassError) as exc:
        unrecorded.append(("the stop", exc))
    if unrecorded:
        what = " and ".join(w for w, _ in unrecorded)
        raise StopNotRecorded(f"sandbox {name!r} stopped (exit code {exit_record.get('code')}), "
                              f"but {what} could not be recorded: {describe(unrecorded[0][1])}")
    return exit_record


class StopNotRecorded(LifecycleError):
    """The sandbox was stopped; its exit record or audit event was not written
    (e.g. the state filesystem is full)."""


def describe(exc: BaseException) -> str:
    """One line for an error: an OSError as its message and file."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return str(exc)


def release_workspace(paths: HostPaths, name: str) -> None:
    """After a run: unmount the workspace's filesystem (tappass_host.workspace),
    unless a new run of the sandbox has started meanwhile."""
    from tappass_host import workspace

    sandbox = paths.sandbox(name)
    if not workspace.image_of(sandbox).exists():
        return
    with host_lock(paths):
        if not is_running(sandbox):
            workspace.release(sandbox)


def not_running(paths: HostPaths, name: str) -> LifecycleError:
    """The error for stopping a sandbox that is not running. One that exited
    on its own is marked as stopped by the operator all the same: a restart
    the daemon has pending for it is called off."""
    sandbox = paths.sandbox(name)
    state = read_json(state_file(sandbox))
    if state and not state.get("foreground") and not state.get("stopped_by"):
        write_state(sandbox, {**state, "stopped_by": "operator"})
        return LifecycleError(f"sandbox {name!r} is not running (it exited; the daemon will "
                              "not restart it)")
    return LifecycleError(f"sandbox {name!r} is not running")


def ensure_known(paths: HostPaths, name: str) -> SandboxPaths:
    sandbox = paths.sandbox(name)
    if not sandbox.record.is_file():
        raise NotFound(f"no sandbox named {name!r} (run 'tappass-host init {name} ...' first)")
    return sandbox


def foreground(runtime, cid: str, bundle: Path):
    """Run attached; signals to us go to the agent; returns its
    tappass_host.runtime.attached.Exit (code, OOM kill)."""
    from tappass_host.runtime import attached

    return attached.run(runtime, cid, bundle)


def current_keyring(paths: HostPaths, name: str, pull_keyring, limits=None) -> dict:
    """The sandbox's current keyring payload, which must not have expired.

    Without one, `pull_keyring` (the sync code's pull_once, given by the
    caller) pulls the latest once from the control plane (DESIGN §9).
    """
    from tappass_host.clock import parse_timestamp
    from tappass_host.keyring import Limits

    data = None
    try:
        data = paths.sandbox(name).keyring_payload.read_bytes()
    except (FileNotFoundError, PermissionError):
        pull_failed = pull_keyring(paths, name, limits or Limits())
        if pull_failed is None:
            data = paths.sandbox(name).keyring_payload.read_bytes()
    if data is None:
        raise LifecycleError(
            f"sandbox {name!r} has no keyring yet ({pull_failed}): run 'tappass-host daemon' "
            f"to receive one, or 'tappass-host sync apply {name} FILE'")
    keyring = json.loads(data)
    if parse_timestamp(keyring["expires_at"]) <= clock.now():
        raise LifecycleError(
            f"sandbox {name!r}'s keyring (policy_version {keyring['policy_version']}) expired at "
            f"{keyring['expires_at']}: run 'tappass-host daemon' or 'sync apply' a fresh one")
    return keyring


@dataclass(frozen=True)
class Started:
    name: str
    pid: int
    runtime: str
    policy_version: int
    warnings: tuple[str, ...]
    exit_code: int | None = None  # foreground only


def start(paths: HostPaths, name: str, agent_spec: str, config, runtime_name: str | None = None,
          foreground_run: bool = False, remove: bool = False, warn=None, *,
          pull_keyring) -> Started:
    """Start `name`'s agent. `warn` gets each warning of the layers as soon as
    the sandbox is up (before a foreground agent runs, not after it ends).
    `pull_keyring(paths, name, limits)` fetches a keyring when the sandbox has
    none (tappass_host.sync.pull.pull_once): None, or why it could not."""
    from tappass_host import agent, ids, workspace
    from tappass_host import sandbox as sandbox_record
    from tappass_host.audit import AuditLog
    from tappass_host.keyring.store import store_for
    from tappass_host.oci import bundle as oci_bundle
    from tappass_host.paths import is_rootless
    from tappass_host.runtime import monitor

    sandbox = ensure_known(paths, name)
    manifest = agent.load(agent_spec)
    agent.check_entrypoint(manifest)
    runtime = find_runtime(paths, config, runtime_name)
    conmon = None if foreground_run else monitor.find_conmon(config["conmon_path"])
    from tappass_host.keyring import Limits

    keyring = current_keyring(paths, name, pull_keyring, Limits(**config["limits"]))
    agent_ids = ids.agent_ids(paths, name, config.agent_id_range)
    ids.check_runtime(agent_ids, runtime.name)
    record = sandbox_record.load(paths, name)
    rootless = is_rootless()
    if not rootless:  # rootless: the agent's host id is a mapped one; the runtime decides
        agent.check_readable(manifest, agent_ids.uid, agent_ids.gid)
    cid = container_id(name)
    with host_lock(paths):
        if is_running(sandbox):
            raise LifecycleError(f"sandbox {name!r} is already running")
        running = running_names(paths)
        if len(running) >= config["max_sandboxes"]:
            raise LifecycleError(
                f"{len(running)} sandboxes are running, the limit (max_sandboxes) is "
                f"{config['max_sandboxes']}: stop one first")
        store = store_for(paths, record)
        with store.transaction():
            store.adopt_group()
        workspace_warnings = workspace.attach(
            sandbox, config["filesystem.workspace_mb"], agent_ids.owner_uid,
            agent_ids.owner_gid, rootless)
        try:
            host = _with_egress(paths, name, keyring, config,
                                oci_bundle.host_capabilities(agent_ids, rootless, runtime.name))
            inputs = oci_bundle.layer_inputs(paths, name, record, keyring, manifest, config, host)
            built = oci_bundle.build(paths, inputs, rootless)
        except BaseException:
            _detach_network(paths, name)
            workspace.release(sandbox)
            raise
        warnings = built.rendered.warnings + workspace_warnings
        if runtime.has_state(cid):
            runtime.delete(cid)  # a stopped container of an earlier run
        if (record.agent, record.runtime) != (str(manifest.directory), runtime.name):
            record.agent, record.runtime = str(manifest.directory), runtime.name
            sandbox_record.save(sandbox, record)
        state = {"runtime": runtime.name, "runtime_binary": runtime.binary, "cid": cid,
                 "started_at": clock.now_text("microseconds"), "policy_version": keyring["policy_version"],
                 "agent": str(manifest.directory), "restart_policy": manifest.restart,
                 "foreground": foreground_run,
                 "restart_aspects": _aspects(keyring, built.rendered.restart),
                 "warnings": list(warnings),
                 "degraded": bool(built.rendered.unavailable)}
        had_log = sandbox.agent_log.exists()
        try:
            if foreground_run:
                # Under the lock, like a monitored start: a concurrent start
                # must count this sandbox against max_sandboxes.
                write_state(sandbox, {**state, "pid": os.getpid()})
            else:
                files = monitor_files(sandbox)
                sandbox.logs.mkdir(parents=True, exist_ok=True)
                pid = monitor.launch(runtime, conmon, cid, built.directory, files,
                                     sandbox.agent_log, config["log_max_bytes"],
                                     exit_command(paths, name))
                conmon_pid = int(files.conmon_pid.read_text().strip())
                write_state(sandbox, {**state, "pid": pid, "conmon_pid": conmon_pid})
                runtime.start(cid)
        except BaseException:
            _undo_start(sandbox, runtime, cid)
            _detach_network(paths, name)
            workspace.release(sandbox)
            if not had_log:
                sandbox.agent_log.unlink(missing_ok=True)  # conmon's, for nothing
            raise
    audit = AuditLog.for_host(paths)
    audit.append("sandbox.started", sandbox=name, details={
        "runtime": runtime.name, "policy_version": keyring["policy_version"],
        "agent": manifest.name, "foreground": foreground_run})
    for layer, feature in built.rendered.unavailable:
        audit.append("layer.unavailable", sandbox=name, details={"layer": layer, "feature": feature})
    for warning in warnings if warn else ():
        warn(warning)
    if not foreground_run:
        return Started(name, pid, runtime.name, keyring["policy_version"], warnings)
    try:
        ended = foreground(runtime, cid, built.directory)
        code = ended.code
        write_exit(paths, name, code, oom=ended.oom, started_at=state["started_at"])
    finally:
        # The attached run keeps the container (its cgroup counted OOM kills).
        if runtime.has_state(cid):
            runtime.delete(cid)
        _detach_network(paths, name)
        state_file(sandbox).unlink(missing_ok=True)
        release_workspace(paths, name)
        if remove:
            import shutil

            shutil.rmtree(sandbox.runtime, ignore_errors=True)
    return Started(name, 0, runtime.name, keyring["policy_version"], warnings,
                   exit_code=code)


def find_runtime(paths: HostPaths, config, name: str | None = None, binary: str = ""):
    """The OCI runtime `name` (default: config `runtime`). Config `runtime_path`
    applies to the runtime config names, whether or not `--runtime` repeats it."""
    from tappass_host.runtime.oci import OCIRuntime

    name = name or config["runtime"]
    override = binary or (config["runtime_path"] if name == config["runtime"] else "")
    return OCIRuntime.find(name, paths.runtime, override)


def _with_egress(paths: HostPaths, name: str, keyring: dict, config, host):
    """Network mode proxy: the sandbox's namespace and proxy listener
    (tappass_host.network), whose URL the network layer gives the agent. In
    any mode, what crashed sandboxes left of theirs is removed first."""
    from dataclasses import replace

    from tappass_host.network import control

    if (keyring.get("network") or {}).get("mode") != "proxy" or host.rootless:
        control.reap(paths, is_running)
        return host
    return replace(host, egress_proxy=control.attach(paths, name, config)["proxy_url"])


def _detach_network(paths: HostPaths, name: str) -> None:
    from tappass_host.network import control

    control.detach(paths, name)


def _undo_start(sandbox: SandboxPaths, runtime, cid: str) -> None:
    """A start that failed half-way leaves nothing behind: no monitor, no
    container, no runtime dir."""
    import shutil

    try:
        conmon_pid = int(monitor_files(sandbox).conmon_pid.read_text().strip())
    except (OSError, ValueError):
        conmon_pid = None
    if process_alive(conmon_pid, "conmon"):
        try:
            os.kill(conmon_pid, signals.SIGKILL)
        except ProcessLookupError:
            pass
    if runtime.has_state(cid):
        runtime.delete(cid)
    shutil.rmtree(sandbox.runtime, ignore_errors=True)


def _aspects(keyring: dict, names: frozenset[str]) -> str:
    """A digest of the keyring aspects whose change needs a restart."""
    import hashlib

    picked = {}
    for name in sorted(names):
        aspect, _, key = name.partition(".")
        value = keyring.get(aspect, {})
        picked[name] = value.get(key) if key and isinstance(value, dict) else value
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()


def status(paths: HostPaths, name: str) -> dict:
    """Everything `status` shows, from files only (no runtime call, no crypto)."""
    from tappass_host.clock import parse_timestamp

    sandbox = ensure_known(paths, name)
    state = read_json(state_file(sandbox)) or {}
    running = is_running(sandbox)
    exit_record = None if running else last_exit(sandbox, state)
    keyring = read_json(sandbox.keyring_payload)
    flags = []
    if keyring and parse_timestamp(keyring["expires_at"]) <= clock.now():
        flags.append("stale")
    if running and keyring and state.get("restart_aspects") and _aspects(
            keyring, frozenset(json.loads(sandbox.bundle_layers.read_text())
                               ["restart"])) != state["restart_aspects"]:
        flags.append("restart-pending")
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
    }


def shell(paths: HostPaths, name: str, command: list[str]) -> int:
    """Run `command` in the running sandbox with the agent's own process spec
    (same user, no capabilities, no_new_privs, seccomp): only argv differs."""
    import tempfile

    from tappass_host.runtime.oci import OCIRuntime

    sandbox = ensure_known(paths, name)
    if not is_running(sandbox):
        raise LifecycleError(f"sandbox {name!r} is not running")
    state = read_json(state_file(sandbox))
    process = read_json(sandbox.bundle_config)["process"]
    from tappass_host.landlock import launch_prefix

    process["args"] = launch_prefix(process["args"]) + command  # same Landlock ruleset
    process["terminal"] = sys.stdin.isatty() and sys.stdout.isatty()
    runtime = OCIRuntime.find(state["runtime"], paths.runtime, state.get("runtime_binary", ""))
    with tempfile.NamedTemporaryFile("w", dir=sandbox.runtime, suffix=".json") as spec:
        json.dump(process, spec)
        spec.flush()
        argv = runtime.argv("exec", "--process", spec.name)
        if process["terminal"]:
            argv.append("--tty")
        return subprocess.call([*argv, container_id(name)])
