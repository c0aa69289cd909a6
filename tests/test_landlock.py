"""Landlock in the kernel layer, inside real sandboxes on real crun and runc.

A probe agent tries to read and write inside and outside the allowed set and
prints one JSON report. The same probe runs landlocked (this host has ABI 7)
and, in `best-effort` mode with the host's detection lowered to ABI 0 by the
test hook, without Landlock: what Landlock refuses must then succeed, so
every EACCES below is Landlock's doing, not the mounts'. The agent itself
tries to widen its ruleset (stacking a permissive one) and fails.

crun needs the cgroup quirk of DESIGN §12 handled by the caller
(scripts/in-crun-namespace). Nothing here is skipped.
"""

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from audit_records import read_audit
from sandbox_fixture import (  # noqa: F401  (fixtures: runtime, host)
    HELLO_AGENT,
    host,
    one_line_error,
    python_agent,
    runtime,
    unique_name,
    write_agent,
)
from tappass_host import landlock

LAUNCHER = Path(landlock.__file__).with_name("sandbox_launcher") / "landlock_exec.py"
SYS_FILE = "/sys/devices/system/cpu/online"  # visible (sysfs, read-only), not in the rules
NO_LANDLOCK = {**os.environ, landlock.TEST_HOOK_ENV: "0"}

PROBE = r"""
import ctypes, json, multiprocessing, os, struct, subprocess, sys, tempfile, threading

def attempt(fn):
    try:
        fn()
        return "ok"
    except OSError as error:
        return os.strerror(error.errno)

def read(path):
    return attempt(lambda: open(path, "rb").read(1))

def write(path):  # create (or open) for writing: no data, which an mqueue would refuse
    return attempt(lambda: os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)))

def square(x):
    return x * x

def stack_permissive_ruleset():
    # An agent that tries to widen its own ruleset: a new layer that allows
    # reading everything under / can only narrow what the first one allows.
    syscall = ctypes.CDLL(None, use_errno=True).syscall
    attr = struct.pack("=Q", 1 << 2)  # handle READ_FILE
    fd = syscall(444, attr, ctypes.c_size_t(8), ctypes.c_uint32(0))
    root = os.open("/", os.O_PATH)
    rule = struct.pack("=Qi", 1 << 2, root)
    added = syscall(445, fd, 1, rule, ctypes.c_uint32(0))
    restricted = syscall(446, fd, ctypes.c_uint32(0))
    return {"calls": [fd >= 0, added, restricted], "sys": read(SYS_FILE)}

SYS_FILE, READ_ONLY = sys.argv[1], sys.argv[2]
report = {
    "reads": {p: read(p) for p in (SYS_FILE, "/etc/hostname", "/proc/self/status",
                                   "/run/tappass/keyring/keyring.json", "/opt/agent/main.py",
                                   READ_ONLY + "/data.txt", "/dev/urandom")},
    "writes": {p: write(p) for p in ("/dev/mqueue/probe", "/workspace/probe", "/tmp/probe",
                                     "/dev/shm/probe", "/dev/null")},
    "listdir_dev_mqueue": attempt(lambda: os.listdir("/dev/mqueue")),
    "subprocess": subprocess.run(["/bin/sh", "-c", "echo hi >/dev/null; echo sub"],
                                 capture_output=True, text=True).stdout.strip(),
}
with multiprocessing.get_context("fork").Pool(2) as pool:
    report["multiprocessing"] = pool.map(square, [1, 2, 3])
with tempfile.TemporaryDirectory() as tmp:
    report["tempdir"] = os.listdir(tmp) == []
    threading.Thread(target=lambda: None).start()
libc = ctypes.CDLL(None, use_errno=True)
inotify = libc.inotify_init1(0)
report["inotify_keyring"] = libc.inotify_add_watch(inotify, b"/run/tappass/keyring", 0x80) >= 0
report["stacked"] = stack_permissive_ruleset()
print("REPORT " + json.dumps(report), flush=True)
"""


@pytest.fixture
def read_only_dir():
    """A host directory the keyring lists in `filesystem.read_only` (outside /tmp,
    so that nothing but its own rule makes it readable)."""
    directory = Path("/var/tmp") / f"tp-ll-{uuid.uuid4().hex[:8]}"
    (directory / "ref").mkdir(parents=True)
    (directory / "ref" / "data.txt").write_text("reference data\n")
    directory.chmod(0o755)
    (directory / "ref").chmod(0o755)
    try:
        yield directory / "ref"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def audit(host, name: str) -> list[dict]:
    return read_audit(host.paths.audit_log, sandbox=name)


def probe_report(host, runtime, read_only_dir, env=None) -> tuple[str, dict]:
    name = host.enroll(unique_name("ll", runtime),
                       filesystem={"read_only": [str(read_only_dir)]})
    agent = python_agent(host.root / f"agent-{name}", PROBE, SYS_FILE, str(read_only_dir))
    host.started.append(name)
    started = host.run("start", name, "--agent", str(agent), "--runtime", runtime, env=env)
    assert started.returncode == 0, started.stderr
    status = host.wait_exited(name, timeout=30)
    log = host.logs(name)
    assert status["exit"]["code"] == 0, log[-3000:]
    line = next(line for line in log.splitlines() if line.startswith("REPORT "))
    return name, json.loads(line[len("REPORT "):])


def test_outside_the_rules_is_refused_only_under_landlock(runtime, host, read_only_dir):
    name, confined = probe_report(host, runtime, read_only_dir)
    assert host.status(name)["flags"] == []
    host.configure('kernel_layer = "best-effort"\n')
    _, free = probe_report(host, runtime, read_only_dir, env=NO_LANDLOCK)

    denied = "Permission denied"
    assert confined["reads"][SYS_FILE] == denied and free["reads"][SYS_FILE] == "ok"
    assert confined["writes"]["/dev/mqueue/probe"] == denied
    assert free["writes"]["/dev/mqueue/probe"] == "ok"
    assert confined["listdir_dev_mqueue"] == denied and free["listdir_dev_mqueue"] == "ok"
    allowed_reads = {p: "ok" for p in confined["reads"] if p != SYS_FILE}
    assert {p: r for p, r in confined["reads"].items() if p != SYS_FILE} == allowed_reads
    assert {p: r for p, r in confined["writes"].items() if "mqueue" not in p} == {
        "/workspace/probe": "ok", "/tmp/probe": "ok", "/dev/shm/probe": "ok", "/dev/null": "ok"}
    # An ordinary Python workload is unaffected.
    for report in (confined, free):
        assert report["subprocess"] == "sub"
        assert report["multiprocessing"] == [1, 4, 9] and report["tempdir"] is True
        assert report["inotify_keyring"] is True  # agents watch the keyring directory
    # Stacking a permissive ruleset succeeds but widens nothing.
    assert confined["stacked"] == {"calls": [True, 0, 0], "sys": denied}


def test_a_write_outside_workspace_and_tmp_is_refused(runtime, host):
    name = host.enroll(unique_name("llw", runtime))
    assert host.start(name, HELLO_AGENT, runtime).returncode == 0
    script = ("for p in /dev/mqueue/w /dev/shm/w /tmp/w /workspace/w /run/tappass/w /etc/w; do "
              "if (echo x > $p) 2>/dev/null; then echo $p ok; else echo $p refused; fi; done; "
              "mkdir /dev/mqueue/d 2>&1 | grep -c 'Permission denied'; "
              "ln -s /workspace/w /dev/mqueue/l 2>&1 | grep -c 'Permission denied'")
    result = host.run("shell", name, "--", "/bin/sh", "-c", script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:8] == [
        "/dev/mqueue/w refused", "/dev/shm/w ok", "/tmp/w ok", "/workspace/w ok",
        "/run/tappass/w refused", "/etc/w refused", "1", "1"]


def test_hello_agent_runs_and_sees_flips_under_landlock(runtime, host):
    name = host.enroll(unique_name("llhello", runtime))
    assert host.start(name, HELLO_AGENT, runtime).returncode == 0
    host.wait_log(name, "hello from hello-agent: policy_version=1")
    host.apply(name)
    host.wait_log(name, "policy changed: policy_version=2")
    config = json.loads((host.paths.sandbox(name).bundle / "config.json").read_text())
    args = config["process"]["args"]
    assert args[:4] == landlock.LAUNCH and args[args.index("--") + 1:] == [
        "python3", "/opt/agent/agent.py"]
    layers = json.loads((host.paths.sandbox(name).bundle / "layers.json").read_text())
    assert layers["provenance"]["process.args"] == "kernel"
    # The agent is PID 1 (the launcher exec'd it) and is itself landlocked.
    result = host.run("shell", name, "--", "/bin/sh", "-c",
                      "tr '\\0' ' ' </proc/1/cmdline; echo; cat /proc/1/status >/dev/null && echo ok")
    assert result.stdout.splitlines() == ["python3 /opt/agent/agent.py ", "ok"], result


def test_shell_runs_under_the_same_ruleset(runtime, host):
    name = host.enroll(unique_name("llsh", runtime))
    assert host.start(name, HELLO_AGENT, runtime).returncode == 0
    read_sys = ["shell", name, "--", "/bin/cat", SYS_FILE]
    refused = host.run(*read_sys)
    assert refused.returncode != 0 and "Permission denied" in refused.stderr, refused
    keyring = host.run("shell", name, "--", "/bin/cat", "/run/tappass/keyring/keyring.json")
    assert json.loads(keyring.stdout)["policy_version"] == 1
    launcher = host.run("shell", name, "--", "/bin/cat", landlock.LAUNCHER)
    assert "Permission denied" in launcher.stderr  # not even the launcher is readable
    assert host.run("stop", name, "--timeout", "5").returncode == 0

    host.configure('kernel_layer = "best-effort"\n')
    assert host.run("start", name, "--agent", str(HELLO_AGENT), "--runtime", runtime,
                    env=NO_LANDLOCK).returncode == 0
    free = host.run(*read_sys)
    assert free.returncode == 0 and free.stdout.strip(), free


def test_best_effort_without_landlock_is_degraded_and_audited(runtime, host):
    host.configure('kernel_layer = "best-effort"\n')
    name = host.enroll(unique_name("lldeg", runtime))
    host.started.append(name)
    started = host.run("start", name, "--agent", str(HELLO_AGENT), "--runtime", runtime,
                       env=NO_LANDLOCK)
    assert started.returncode == 0, started.stderr
    assert "warning: kernel layer degraded" in started.stderr and "Landlock" in started.stderr
    host.wait_log(name, "policy_version=1")
    assert host.status(name)["flags"] == ["degraded"]
    plain = host.run("status", name)
    assert "degraded" in plain.stdout
    unavailable = [e for e in audit(host, name) if e["event"] == "layer.unavailable"]
    assert [e["details"] for e in unavailable] == [{"layer": "kernel", "feature": "landlock"}]
    args = json.loads((host.paths.sandbox(name).bundle / "config.json").read_text())[
        "process"]["args"]
    assert args == ["python3", "/opt/agent/agent.py"]
    # The next start on a host with Landlock is confined and no longer degraded.
    assert host.run("stop", name, "--timeout", "5").returncode == 0
    assert host.run("start", name, "--agent", str(HELLO_AGENT), "--runtime",
                    runtime).returncode == 0
    assert host.status(name)["flags"] == []


def test_a_foreground_start_warns_before_the_agent_runs(runtime, host):
    """An operator watching a foreground agent sees it is degraded up front."""
    host.configure('kernel_layer = "best-effort"\n')
    name = host.enroll(unique_name("llfg", runtime))
    agent = python_agent(host.root / "agent-fg", "import sys\nprint('AGENT-RAN', file=sys.stderr)\n")
    host.started.append(name)
    started = host.run("start", name, "--agent", str(agent), "--runtime", runtime,
                       "--foreground", "--rm", env=NO_LANDLOCK)
    assert started.returncode == 0, started.stderr
    warned = started.stderr.index("warning: kernel layer degraded")
    assert warned < started.stderr.index("AGENT-RAN"), started.stderr
    assert started.stderr.count("warning: kernel layer degraded") == 1


def test_required_without_landlock_fails_the_start_leaving_nothing(runtime, host):
    name = host.enroll(unique_name("llreq", runtime))
    host.started.append(name)
    result = host.run("start", name, "--agent", str(HELLO_AGENT), "--runtime", runtime,
                      env=NO_LANDLOCK)
    error = one_line_error(result)
    assert "no Landlock" in error and 'kernel_layer = "best-effort"' in error
    assert not host.paths.sandbox(name).runtime.exists()
    assert f"tappass-{name}" not in host.containers(runtime)
    assert [e["event"] for e in audit(host, name)] == ["keyring.applied"]


def test_agent_env_for_the_dynamic_loader_is_refused(runtime, host, tmp_path):
    """LD_PRELOAD would run the agent's code in the launcher before the ruleset applies."""
    name = host.enroll(unique_name("llld", runtime))
    agent = write_agent(tmp_path / "agent", ["python3", "/opt/agent/agent.py"],
                        files={"agent.py": "print('ran')\n"}, env={"LD_PRELOAD": "/opt/agent/x.so"})
    host.started.append(name)
    error = one_line_error(host.start(name, agent, runtime))
    assert "LD_PRELOAD" in error
    assert not host.paths.sandbox(name).runtime.exists()


def test_a_layer_dropping_the_launcher_is_refused(runtime, host):
    """Identity sets the agent's argv; run after kernel it would drop the launcher."""
    host.configure('appliers = ["kernel", "identity", "filesystem", "keyring", "network", '
                   '"resources", "harness", "gateway"]\n')
    name = host.enroll(unique_name("llord", runtime))
    host.started.append(name)
    error = one_line_error(host.start(name, HELLO_AGENT, runtime))
    assert "layer 'identity' broke invariant: process.args must run the agent through the " \
        "Landlock launcher" in error


# --- the launcher and the detection, on their own ---------------------------------


def test_launcher_fails_closed(tmp_path):
    """A rule it cannot apply, or no command: the command never runs."""
    marker = tmp_path / "ran"
    for rules, message in ((["bogus=/usr"], "bad rule"), (["rx=relative"], "bad rule"),
                           ([], "cannot run /bin/touch: Permission denied")):  # nothing allowed
        argv = [landlock.PYTHON, "-I", "-S", str(LAUNCHER), *rules, "--", "/bin/touch",
                str(marker)]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        assert result.returncode == 126 and message in result.stderr
        assert not marker.exists()
    result = subprocess.run([landlock.PYTHON, "-I", "-S", str(LAUNCHER), "rx=/usr", "--"],
                            capture_output=True, text=True, timeout=10)
    assert result.returncode == 126 and "no command" in result.stderr


def test_launcher_handles_only_what_each_abi_knows():
    import importlib.util

    spec = importlib.util.spec_from_file_location("landlock_exec", LAUNCHER)
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    v1 = launcher.handled_rights(1)
    assert v1 == (1 << 13) - 1
    assert launcher.handled_rights(2) == v1 | 1 << 13                      # + refer
    assert launcher.handled_rights(3) == launcher.handled_rights(4) == v1 | 3 << 13  # + truncate
    assert launcher.handled_rights(5) == launcher.handled_rights(7) == v1 | 7 << 13  # + ioctl_dev


def test_the_test_hook_can_only_lower_the_abi(monkeypatch):
    real = landlock.kernel_abi()
    assert real >= 1, "this host has Landlock (DESIGN §12)"
    monkeypatch.setenv(landlock.TEST_HOOK_ENV, "99")
    assert landlock.host_abi() == real
    monkeypatch.setenv(landlock.TEST_HOOK_ENV, "0")
    assert landlock.host_abi() == 0
    monkeypatch.delenv(landlock.TEST_HOOK_ENV)
    assert landlock.host_abi() == real


def test_the_invariants_keep_the_launcher_once_it_is_mounted(tmp_path):
    """A layer replacing process.args after the kernel layer would run the agent
    unconfined: with the launcher mounted, args must go through it."""
    from oci_fixture import invariant_args, locked_down_config

    from tappass_host.layers.kernel import launcher_mount
    from tappass_host.oci import invariants

    def check(args, mounts, layer="evil"):
        config = locked_down_config(tmp_path, args=args, extra_mounts=mounts)
        invariants.check(config, **invariant_args(tmp_path),
                         provenance={"process.args": layer})

    wrapped = landlock.command(["rx=/usr"], ["/bin/true"])
    check(wrapped, [launcher_mount()], layer="kernel")
    check(["/bin/true"], [])  # no launcher mounted: Landlock not in use
    for args in (["/bin/true"], [*landlock.LAUNCH, "rx=/usr", "/bin/true"],
                 [*landlock.LAUNCH, "rx=/usr", "--"], ["/bin/sh", "-c", " ".join(wrapped)],
                 landlock.command(["rw=/"], ["/bin/true"])):  # widened by another layer
        with pytest.raises(invariants.InvariantViolation,
                           match="layer 'evil' broke invariant: process.args must run the agent "
                                 "through the Landlock launcher"):
            check(args, [launcher_mount()])


def test_the_invariants_want_the_launcher_where_the_host_has_landlock(tmp_path):
    """A kernel layer replaced by one that sets seccomp but no launcher would
    run the agent without Landlock on a host that has it: refused."""
    from oci_fixture import invariant_args, locked_down_config

    from tappass_host.layers.kernel import launcher_mount
    from tappass_host.oci import invariants

    def check(mounts, args, landlock_available):
        config = locked_down_config(tmp_path, args=args, extra_mounts=mounts)
        invariants.check(config, **invariant_args(tmp_path), landlock=landlock_available,
                         provenance={"process.args": "kernel"})

    check([], ["/bin/true"], landlock_available=False)  # best-effort host without Landlock
    check([launcher_mount()], landlock.command(["rx=/usr"], ["/bin/true"]),
          landlock_available=True)
    with pytest.raises(invariants.InvariantViolation,
                       match="broke invariant: mounts must mount the Landlock launcher"):
        check([], ["/bin/true"], landlock_available=True)
