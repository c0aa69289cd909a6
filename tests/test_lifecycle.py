"""The sandbox lifecycle through the real CLI, on real crun and runc under conmon.

start → status → logs → stop; a crashing and an OOM-killed agent; `start
--foreground --rm`; double start/stop; `max_sandboxes` under concurrent
starts; the keyring observed live by the running agent; `start` without a
current keyring; the fast paths of `status` and `logs`.

crun needs the cgroup quirk of DESIGN §12 handled by the caller: run under
scripts/in-crun-namespace (scripts/test does). A runtime that cannot start a
sandbox fails the test; nothing here is skipped.
"""

import json
import os
import queue
import shutil
import signal
import subprocess
import threading
from datetime import datetime, timedelta, timezone

import pytest

import patience
from audit_records import read_audit
import keyrings
from tappass_host import paths
from sandbox_fixture import (  # noqa: F401  (host is a fixture)
    HELLO_AGENT,
    RUNTIMES,
    host,
    one_line_error,
    python_agent,
    require_runtime,
    unique_name,
    wait_for,
    write_agent,
)

pytestmark = pytest.mark.parametrize("runtime", RUNTIMES)


@pytest.fixture(autouse=True)
def _runtime_installed(runtime):
    require_runtime(runtime)


def audit_events(host, name=None) -> list[str]:
    return [e["event"] for e in read_audit(host.paths.audit_log, sandbox=name)]


def ends_recorded(host, name) -> list[tuple]:
    """(seq, event, details) of `name`'s sandbox.exited and sandbox.stopped events;
    the audit log verified."""
    assert host.run("audit", "verify").returncode == 0
    return [(e["seq"], e["event"], e["details"].get("code"), e["details"].get("by"))
            for e in read_audit(host.paths.audit_log, sandbox=name)
            if e["event"] in ("sandbox.exited", "sandbox.stopped")]


def nothing_left(host, runtime, name) -> None:
    """No runtime dir, no container, no sandbox.started for `name`."""
    assert not host.paths.sandbox(name).runtime.exists(), \
        sorted(os.listdir(host.paths.sandbox(name).runtime))
    assert f"tappass-{name}" not in host.containers(runtime)
    assert "sandbox.started" not in audit_events(host, name)


# --- start, status, logs, stop ------------------------------------------------------


def test_start_status_logs_stop(runtime, host):
    name = host.enroll(unique_name("life", runtime))
    started = host.start(name, HELLO_AGENT, runtime)
    assert started.returncode == 0, started.stderr
    assert f"{name}: started" in started.stdout and runtime in started.stdout

    status = host.status(name)
    assert status["state"] == "running" and status["runtime"] == runtime
    assert status["keyring_version"] == 1 and status["exit"] is None
    pid = status["pid"]
    assert isinstance(pid, int) and os.path.exists(f"/proc/{pid}")
    assert host.container_state(runtime, name)["status"] == "running"
    text = host.run("status", name).stdout
    assert name in text and "running" in text and "keyring v1" in text

    host.wait_log(name, "hello from hello-agent: policy_version=1")

    stopped = host.run("stop", name, "--timeout", "5")
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.strip() == f"{name}: stopped (exit code 0)"
    status = host.status(name)
    assert status["state"] == "exited" and status["pid"] is None
    assert status["exit"]["code"] == 0 and status["exit"]["oom"] is False
    assert host.exit_record(name)["code"] == 0
    assert not os.path.exists(f"/proc/{pid}/cmdline")  # the agent is gone
    assert host.container_state(runtime, name) is None  # deleted by stop
    events = audit_events(host, name)
    assert events[-3:] == ["sandbox.started", "sandbox.exited", "sandbox.stopped"]
    assert "code 0" in host.run("status", name).stdout


def test_the_agent_observes_a_new_keyring_live(runtime, host, tmp_path):
    name = host.enroll(unique_name("live", runtime))
    assert host.start(name, HELLO_AGENT, runtime).returncode == 0
    host.wait_log(name, "policy_version=1")
    envelope = tmp_path / "v2.dsse.json"
    envelope.write_bytes(host.envelope(name, 2))
    applied = host.run("sync", "apply", name, str(envelope))
    assert applied.returncode == 0, applied.stderr
    host.wait_log(name, "policy changed: policy_version=2", timeout=5)
    status = host.status(name)
    assert status["state"] == "running"
    assert (status["keyring_version"], status["started_with_version"]) == (2, 1)


def test_a_crashing_agent_reports_its_exit_code(runtime, host):
    name = host.enroll(unique_name("crash", runtime))
    agent = python_agent(host.root / "agent", """
        import sys
        print("about to fail", flush=True)
        sys.exit(3)
    """)
    assert host.start(name, agent, runtime).returncode == 0
    status = host.wait_exited(name)
    assert status["exit"]["code"] == 3
    assert status["exit"]["signal"] is None and status["exit"]["oom"] is False
    wait_for(lambda: host.exit_record(name), what="exit.json")
    assert host.exit_record(name)["code"] == 3
    assert "about to fail" in host.logs(name)
    assert "code 3" in host.run("status", name).stdout
    wait_for(lambda: "sandbox.exited" in audit_events(host, name), what="the exit audited")


MEMORY_HOG = """
print("hogging", flush=True)
hoard = []
while True:
    hoard.append(bytearray(4 << 20))
"""


def test_an_oom_killed_agent_is_reported(runtime, host, tmp_path):
    name = host.enroll(unique_name("oom", runtime),
                       process={"memory_mb": 32, "pids_max": 32, "cpu_millis": 1000})
    agent = python_agent(host.root / "agent", MEMORY_HOG)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    started = subprocess.run(host.argv("start", name, "--agent", str(agent), "--runtime", runtime),
                             capture_output=True, text=True, timeout=patience.seconds(30), cwd=elsewhere)
    host.started.append(name)
    assert started.returncode == 0, started.stderr
    status = host.wait_exited(name)
    assert status["exit"]["oom"] is True, status
    assert (status["exit"]["code"], status["exit"]["signal"]) == (137, "SIGKILL")
    record = wait_for(lambda: host.exit_record(name), what="exit.json")
    assert record["oom"] is True and record["code"] == 137
    assert "OOM-killed" in host.run("status", name).stdout
    # conmon's own `oom` marker stays in the sandbox's runtime dir
    assert os.listdir(elsewhere) == []


def test_an_oom_killed_foreground_agent_is_reported(runtime, host):
    name = host.enroll(unique_name("fgoom", runtime),
                       process={"memory_mb": 32, "pids_max": 32, "cpu_millis": 1000})
    agent = python_agent(host.root / "agent", MEMORY_HOG)
    result = host.start(name, agent, runtime, "--foreground", "--rm")
    assert result.returncode == 137, result.stderr
    assert "hogging" in result.stdout
    record = host.exit_record(name)
    assert (record["code"], record["signal"], record["oom"]) == (137, "SIGKILL", True)
    assert "OOM-killed" in host.run("status", name).stdout
    assert host.containers(runtime) == [] and not host.paths.sandbox(name).runtime.exists()
    # killed by SIGKILL, not by the OOM killer: not an OOM
    name = host.enroll(unique_name("fgkill", runtime))
    host.started.append(name)
    proc = host.popen("start", name, "--agent", str(HELLO_AGENT), "--runtime", runtime,
                      "--foreground", "--rm")
    try:
        assert "policy_version=1" in proc.stdout.readline()
        subprocess.run([shutil.which(runtime), "--root", str(host.runtime_root(runtime)), "kill",
                        f"tappass-{name}", "KILL"], check=True, timeout=patience.seconds(10))
        assert proc.wait(timeout=patience.seconds(10)) == 137
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (host.exit_record(name)["signal"], host.exit_record(name)["oom"]) == ("SIGKILL", False)


def test_a_start_right_after_a_stop_is_a_run_of_its_own(runtime, host):
    """stop records the exit itself and returns while conmon's exit hook may
    still run; a start at once waits for that hook, so each run keeps what it
    holds (its workspace's mount) and has its own exit, recorded once."""
    name = host.enroll(unique_name("again", runtime))
    host.started.append(name)
    agent = write_agent(host.root / "agent", [
        "/bin/sh", "-c", "trap 'exit 0' TERM; echo ready; sleep 1000 & wait"])
    workspace = host.paths.sandbox(name).workspace
    for run in range(1, 4):
        started = host.start(name, agent, runtime)
        assert started.returncode == 0, started.stderr
        wait_for(lambda: host.logs(name).count("ready") == run, what=f"run {run}'s trap")
        assert host.status(name)["state"] == "running"
        assert os.path.ismount(workspace)  # not released under it by the last run's hook
        started_at = json.loads(host.paths.sandbox(name).run_state.read_text())["started_at"]
        stopped = host.run("stop", name, "--timeout", "5")
        assert stopped.stdout.strip() == f"{name}: stopped (exit code 0)", stopped.stderr
        assert host.exit_record(name)["started_at"] == started_at
    assert audit_events(host, name).count("sandbox.exited") == 3
    assert [(event, code, by) for _, event, code, by in ends_recorded(host, name)] == [
        ("sandbox.exited", 0, None), ("sandbox.stopped", 0, "operator")] * 3


def test_stop_invokes_the_runtime_only_to_signal_and_delete(runtime, host, tmp_path):
    """The runtime start found on PATH is not asked its --version by stop (start
    never asks it); one configured by `runtime_path`, not on PATH, still is, as
    start asks it."""
    wrappers, calls = tmp_path / "bin", tmp_path / "calls"
    wrappers.mkdir()
    wrapper = wrappers / runtime  # logs each invocation, then is the real runtime
    wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {calls}\nexec {shutil.which(runtime)} "$@"\n')
    wrapper.chmod(0o755)
    env = {**os.environ, "PATH": f"{wrappers}:{os.environ['PATH']}"}
    name = host.enroll(unique_name("calls", runtime))
    agent = write_agent(host.root / "agent", [
        "/bin/sh", "-c", "trap 'exit 0' TERM; echo ready; sleep 1000 & wait"])

    def stop_calls() -> list[str]:
        host.started.append(name)
        seen = host.logs(name).count("ready")
        assert host.run("start", name, "--agent", str(agent), "--runtime", runtime,
                        env=env).returncode == 0
        host.wait_log(name, "ready", seen=seen)
        calls.write_text("")
        assert host.run("stop", name, "--timeout", "5", env=env).returncode == 0
        return [" ".join(line.split()[-3:]) for line in calls.read_text().splitlines()]

    assert stop_calls() == [f"kill tappass-{name} SIGTERM", f"delete --force tappass-{name}"]
    host.configure(f'runtime = "{runtime}"\nruntime_path = "{wrapper}"\n')  # checked again
    env["PATH"] = os.environ["PATH"]
    assert stop_calls() == ["--version", f"kill tappass-{name} SIGTERM",
                            f"delete --force tappass-{name}"]
    assert host.exit_record(name)["code"] == 0


def test_stop_escalates_to_sigkill(runtime, host):
    name = host.enroll(unique_name("stubborn", runtime))
    agent = python_agent(host.root / "agent", """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ignoring SIGTERM", flush=True)
        while True:
            time.sleep(1)
    """)
    assert host.start(name, agent, runtime).returncode == 0
    host.wait_log(name, "ignoring SIGTERM")
    stopped = host.run("stop", name, "--timeout", "0.5")
    assert stopped.returncode == 0, stopped.stderr
    assert host.exit_record(name)["code"] == 137
    assert host.exit_record(name)["signal"] == "SIGKILL"
    assert host.status(name)["state"] == "exited"
    # the exit and the stop that caused it: one record each, appended together
    (seq, *exited), stopped = ends_recorded(host, name)
    assert exited == ["sandbox.exited", 137, None]
    assert stopped == (seq + 1, "sandbox.stopped", 137, "operator")


def test_logs_show_a_long_line_whole_and_tail(runtime, host):
    name = host.enroll(unique_name("long", runtime))
    agent = python_agent(host.root / "agent", """
        print("first", flush=True)
        print("x" * 20000, flush=True)
        print("last", flush=True)
    """)
    assert host.start(name, agent, runtime).returncode == 0
    host.wait_exited(name)
    raw = host.paths.sandbox(name).agent_log.read_text().splitlines()
    assert len(raw) > 3  # conmon wrote the long line in partial chunks
    assert host.logs(name).splitlines() == ["first", "x" * 20000, "last"]
    tail = host.run("logs", "--tail", "2", name)
    assert tail.stdout.splitlines() == ["x" * 20000, "last"]


def test_the_runtimes_own_messages_stay_out_of_the_agents_log(runtime, host):
    """The runtime shares the agent's stdio while it creates the container; its
    own messages (runc warns under the systemd cgroup driver: "skipping device
    /dev/char/10:200 for systemd") go to its `--log`, as a runtime that honours
    the option writes them, and `logs` shows the agent's lines only."""
    real = shutil.which(runtime)
    noisy = host.root / f"noisy-{runtime}"
    noisy.write_text(
        "#!/bin/sh\nlog=/dev/stderr; prev=\n"
        "for arg in \"$@\"; do [ \"$prev\" = --log ] && log=$arg; prev=$arg; done\n"
        "case \" $* \" in *\" create \"*) echo 'level=warning msg=\"runtime noise\"' >>\"$log\" ;; esac\n"
        f"exec {real} \"$@\"\n")
    noisy.chmod(0o755)
    host.configure(f'runtime = "{runtime}"\nruntime_path = "{noisy}"\n')
    name = host.enroll(unique_name("quiet", runtime))
    agent = python_agent(host.root / "agent", """
        print("agent line", flush=True)
    """)
    assert host.start(name, agent, runtime).returncode == 0
    host.wait_exited(name)
    assert host.logs(name).splitlines() == ["agent line"]
    logged = host.paths.sandbox(name).runtime / paths.RUNTIME_LOG
    assert "runtime noise" in logged.read_text()


# --- foreground ---------------------------------------------------------------------


def test_foreground_rm_returns_the_exit_code_and_leaves_no_runtime_state(runtime, host):
    name = host.enroll(unique_name("fg", runtime))
    agent = python_agent(host.root / "agent", """
        print("one shot", flush=True)
        raise SystemExit(3)
    """)
    result = host.start(name, agent, runtime, "--foreground", "--rm")
    assert result.returncode == 3, result.stderr
    assert "one shot" in result.stdout
    assert not host.paths.sandbox(name).runtime.exists()
    assert host.containers(runtime) == []
    assert host.exit_record(name)["code"] == 3
    status = host.status(name)
    assert status["state"] == "exited" and status["exit"]["code"] == 3
    assert audit_events(host, name)[-2:] == ["sandbox.started", "sandbox.exited"]

    again = host.start(name, agent, runtime, "--foreground", "--rm")
    assert again.returncode == 3, again.stderr  # and it can run again


def test_foreground_success_and_rm_needs_foreground(runtime, host):
    name = host.enroll(unique_name("fg0", runtime))
    agent = write_agent(host.root / "agent", ["/bin/true"])
    assert host.start(name, agent, runtime, "--foreground", "--rm").returncode == 0
    error = one_line_error(host.start(name, agent, runtime, "--rm"))
    assert "--rm needs --foreground" in error


def test_sigterm_to_a_foreground_start_reaches_the_agent(runtime, host):
    """As under systemd: `systemctl stop` signals tappass-host, which passes it on."""
    name = host.enroll(unique_name("fgsig", runtime))
    host.started.append(name)
    proc = host.popen("start", name, "--agent", str(HELLO_AGENT), "--runtime", runtime,
                      "--foreground")
    try:
        assert proc.stdout.readline().startswith("hello from hello-agent: policy_version=1")
        assert host.status(name)["state"] == "running"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=patience.seconds(10)) == 0  # hello-agent exits 0 on SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
    assert host.exit_record(name)["code"] == 0
    assert host.status(name)["state"] == "exited"
    assert host.containers(runtime) == []


def test_stop_stops_a_foreground_sandbox(runtime, host):
    name = host.enroll(unique_name("fgstop", runtime))
    host.started.append(name)
    proc = host.popen("start", name, "--agent", str(HELLO_AGENT), "--runtime", runtime,
                      "--foreground")
    try:
        assert "policy_version=1" in proc.stdout.readline()
        stopped = host.run("stop", name, "--timeout", "5")
        assert stopped.returncode == 0, stopped.stderr
        assert stopped.stdout.strip() == f"{name}: stopped (exit code 0)"
        assert proc.wait(timeout=patience.seconds(10)) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert host.status(name)["state"] == "exited"
    # recorded by the attached start's own process, the stop with the exit
    (seq, *exited), stopped = ends_recorded(host, name)
    assert exited == ["sandbox.exited", 0, None]
    assert stopped == (seq + 1, "sandbox.stopped", 0, "operator")


# --- refusals -----------------------------------------------------------------------


def test_starting_a_running_sandbox_and_stopping_a_stopped_one_are_clear_errors(runtime, host):
    name = host.enroll(unique_name("twice", runtime))
    assert host.start(name, HELLO_AGENT, runtime).returncode == 0
    pid = host.status(name)["pid"]
    error = one_line_error(host.start(name, HELLO_AGENT, runtime))
    assert error == f"tappass-host: error: sandbox {name!r} is already running"
    status = host.status(name)
    assert status["state"] == "running" and status["pid"] == pid  # untouched

    assert host.run("stop", name, "--timeout", "5").returncode == 0
    error = one_line_error(host.run("stop", name))
    assert error == f"tappass-host: error: sandbox {name!r} is not running"
    assert [e[1] for e in ends_recorded(host, name)] == ["sandbox.exited", "sandbox.stopped"]
    # a run that ended on its own: a stop finds it exited, and records no stop
    agent = write_agent(host.root / "quick", ["/bin/true"])
    assert host.start(name, agent, runtime).returncode == 0
    host.wait_exited(name)
    assert "is not running" in one_line_error(host.run("stop", name))
    ends = wait_for(lambda: (e := ends_recorded(host, name))[2:] and e, what="its exit recorded")
    assert [e[1] for e in ends] == ["sandbox.exited", "sandbox.stopped", "sandbox.exited"]
    never = host.enroll(unique_name("never", runtime))
    assert "is not running" in one_line_error(host.run("stop", never))
    assert "no sandbox named" in one_line_error(host.run("stop", "ghost"))


def test_a_moved_agent_id_range_moves_a_stopped_agent_never_a_running_one(runtime, host):
    """An operator moves agent_id_range to free the old one (for users, say): an agent left
    there would share their ids. A start refused because the sandbox runs changes nothing
    (its keyring and workspace stay its running agent's); the next start moves it."""
    name = host.enroll(unique_name("idmove", runtime))
    agent = python_agent(host.root / "ids-agent", """
        import os, signal, sys, time
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # PID 1: no default handling
        with open("/workspace/mine", "a") as f:
            f.write("x")
        print(f"agent ids {os.getuid()}:{os.getgid()}", flush=True)
        time.sleep(600)
    """)
    assert host.start(name, agent, runtime).returncode == 0
    host.wait_log(name, "agent ids")
    record_file = host.paths.sandbox(name).record
    old = json.loads(record_file.read_text())["agent_uid"]
    assert 200000 <= old < 250000
    # In the default range, away from stock Debian's subordinate ids (100000-231071 for two
    # users) and from the test users' (300000 up, rootless_fixture)
    host.configure('agent_id_range = "250000-250999"\n')
    error = one_line_error(host.start(name, agent, runtime))
    assert error == f"tappass-host: error: sandbox {name!r} is already running"
    record = json.loads(record_file.read_text())
    assert (record["agent_uid"], record["agent_gid"]) == (old, old)
    mine = host.paths.sandbox(name).workspace / "mine"
    assert (os.stat(mine).st_uid, os.stat(mine).st_gid) == (old, old)

    assert host.run("stop", name, "--timeout", "5").returncode == 0
    moved = host.start(name, agent, runtime)
    assert moved.returncode == 0, moved.stderr
    assert (f"sandbox {name!r}'s agent ids {old}:{old} lie outside agent_id_range "
            "250000-250999: its agent runs as 250000:250000 from now on") in moved.stderr
    host.wait_log(name, "agent ids 250000:250000")
    assert os.stat(mine).st_uid == os.stat(mine).st_gid == 250000
    record = json.loads(record_file.read_text())
    assert (record["agent_uid"], record["agent_gid"]) == (250000, 250000)


def test_max_sandboxes_holds_under_concurrent_starts(runtime, host):
    host.configure("max_sandboxes = 2\n")
    names = [host.enroll(unique_name(f"cap{i}", runtime)) for i in range(4)]
    agent = python_agent(host.root / "agent", """
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # PID 1 has no default action
        print("up", flush=True)
        while True:
            time.sleep(1)
    """)
    host.started += names
    procs = [host.popen("start", n, "--agent", str(agent), "--runtime", runtime) for n in names]
    results = [(p.wait(timeout=patience.seconds(60)), *p.communicate()) for p in procs]
    ok = [n for n, (code, _, _) in zip(names, results) if code == 0]
    refused = [err for code, _, err in results if code != 0]
    assert len(ok) == 2, results
    assert len(refused) == 2
    for err in refused:
        assert err.count("\n") == 1 and "max_sandboxes" in err and "Traceback" not in err
    running = [n for n in names if host.status(n)["state"] == "running"]
    assert sorted(running) == sorted(ok)
    assert len(host.containers(runtime)) == 2

    # a foreground sandbox counts too
    third = next(n for n in names if n not in ok)
    assert "max_sandboxes" in one_line_error(
        host.start(third, agent, runtime, "--foreground", "--rm"))
    assert host.run("stop", ok[0], "--timeout", "1").returncode == 0
    assert host.start(third, agent, runtime).returncode == 0


def test_start_refuses_a_sandbox_without_a_keyring(runtime, host):
    name = host.enroll(unique_name("nokr", runtime), apply=False)
    error = one_line_error(host.start(name, HELLO_AGENT, runtime))
    assert "has no keyring" in error and "sync apply" in error
    nothing_left(host, runtime, name)


def test_start_refuses_an_expired_keyring(runtime, host):
    from tappass_host.sync.apply import apply_update

    name = host.enroll(unique_name("expired", runtime), apply=False)
    then = datetime.now(timezone.utc) - timedelta(hours=1)
    envelope = keyrings.sign(keyrings.policy(1, now=then, ttl=60), host.signer)
    apply_update(host.paths, name, envelope, now=then + timedelta(seconds=1))
    error = one_line_error(host.start(name, HELLO_AGENT, runtime))
    assert "expired" in error and "policy_version 1" in error
    nothing_left(host, runtime, name)
    assert "stale" in host.status(name)["flags"]


def test_an_agent_package_the_agent_cannot_read_is_refused(runtime, host):
    name = host.enroll(unique_name("closed", runtime))
    agent = write_agent(host.root / "agent", ["/bin/true"])
    agent.chmod(0o700)
    error = one_line_error(host.start(name, agent, runtime))
    assert "is not readable by the agent" in error
    nothing_left(host, runtime, name)


# --- shell and logs -f ----------------------------------------------------------------


def test_shell_runs_as_the_agent_under_the_same_restrictions(runtime, host):
    name = host.enroll(unique_name("shell", runtime))
    assert host.start(name, HELLO_AGENT, runtime).returncode == 0
    uid = json.loads(host.paths.sandbox(name).record.read_text())["agent_uid"]
    result = host.run("shell", name, "--", "/bin/sh", "-c",
                      "id -u; grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status; "
                      "touch /usr/x 2>&1; cat /run/tappass/keyring/keyring.json >/dev/null && echo read")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == str(uid)
    status = dict(line.split(":\t") for line in lines[1:4])
    assert status == {"CapEff": "0000000000000000", "NoNewPrivs": "1", "Seccomp": "2"}
    assert "Read-only file system" in lines[4] and lines[5] == "read"
    assert host.run("shell", name, "--", "/bin/sh", "-c", "exit 7").returncode == 7
    assert host.run("stop", name, "--timeout", "5").returncode == 0
    assert "is not running" in one_line_error(host.run("shell", name, "--", "true"))


def test_logs_follow_prints_new_lines(runtime, host, tmp_path):
    name = host.enroll(unique_name("follow", runtime))
    assert host.start(name, HELLO_AGENT, runtime).returncode == 0
    host.wait_log(name, "policy_version=1")
    follow = host.popen("logs", "-f", name)
    printed: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [printed.put(line) for line in follow.stdout],
                     daemon=True).start()
    try:
        # a bounded wait: a follow that misses a line fails here instead of hanging the suite
        assert "policy_version=1" in printed.get(timeout=patience.seconds(60))
        envelope = tmp_path / "v2.dsse.json"
        envelope.write_bytes(host.envelope(name, 2))
        assert host.run("sync", "apply", name, str(envelope)).returncode == 0
        assert "policy changed: policy_version=2" in printed.get(timeout=patience.seconds(60))
    finally:
        follow.kill()
        follow.wait(timeout=patience.seconds(5))


# --- fast paths ---------------------------------------------------------------------

HEAVY = ("httpx", "jsonschema", "pyroute2", "cryptography")


def test_status_and_logs_stay_light(runtime, host):
    name = host.enroll(unique_name("light", runtime))
    assert host.start(name, HELLO_AGENT, runtime).returncode == 0
    host.wait_log(name, "policy_version=1")
    for args in (("status",), ("status", name), ("--json", "status", name), ("logs", name),
                 ("logs", "--tail", "1", name)):
        modules = host.modules_loaded(*args)
        assert "tappass_host.cli.lifecycle" in modules  # the measurement is real
        heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY)
        assert heavy == [], (args, heavy)


def test_sync_apply_applies_process_limits_live(runtime, host, tmp_path):
    # DESIGN §6: after a flip, `process` limits are applied live, whichever path brought the
    # keyring (`sync apply` went straight to the flip and left the old limits in place).
    from cgroup_limits import cgroup_limits

    name = host.enroll(unique_name("limits", runtime),
                       process={"memory_mb": 256, "pids_max": 128, "cpu_millis": 1000})
    assert host.start(name, HELLO_AGENT, runtime).returncode == 0
    host.wait_log(name, "policy_version=1")
    pid = host.status(name)["pid"]
    assert cgroup_limits(pid)["pids"] == 128
    envelope = tmp_path / "v2.dsse.json"
    envelope.write_bytes(host.envelope(name, 2, process={"memory_mb": 256, "pids_max": 40,
                                                         "cpu_millis": 1000}))
    applied = host.run("sync", "apply", name, str(envelope))
    assert applied.returncode == 0, applied.stderr
    assert "process limits updated live (pids 40)" in applied.stdout, applied.stdout
    assert cgroup_limits(pid)["pids"] == 40
