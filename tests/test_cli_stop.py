"""How `stop` waits for the agent and for conmon (with its exit hook) to end
(processes.wait_ended, which stop uses): woken by the process's pidfd when it ends, with the
same answers as polling /proc gave: ended (a zombie counts), still running at
the timeout, or a pid that is another program's now. The stops themselves,
under crun and runc: tests/test_lifecycle.py."""

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
