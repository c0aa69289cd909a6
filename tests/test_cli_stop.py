"""How `stop` waits for the agent to end, and the next `start` for the last run's conmon
(with its exit hook), which stop does not wait out (processes.wait_ended): woken by the
process's pidfd when it ends, with the same answers as polling /proc gave: ended (a zombie
counts), still running at the timeout, or a pid that is another program's now. The stops
themselves, under crun and runc: tests/test_lifecycle.py."""

import subprocess
import sys

from tappass_host.processes import wait_ended


def test_the_wait_ends_when_the_process_does():
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                            stdin=subprocess.PIPE)
    try:
        assert wait_ended(proc.pid, None, 0.2) is False  # still running at the timeout
        proc.stdin.close()  # it ends (a zombie until reaped)
        assert wait_ended(proc.pid, None, 60) is True
        assert proc.poll() is not None
    finally:
        proc.kill()
        proc.wait()


def test_a_pid_of_another_program_or_none_has_ended():
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        assert wait_ended(sleeper.pid, "conmon", 60) is True  # not conmon: that one has ended
        assert wait_ended(None, "conmon", 60) is True
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_start_waits_for_the_last_runs_conmon_to_end(tmp_path):
    """The exit hook conmon runs after `stop` has returned releases what the run held;
    a new run of the sandbox begins only once it has ended (start.await_last_monitor)."""
    import json
    import shutil
    import threading

    from tappass_host.paths import HostPaths
    from tappass_host.runtime.start import _monitors, await_last_monitor

    monitor = tmp_path / "conmon"  # a program named conmon, running until told to end
    shutil.copy("/bin/sh", monitor)
    conmon = subprocess.Popen([str(monitor), "-c", "read line", "tappass-s"],
                              stdin=subprocess.PIPE)
    agent = subprocess.Popen(["true"])
    agent.wait()  # the run's agent has ended; its pid names no process now
    sandbox = HostPaths(state=tmp_path / "state", runtime=tmp_path / "run").sandbox("s")
    sandbox.run_state.parent.mkdir(parents=True)
    state = {"pid": agent.pid, "conmon_pid": conmon.pid, "cid": "tappass-s"}
    # a conmon where this run's was is waited for only if it monitors this run's container
    # (not another's that took the pid since)
    assert _monitors(conmon.pid, "tappass-s") and not _monitors(conmon.pid, "tappass-other")
    sandbox.run_state.write_text(json.dumps(state))
    waiter = threading.Thread(target=await_last_monitor, args=(sandbox, 60))
    try:
        waiter.start()
        waiter.join(0.3)
        assert waiter.is_alive()  # conmon (its exit hook) still runs
        conmon.stdin.close()
        waiter.join(60)
        assert not waiter.is_alive()
        assert conmon.poll() is not None
    finally:
        conmon.kill()
        conmon.wait()
        waiter.join(60)


def test_the_runtimes_kill_and_delete_run_with_their_output_discarded(tmp_path):
    """stop's kill and delete are spawned (posix_spawn, issue 13): the runtime
    runs with its arguments, its output goes nowhere and its status is not read."""
    from tappass_host.runtime.ociruntime import OCIRuntime

    called = tmp_path / "called"
    script = tmp_path / "crun"
    script.write_text(f'#!/bin/sh\necho "$@" >> {called}\necho noise; echo noise >&2\nexit 3\n')
    script.chmod(0o755)
    runtime = OCIRuntime("crun", str(script), tmp_path / "root")
    runtime.kill("cid", "SIGTERM")
    runtime.delete("cid")
    lines = called.read_text().splitlines()
    assert [line.split()[-3:] for line in lines] == [["kill", "cid", "SIGTERM"],
                                                   ["delete", "--force", "cid"]]
    assert all(line.startswith(f"--root {tmp_path / 'root'}") for line in lines)
    assert _children_named("crun") == []  # both reaped, no zombie left


def test_a_runtime_that_does_not_finish_is_killed_and_named(tmp_path):
    import pytest
    from tappass_host.runtime.ociruntime import OCIRuntime, OCIRuntimeFailed

    script = tmp_path / "crun"
    script.write_text("#!/bin/sh\nexec sleep 1000\n")
    script.chmod(0o755)
    runtime = OCIRuntime("crun", str(script), tmp_path / "root")
    with pytest.raises(OCIRuntimeFailed, match="crun kill did not finish in 0.2 s"):
        runtime._run_unread("kill", "cid", "SIGTERM", timeout=0.2)
    assert _children_named("sleep") == []  # killed and reaped


def _children_named(comm: str) -> list[int]:
    """This process's children (zombies included) running `comm`."""
    import os

    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.find("(") + 1:stat.rfind(")")]
        if name == comm and int(stat[stat.rfind(")") + 2:].split()[1]) == os.getpid():
            found.append(int(pid))
    return found
