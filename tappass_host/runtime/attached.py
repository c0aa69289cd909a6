"""A sandbox run attached (`start --foreground`): the agent's stdio are ours,
signals to us go to the agent, and its exit, OOM kill included, is ours to
report.

Not `<runtime> run`: it deletes the container, and with it the cgroup that
counted the OOM kill, before it returns. Instead, as conmon does:
`<runtime> create` (the agent waits on the runtime's exec fifo), note the
container's memory cgroup, `<runtime> start`, reap the agent ourselves (we
are a child subreaper, so the container's init is reparented to us), read
the cgroup's `oom_kill` counter, and only then delete the container.
"""

import os
import signal as signals
from collections import namedtuple
from pathlib import Path

from tappass_host import libc, paths

PR_SET_CHILD_SUBREAPER = 36


Exit = namedtuple("Exit", "code oom")  # int, bool


def become_subreaper() -> None:
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1)


def oom_counter(pid: int) -> Path | None:
    """The OOM-kill counter that counts `pid`'s sandbox and outlives it: its
    own cgroup's (memory_events), or, where systemd holds the sandbox in a
    scope, which goes with the sandbox's last process, its slice's
    (tappass_host.systemd.sandbox_slice; memory.events counts the kills of
    every cgroup below)."""
    events = memory_events(pid)
    if events is None or events.name != "memory.events":
        return events
    from tappass_host.systemd import SCOPE_PREFIX

    for directory in events.parents:
        if directory.name.startswith(f"{SCOPE_PREFIX}-") and directory.name.endswith(".slice"):
            return directory / "memory.events"
    return events


def memory_events(pid: int) -> Path | None:
    """The file holding the OOM-kill counter of `pid`'s memory cgroup."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return Path("/sys/fs/cgroup/memory" + path) / "memory.oom_control"
    for line in lines:
        if line.startswith("0::"):
            candidate = Path("/sys/fs/cgroup" + line[3:]) / "memory.events"
            if candidate.exists():
                return candidate
    return None


def oom_kills(events: Path | None) -> int:
    """`oom_kill N` from memory.oom_control (v1) or memory.events (v2)."""
    if events is None:
        return 0
    try:
        for line in events.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


class Creating:
    """A container's `<runtime> create` under way (begin)."""
    __slots__ = ("runtime", "cid", "bundle", "spawned")

    def __init__(self, runtime, cid: str, bundle: Path, spawned):
        self.runtime, self.cid, self.bundle, self.spawned = runtime, cid, bundle, spawned


def begin(runtime, cid: str, bundle: Path) -> Creating:
    """Begin creating the container attached to our stdout/stderr; the caller
    may do other work while the runtime does (`run` takes it from there)."""
    become_subreaper()
    # In the sandbox's own runtime dir, which only this start (under the host lock) uses.
    pid_file, log = _files(bundle)
    pid_file.unlink(missing_ok=True)
    # The container's stdio are create's: ours. The runtime's own messages
    # go to --log, so that a failure is still one line of ours.
    return Creating(runtime, cid, bundle, runtime.spawn(
        "--log", str(log), "create", "--bundle", str(bundle), "--pid-file", str(pid_file), cid,
        output=True))


def run(creating: Creating) -> Exit:
    """Once created: start the container and wait until the agent exits."""
    runtime, cid = creating.runtime, creating.cid
    pid_file, log = _files(creating.bundle)
    try:
        if creating.spawned.wait(None) != 0:
            from tappass_host.runtime.ociruntime import OCIRuntimeFailed, last_logged

            raise OCIRuntimeFailed(f"{runtime.name} create failed: {last_logged(log)}")
        pid = int(pid_file.read_text().strip())
        events = oom_counter(pid)
        before = oom_kills(events)

        def forward(signum, _frame):
            runtime.kill(cid, signals.Signals(signum).name)

        previous = {s: signals.signal(s, forward) for s in (signals.SIGTERM, signals.SIGINT)}
        try:
            runtime.start(cid, log)
            _, status = os.waitpid(pid, 0)
        finally:
            for s, handler in previous.items():
                signals.signal(s, handler)
    finally:
        pid_file.unlink(missing_ok=True)
        log.unlink(missing_ok=True)
    code = os.waitstatus_to_exitcode(status)
    return Exit(code=128 - code if code < 0 else code, oom=oom_kills(events) > before)


def _files(bundle: Path) -> tuple[Path, Path]:
    """The pid file and the runtime's log of an attached run, beside its bundle."""
    return bundle.parent / paths.ATTACHED_PID, bundle.parent / paths.RUNTIME_LOG
