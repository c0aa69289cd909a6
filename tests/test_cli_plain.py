"""The hot commands' plain parser (tappass_host.cli.plain) against click: each
common form of `start`, `stop`, `status`, `logs` and conmon's `_exited`, and
their error forms, gives the same stdout, stderr and exit code read by the
plain parser as read by click; the plain one loads no click, and whatever it
does not read (help, unknown options, bad values) is click's own answer."""

import os
import re
import signal
import subprocess
from pathlib import Path

import patience
from sandbox_fixture import host, runtime, unique_name, write_agent  # noqa: F401  (fixtures)

# The same command line, once through main (the plain parser where it reads
# the form) and once straight through the click group; the first argument
# is a file that gets "click" if click was loaded.
_PLAIN = """
import atexit, sys
marker = sys.argv.pop(1)
atexit.register(lambda: open(marker, "w").write("click" if "click" in sys.modules else ""))
from tappass_host.cli import main
main(sys.argv[1:])
"""
_CLICK = """
import sys
sys.argv.pop(1)
from tappass_host.cli import Host, cli, run
run(cli, "tappass-host", sys.argv[1:], Host())
"""


def per_run(text: str) -> str:
    """`text` without what differs from one run to the next (pids, times)."""
    return re.sub(r"\d{4}-\d\d-\d\dT[\d:.]+Z", "T", re.sub(r"pid \d+", "pid N", text))


def both(host, tmp_path, *args: str, normal=lambda text: text, setup=lambda: None,
         after=lambda: None, reader_gone: bool = False):
    """(plain result, whether it loaded click) of `args`; asserts click's is the
    same. setup() and after() run around each. `reader_gone`: stdout is a pipe
    nobody reads (`| head` that has ended)."""
    marker = tmp_path / "click-loaded"
    results = []
    for source in (_PLAIN, _CLICK):
        setup()
        argv = host.argv(*args)
        assert argv[1:3] == ["-m", "tappass_host"]
        read, write = os.pipe()
        if reader_gone:
            os.close(read)
        result = subprocess.run([argv[0], "-c", source, str(marker), *argv[3:]],
                                stdout=write if reader_gone else subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, timeout=patience.seconds(60),
                                stdin=subprocess.DEVNULL)
        os.close(write)
        if not reader_gone:
            os.close(read)
        after()
        results.append(result)
    plain, clicked = results
    assert (plain.returncode, normal(plain.stdout), normal(plain.stderr)) == (
        clicked.returncode, normal(clicked.stdout), normal(clicked.stderr)), args
    return plain, marker.read_text() == "click"


def plain_and_no_click(host, tmp_path, *args: str, **kwargs):
    result, click_loaded = both(host, tmp_path, *args, **kwargs)
    assert not click_loaded, args
    return result


def test_status_and_logs_read_plainly_answer_as_click(host, tmp_path):
    ran = host.enroll(unique_name("plain"))
    idle = host.enroll(unique_name("idle"))
    host.configure("")
    agent = write_agent(host.root / "agent", [
        "/bin/sh", "-c", r"echo one; printf 'two\033[31m red\n'; printf 'caf\303\251\n'"])
    assert host.start(ran, agent, "crun").returncode == 0
    host.wait_exited(ran)
    for args in (("status",), ("status", ran), ("status", idle), ("--json", "status"),
                 ("status", ran, "--json"), ("--json", "status", ran, "-v"),
                 ("logs", ran), ("logs", ran, "--tail", "1"), ("logs", ran, "--tail=2"),
                 ("logs", "--tail", "1", ran), ("logs", ran, "--raw"), ("logs", ran, "--json"),
                 ("logs", idle), ("status", "nosuch"), ("logs", "nosuch", "--tail", "1"),
                 ("status", "../x"), ("logs", ran, "--tail", "0"),
                 ("_exited", "nosuch")):
        plain_and_no_click(host, tmp_path, *args)
    assert plain_and_no_click(host, tmp_path, "logs", ran).stdout == (
        "one\ntwo\\x1b[31m red\ncafé\n")
    for args in (("logs", ran), ("status",), ("--json", "status", ran)):  # `| head` ended
        assert plain_and_no_click(host, tmp_path, *args, reader_gone=True).returncode == 1
    # forms only click reads: the same answer, from click
    for args in (("status", "--help"), ("logs", "-h"), ("status", ran, idle),
                 ("logs", ran, "--tail", "x"), ("logs", ran, "--tail"), ("logs",),
                 ("logs", ran, "--tail="), ("status", "--bogus"), ("status", "--json=1"),
                 ("logs", ran, "--", "x"), ("logs", ran, "--tail", "-1"), ("--version",),
                 ("inspect", ran)):
        assert both(host, tmp_path, *args)[1], args


def test_start_and_stop_read_plainly_answer_as_click(host, runtime, tmp_path):
    name = host.enroll(unique_name("plain", runtime))
    never = host.enroll(unique_name("never", runtime))
    host.configure("")
    waiting = write_agent(host.root / "waiting", [
        "/bin/sh", "-c", "trap 'exit 0' TERM; echo ready; sleep 1000 & wait"])
    failing = write_agent(host.root / "failing", ["/bin/sh", "-c", "echo out; exit 3"])
    host.started += [name, never]
    result = plain_and_no_click(host, tmp_path, "start", name, "--agent", str(failing),
                                "--runtime", runtime, "--foreground", "--rm")
    assert result.returncode == 3
    def start_waiting():
        # Until its trap is set, a SIGTERM to the shell (PID 1 of its namespace) is dropped.
        seen = host.logs(name).count("ready")
        started = host.run("start", name, "--agent", str(waiting), "--runtime", runtime)
        assert started.returncode == 0, started.stderr
        assert re.fullmatch(rf"{name}: started \(pid \d+, {runtime}, policy_version 1\)\n",
                            started.stdout)
        host.wait_log(name, "ready", seen=seen)

    for form in (("--json", "stop", name, "--timeout", "10"), ("stop", name, "--timeout=5"),
                 ("stop", name)):  # a running agent for each
        assert plain_and_no_click(host, tmp_path, *form, setup=start_waiting,
                                  normal=per_run).returncode == 0
    # a detached start, read plainly and by click (its pid differs)
    result = plain_and_no_click(host, tmp_path, "start", name, "--agent", str(failing),
                                "--runtime", runtime, normal=per_run,
                                after=lambda: host.wait_exited(name))
    assert result.returncode == 0

    def exited_on_its_own():
        assert host.start(name, failing, runtime).returncode == 0
        host.wait_exited(name)

    assert plain_and_no_click(host, tmp_path, "stop", name, setup=exited_on_its_own).returncode == 1
    for args in (("start", name, "--rm"), ("start", name, "--runtime", "bogus"),
                 ("start", never), ("start", "nosuch", "--agent", str(waiting)),
                 ("stop", "nosuch"), ("stop", never, "--timeout", "1e400")):
        assert plain_and_no_click(host, tmp_path, *args).returncode != 0, args
    for args in (("start", name, "--bogus"), ("start", "--help"), ("start",),
                 ("stop", name, "--timeout", "soon"),
                 ("start", name, "--foreground=1"), ("stop", "-h")):
        result, click_loaded = both(host, tmp_path, *args)
        assert click_loaded and result.returncode != 0 or "--help" in args or "-h" in args, args


def test_an_interrupted_follow_ends_as_under_click(host, tmp_path):
    name = host.enroll(unique_name("follow"))
    host.configure("")
    agent = write_agent(host.root / "agent", ["/bin/sh", "-c", "echo one"])
    assert host.start(name, agent, "crun").returncode == 0
    host.wait_exited(name)
    ended = []
    for source in (_PLAIN, _CLICK):
        argv = host.argv("logs", name, "-f")
        # ^C as a terminal delivers it: a suite started in the background (`.ci/run &`)
        # passes SIGINT on ignored, and python then keeps it ignored (seen in CI: SigIgn).
        follow = subprocess.Popen([argv[0], "-c", source, str(tmp_path / "m"), *argv[3:]],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  stdin=subprocess.DEVNULL,
                                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        assert follow.stdout.readline() == "one\n"  # it is following
        follow.send_signal(signal.SIGINT)
        try:
            out, err = follow.communicate(timeout=patience.seconds(30))
        except subprocess.TimeoutExpired:  # seen once in CI under load: say where it was
            where = {key: Path(f"/proc/{follow.pid}/{key}").read_text().strip()
                     for key in ("wchan", "stat")}
            where["signals"] = [line for line in Path(f"/proc/{follow.pid}/status").read_text()
                                .splitlines() if line.startswith(("Sig", "Shd", "Threads"))]
            follow.kill()
            out, err = follow.communicate()
            raise AssertionError(f"the follow did not end on SIGINT: {where}; "
                                 f"stderr: {err[-2000:]!r}") from None
        ended.append((follow.returncode, out, err))
    assert ended[0] == ended[1] == (130, "", "\ntappass-host: aborted\n")
