"""The end of a run: `stop`, conmon's exit hook, and what both undo after
the agent (its network namespace, its workspace's mount)."""

from tappass_host import statefile
from tappass_host.errors import TappassError, describe
from tappass_host.paths import HostPaths
from tappass_host.processes import process_alive, wait_ended, wait_until
from tappass_host.runtime import container_id, runintent
from tappass_host.runtime.runstate import (
    LifecycleError, exit_details, host_lock, is_running, monitor_files, read_json,
    record_exit_from_monitor, state_file, write_state)


class StopNotRecorded(LifecycleError):
    """The sandbox was stopped; its exit record or audit event was not written
    (e.g. the state filesystem is full)."""


def stop(paths: HostPaths, name: str, runtime, timeout: float = 10,
         intent: str = "operator") -> dict:
    """Stop a running sandbox. `intent` (operator | expiry | policy_change |
    image_revoked) is
    recorded in state.json before the signal: the daemon's supervision never
    restarts a sandbox stopped on purpose (supervision.py). So is
    `stop_signalled`: whoever records the exit appends `sandbox.stopped` with
    `sandbox.exited` (runstate.write_exit: once per run, whoever comes first),
    and this process appends it only if no one did, e.g. when the agent ended
    on its own before the signal.

    This process records the exit itself, from conmon's exit file, rather
    than wait for conmon's exit hook, which records it too: the hook is a
    whole interpreter started after the agent's end, and waiting it out was
    most of a stop's time (issue 13). The hook may still be running when stop
    returns; the next start of the sandbox waits for it to end
    (runtime.start.await_last_monitor)."""
    from tappass_host.audit import AuditLog

    sandbox = paths.sandbox(name)
    state = read_json(state_file(sandbox))
    if not state or not is_running(sandbox):
        raise not_running(paths, name)
    audit = AuditLog.for_host(paths)
    mark = audit.end()  # a sandbox.stopped of `name` after here is this stop's
    write_state(sandbox, {**state, "stopped_by": intent, "stop_signalled": True})
    cid = container_id(name)
    runtime.kill(cid, "SIGTERM")
    if not wait_ended(state["pid"], None, timeout):
        runtime.kill(cid, "SIGKILL")
        wait_ended(state["pid"], None, 10)
    # a foreground start deletes its container after the exit it records
    deleting = None if state.get("foreground") else runtime.begin_delete(cid)
    releasing = Release(paths, name)
    unrecorded = []
    try:
        exit_record = _recorded_exit(paths, name, state)
    except (OSError, TappassError) as exc:
        from tappass_host import clock

        files = monitor_files(sandbox)
        exit_record = exit_details(files.exit_code(), files.oom_killed(), clock.now_text("microseconds"))
        unrecorded.append(("its exit", exc))
    finally:
        try:
            (deleting or runtime.begin_delete(cid)).wait()
        finally:
            releasing.wait()  # not left running while a failed delete is raised
    try:
        with statefile.locked(sandbox.exit_lock):  # the exit's appends are done
            recorded = any(e.get("event") == "sandbox.stopped" and e.get("sandbox") == name
                           for e in audit.events_after(mark))
        if not recorded:
            audit.append("sandbox.stopped", sandbox=name,
                         details={"code": exit_record.get("code"), "by": intent})
    except (OSError, TappassError) as exc:
        unrecorded.append(("the stop", exc))
    if intent == "operator":  # not brought back after a reboot either (supervision.py)
        runintent.clear(sandbox)
    if unrecorded:
        what = " and ".join(w for w, _ in unrecorded)
        raise StopNotRecorded(f"sandbox {name!r} stopped (exit code {exit_record.get('code')}), "
                              f"but {what} could not be recorded: {describe(unrecorded[0][1])}")
    return exit_record


def _recorded_exit(paths: HostPaths, name: str, state: dict) -> dict:
    """The exit of the run `state` describes, once its agent has ended: the
    foreground start's record (that process records its run's exit); else
    this process's, from conmon's exit file as soon as conmon has written it
    (the exit hook's, if the hook came first: write_exit)."""
    sandbox = paths.sandbox(name)
    if state.get("foreground"):
        if wait_until(lambda: (read_json(sandbox.exit_record) or {}).get("finished_at", "")
                      >= state["started_at"], 10):
            return read_json(sandbox.exit_record)
    else:
        files = monitor_files(sandbox)
        wait_until(lambda: files.exit_code() is not None
                   or not process_alive(state.get("conmon_pid"), "conmon"), 10, max_delay=0.002)
    return record_exit_from_monitor(paths, name)


def not_running(paths: HostPaths, name: str) -> LifecycleError:
    """The error for stopping a sandbox that is not running. One that exited
    on its own is marked as stopped by the operator all the same: a restart
    the daemon has pending for it is called off."""
    sandbox = paths.sandbox(name)
    runintent.clear(sandbox)  # its run state lost in a reboot, say: the daemon leaves it down
    state = read_json(state_file(sandbox))
    if state and not state.get("foreground") and not state.get("stopped_by"):
        write_state(sandbox, {**state, "stopped_by": "operator"})
        return LifecycleError(f"sandbox {name!r} is not running (it exited; the daemon will "
                              "not restart it)")
    return LifecycleError(f"sandbox {name!r} is not running")


def exit_hook(paths: HostPaths, name: str) -> dict | None:
    """conmon's exit command. conmon runs it even when `<runtime> create`
    failed, i.e. when no agent ever ran (and `start` has undone itself): it
    then has no exit code, and there is no exit to record. The release comes
    first, not beside the record: an exit on record means the run has let go
    of its mounts (which `status` readers and tests wait on)."""
    release(paths, name)
    if monitor_files(paths.sandbox(name)).exit_code() is None:
        return None
    return record_exit_from_monitor(paths, name)


def release(paths: HostPaths, name: str, *, ours: bool = False) -> None:
    """What a run holds once its agent has ended, let go: its network, its
    workspace's mount, its image root (`ours`: release_workspace's)."""
    detach_network(paths, name)
    release_workspace(paths, name, ours=ours)
    release_image_root(paths, name, ours=ours)


class Release:
    """`release` in a thread of its own, begun once the agent has ended, while
    the caller records the exit: the one waits on a trim and an unmount, the
    other on fsyncs, neither on the other (issue 13). `wait` raises what the
    release raised."""

    def __init__(self, paths: HostPaths, name: str, *, ours: bool = False):
        import _thread  # threading's import was 1 ms of every start (issue 13)

        self.error = None
        self.done = _thread.allocate_lock()
        self.done.acquire()
        _thread.start_new_thread(self._release, (paths, name, ours))

    def _release(self, paths: HostPaths, name: str, ours: bool) -> None:
        try:
            release(paths, name, ours=ours)
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.release()

    def wait(self) -> None:
        with self.done:
            pass
        if self.error is not None:
            raise self.error


def release_workspace(paths: HostPaths, name: str, *, ours: bool = False) -> None:
    """After a run: unmount the workspace's filesystem (tappass_host.workspace),
    unless a new run of the sandbox has started meanwhile (`ours`: the caller
    is the run, its state still says so, and no other can have started)."""
    import os

    sandbox = paths.sandbox(name)
    if not os.path.ismount(sandbox.workspace):  # its image is mounted there, if at all
        return
    from tappass_host import workspace

    with host_lock(paths):
        if ours or not is_running(sandbox):
            workspace.release(sandbox)


def release_image_root(paths: HostPaths, name: str, *, ours: bool = False) -> None:
    """After an image-based run: unmount its overlay (tappass_host.runtime.imageroot),
    unless a new run of the sandbox has started meanwhile (`ours`: as release_workspace)."""
    import os

    sandbox = paths.sandbox(name)
    if not os.path.ismount(sandbox.rootfs):
        return
    from tappass_host.runtime import imageroot

    with host_lock(paths):
        if ours or not is_running(sandbox):
            imageroot.unmount(sandbox)


def detach_network(paths: HostPaths, name: str) -> None:
    from tappass_host import network

    if not network.record_file(paths, name).exists():  # none attached (mode none)
        return  # and network.control (0.8M instructions) not imported (issue 13)
    from tappass_host.network import control

    control.detach(paths, name)
