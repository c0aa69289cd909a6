"""Escape probes inside a real sandbox started by `tappass-host start`, as the agent.

The agent package holds tests/probes/escape_probe.py (mounted at /opt/agent
like any agent) and a setuid-root copy of python; its entrypoint records the
sandbox's mount table, then execs the probe as PID 1, which tries each way
out and prints one JSON report. The host side has a (fake) machine key in
<state>/machine/key.pem that must stay invisible. One sandbox per runtime
serves every probe assertion; the fork bomb and the memory hog get their own.

Never run the probe on the host: as root its attempts would succeed.
"""

import json
import subprocess

import pytest

import patience
import escape_expectations as expect
from cgroup_limits import UNIFIED, cgroup_limits, own_cgroup
from sandbox_fixture import (  # noqa: F401  (fixtures: runtime, host)
    RUNTIMES,
    host,
    new_host,
    python_agent,
    require_runtime,
    runtime,
    unique_name,
    wait_for,
)
from tappass_host import paths, systemd
from tappass_host.runtime import container_id, runstate


@pytest.fixture(scope="module", params=RUNTIMES)
def probed(request):
    """Start the probe sandbox once per runtime; its report, mounts and record."""
    runtime = request.param
    require_runtime(runtime)
    h = new_host()
    try:
        key = h.make_machine_key()
        name = h.enroll(unique_name("probe", runtime))
        agent = expect.write_probe_agent(h.root / "agent", h.state)
        started = h.start(name, agent, runtime)
        assert started.returncode == 0, started.stderr
        status = h.wait_exited(name, timeout=60)
        log = h.logs(name)
        assert status["exit"]["code"] == 0, (status, log[-3000:])
        wrapper, report = expect.probe_output(log)
        record = json.loads(h.paths.sandbox(name).record.read_text())
        yield {"report": report, "mounts": wrapper["mountinfo"], "record": record, "key": key,
               "host": h, "state": h.state, "runtime": runtime}
    finally:
        h.cleanup()


def test_the_agent_is_its_own_unprivileged_uid(probed):
    report, record = probed["report"], probed["record"]
    assert report["uid"] != 0 and report["euid"] != 0 and report["gid"] != 0
    assert (report["uid"], report["gid"]) == (record["agent_uid"], record["agent_gid"])


def test_no_capabilities_no_new_privs_and_seccomp(probed):
    expect.no_privileges(probed)


def test_the_keyring_is_readable_but_not_writable(probed):
    expect.keyring_read_only(probed)


def test_the_machine_key_and_the_rest_of_the_state_are_not_visible(probed):
    assert probed["key"] == probed["state"] / "machine" / "key.pem"
    expect.state_invisible(probed)


def test_mount_unshare_setns_ptrace_setuid_and_escalation_syscalls_fail(probed):
    expect.escapes_fail(probed)


def test_the_root_filesystem_is_read_only_and_only_workspace_and_tmp_are_writable(probed):
    expect.only_workspace_and_tmp_writable(probed)


def test_no_host_pids_and_only_loopback(probed):
    expect.isolated(probed)


# --- limits -------------------------------------------------------------------------



def test_a_fork_bomb_stops_at_pids_max(runtime, host):
    name = host.enroll(unique_name("forks", runtime),
                       process={"memory_mb": 256, "pids_max": 32, "cpu_millis": 1000})
    agent = python_agent(host.root / "agent", expect.FORK_BOMB)
    assert host.start(name, agent, runtime).returncode == 0
    status = host.wait_exited(name, timeout=30)
    line = next(line for line in host.logs(name).splitlines() if line.startswith("{"))
    outcome = json.loads(line)
    assert outcome["error"] == "EAGAIN", outcome
    assert 16 <= outcome["forked"] < 32, outcome  # the agent itself is one of the 32
    assert status["exit"]["code"] == 0


def test_a_memory_hog_is_oom_killed_at_memory_mb(runtime, host):
    name = host.enroll(unique_name("hog", runtime),
                       process={"memory_mb": 48, "pids_max": 32, "cpu_millis": 1000})
    agent = python_agent(host.root / "agent", expect.MEMORY_HOG)
    assert host.start(name, agent, runtime).returncode == 0
    status = host.wait_exited(name, timeout=30)
    assert status["exit"]["oom"] is True, status
    assert status["exit"]["signal"] == "SIGKILL"
    held = [int(line.split()[1]) for line in host.logs(name).splitlines()
            if line.startswith("held ")]
    assert held and 4 <= max(held) < 48, held
    record = wait_for(lambda: host.exit_record(name), what="exit.json")
    assert record["oom"] is True and record["code"] == 137
    # Without conmon's word (under systemd the scope's cgroup can be gone before conmon
    # reads it: conmon#426; in the cgroup v2 lane under the driver it missed every one),
    # the counter that outlives the sandbox still says so.
    files = runstate.monitor_files(host.paths.sandbox(name))
    (files.persist / paths.CONMON_OOM).unlink(missing_ok=True)
    assert files.oom_killed()
    (files.oom_baseline).write_text(files.oom_baseline.read_text().rsplit("\n", 1)[0] + "\n99")
    assert not files.oom_killed()  # a counter that did not rise past its start: no OOM


# --- the limits as the kernel holds them (cgroup v1 here, v2 on most hosts) ---------

def test_the_limits_are_the_cgroups_and_an_update_changes_them_live(runtime, host, tmp_path):
    """memory_mb, pids_max and cpu_millis are the sandbox cgroup's memory.max,
    pids.max and cpu.max (v1: limit_in_bytes, pids.max, cfs quota/period);
    `sync apply` of new limits changes them in the running sandbox
    (`<runtime> update`); the OOM-kill counter read for a foreground run is
    the cgroup's memory.events (v1: memory.oom_control)."""
    hierarchy = "v2" if UNIFIED else "v1"
    name = host.enroll(unique_name("cgroup", runtime),
                       process={"memory_mb": 256, "pids_max": 128, "cpu_millis": 1000})
    agent = python_agent(host.root / "agent", """
        import time
        print("up", flush=True)
        time.sleep(3600)
    """)
    assert host.start(name, agent, runtime).returncode == 0
    host.wait_log(name, "up")
    pid = host.status(name)["pid"]
    assert cgroup_limits(pid) == {"hierarchy": hierarchy, "memory": 256 << 20, "pids": 128,
                                  "cpu": (100_000, 100_000), "oom_counter": True}
    envelope = tmp_path / "v2.dsse.json"
    envelope.write_bytes(host.envelope(name, 2, process={"memory_mb": 192, "pids_max": 40,
                                                         "cpu_millis": 500}))
    applied = host.run("sync", "apply", name, str(envelope))
    assert applied.returncode == 0, applied.stderr
    assert cgroup_limits(pid) == {"hierarchy": hierarchy, "memory": 192 << 20, "pids": 40,
                                  "cpu": (50_000, 100_000), "oom_counter": True}
    assert host.status(name)["pid"] == pid  # live: the same agent


def test_the_sandbox_cgroup_is_a_scope_in_tappass_slice_where_systemd_is_pid_1(runtime, host):
    """Where systemd is PID 1 (the runtimes' systemd cgroup driver) the
    sandbox's cgroup is the scope tappass-<name>.scope in tappass.slice,
    which systemctl and systemd-cgls show, and which goes with the sandbox;
    elsewhere the runtime makes the cgroup itself, named by the container id."""
    name = host.enroll(unique_name("scope", runtime))
    agent = python_agent(host.root / "agent", """
        import time
        print("up", flush=True)
        time.sleep(3600)
    """)
    assert host.start(name, agent, runtime).returncode == 0
    host.wait_log(name, "up")
    path = own_cgroup(host.status(name)["pid"])
    scope = f"tappass-{name}.scope"
    if not systemd.manages_cgroups():
        assert "tappass.slice" not in path and container_id(name) in path, path
        return

    def unit(*properties: str) -> dict:
        shown = subprocess.run(["systemctl", "show", *(f"--property={p}" for p in properties),
                                scope], capture_output=True, text=True, timeout=patience.seconds(60))
        return dict(line.split("=", 1) for line in shown.stdout.splitlines() if "=" in line)

    own_slice = systemd.sandbox_slice(name)
    within = f"/tappass.slice/{own_slice}/{scope}"
    assert path == within or path.startswith(within + "/"), path
    assert unit("ActiveState", "Slice") == {"ActiveState": "active", "Slice": own_slice}
    tree = subprocess.run(["systemd-cgls", "--no-pager", "--unit", "tappass.slice"],
                          capture_output=True, text=True, timeout=patience.seconds(60)).stdout
    assert scope in tree, tree
    assert host.run("stop", name, "--timeout", "5").returncode == 0
    wait_for(lambda: unit("ActiveState")["ActiveState"] != "active", 120,
             what=f"{scope} to go with the sandbox")
