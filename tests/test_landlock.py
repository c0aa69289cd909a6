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

import patience
from audit_records import read_audit
from sandbox_fixture import (  # noqa: F401  (fixtures: runtime, host)
    HELLO_AGENT,
    PROBES,
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
    assert args[:len(landlock.LAUNCH)] == landlock.LAUNCH and args[args.index("--") + 1:] == [
        "python3", "/opt/agent/agent.py"]
    layers = json.loads((host.paths.sandbox(name).bundle / "layers.json").read_text())
    assert layers["provenance"]["process.args"] == "kernel"
    # The launcher starts with a fixed environment; the agent (and a shell) get theirs.
    assert config["process"]["env"] == list(landlock.LAUNCHER_ENV)
    assert f"TAPPASS_SANDBOX={name}" in layers["agent_env"]
    assert layers["provenance"][f"agent_env[{layers['agent_env'].index('HOME=/workspace')}]"] \
        == "identity"
    shell_env = host.run("shell", name, "--", "/usr/bin/env").stdout.splitlines()
    assert sorted(shell_env) == sorted(layers["agent_env"])
    unreadable = host.run("shell", name, "--", "/bin/cat", landlock.AGENT_ENV)
    assert "Permission denied" in unreadable.stderr, unreadable
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


PAYLOAD_ENV = {
    # The review's attack: glibc in the launcher's python3 loads a gconv module
    # for the locale's charset while decoding argv, before the ruleset exists.
    "gconv": {"GCONV_PATH": "/opt/agent/gconv", "LOCPATH": "/opt/agent/locale",
              "LC_ALL": "payload"},
    "preload": {"LD_PRELOAD": "/opt/agent/payload.so"},
}


def payload_agent(directory: Path, env: dict[str, str]) -> Path:
    """An agent package shipping real agent code that glibc loads on its [env]'s
    say-so (tests/probes/env_payload.c): as a preloaded library, and as the
    gconv module serving the charset of a locale it ships too. Its entrypoint
    runs python3 (which loads the gconv module while decoding its argv)."""
    agent = write_agent(directory, ["/bin/sh", "/opt/agent/run.sh"], env=env, files={
        "run.sh": "python3 -I -S -c pass\necho AGENT-DONE\n"})
    library = directory / "payload.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(library),
                    str(PROBES / "env_payload.c")], check=True, capture_output=True, timeout=patience.seconds(60))
    (directory / "gconv").mkdir()
    shutil.copy(library, directory / "gconv" / "PAYLOAD.so")
    (directory / "gconv" / "gconv-modules").write_text(
        "module PAYLOAD// INTERNAL PAYLOAD 1\nmodule INTERNAL PAYLOAD// PAYLOAD 1\n")
    charmap = directory / "payload.charmap"
    charmap.write_text("<code_set_name> PAYLOAD\n<escape_char> /\n<mb_cur_max> 1\n"
                       "<mb_cur_min> 1\nCHARMAP\n"
                       + "".join(f"<U{c:04X}> /x{c:02x}\n" for c in range(128))
                       + "END CHARMAP\n")
    source = directory / "payload.locale"
    source.write_text("LC_CTYPE\nEND LC_CTYPE\n")
    (directory / "locale").mkdir()
    # -c: the categories left out are only warnings
    subprocess.run(["localedef", "-c", "-f", str(charmap), "-i", str(source),
                    str(directory / "locale" / "payload")], capture_output=True, timeout=patience.seconds(60))
    assert (directory / "locale" / "payload" / "LC_CTYPE").is_file()
    for path in [directory, *directory.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return agent


def payload_reports(log: str) -> list[dict]:
    reports = []
    for line in log.splitlines():
        if line.startswith("PAYLOAD "):
            reach, _, cmdline = line[len("PAYLOAD "):].partition(" cmdline=")
            reports.append({**dict(r.split("=") for r in reach.split()), "cmdline": cmdline})
    return reports


@pytest.mark.parametrize("vector", sorted(PAYLOAD_ENV))
def test_agent_code_loaded_through_its_env_runs_only_under_the_ruleset(runtime, host, vector):
    """The agent's [env] reaches only the agent, after the ruleset: glibc loading
    the package's code on its say-so runs it confined, never in the launcher."""
    name = host.enroll(unique_name(f"llenv{vector[:2]}", runtime))
    agent = payload_agent(host.root / f"agent-{name}", PAYLOAD_ENV[vector])
    started = host.start(name, agent, runtime)
    assert started.returncode == 0, started.stderr
    host.wait_exited(name, timeout=30)
    log = host.logs(name)
    reports = payload_reports(log)
    assert [r for r in reports if "landlock_exec" in r["cmdline"]] == [], reports
    assert reports, f"the payload never ran: the agent did not get its [env]\n{log[-2000:]}"
    assert all(r["sys"] == "denied" and r["root"] == "denied" for r in reports), reports
    assert "AGENT-DONE" in log, log[-2000:]


# --- the launcher and the detection, on their own ---------------------------------


def launcher_env_file(directory: Path, data: bytes) -> Path:
    path = directory / f"agent-{uuid.uuid4().hex[:8]}.env"
    path.write_bytes(data)
    return path


def test_launcher_fails_closed(tmp_path):
    """A rule it cannot apply, no command, an environment it cannot read: the
    command never runs."""
    marker = tmp_path / "ran"
    env = launcher_env_file(tmp_path, b"PATH=/usr/bin:/bin\0")
    for env_file, rules, message in (
            (env, ["bogus=/usr"], "bad rule"), (env, ["rx=relative"], "bad rule"),
            (env, [], "cannot run /bin/touch: Permission denied"),  # nothing allowed
            (tmp_path / "missing", ["rx=/"], "cannot read the agent's environment"),
            (launcher_env_file(tmp_path, b"PATH=/bin\0NOEQUALS\0"), ["rx=/"], "malformed"),
            (launcher_env_file(tmp_path, b"PATH=/bin"), ["rx=/"], "malformed"),  # unended
            (launcher_env_file(tmp_path, b"=x\0"), ["rx=/"], "malformed")):
        argv = [landlock.PYTHON, "-I", "-S", str(LAUNCHER), "--env", str(env_file), *rules, "--",
                "/bin/touch", str(marker)]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=patience.seconds(10))
        assert result.returncode == 126 and message in result.stderr, result
        assert not marker.exists()
    for argv in (["--env", str(env), "rx=/usr", "--"], ["rx=/usr", "--", "/bin/true"],
                 ["--env", str(env)]):
        result = subprocess.run([landlock.PYTHON, "-I", "-S", str(LAUNCHER), *argv],
                                capture_output=True, text=True, timeout=patience.seconds(10))
        assert result.returncode == 126, result
        assert "no command" in result.stderr or "usage" in result.stderr


def test_launcher_runs_the_command_with_only_the_agents_environment(tmp_path):
    """Its own environment (the runtime's process.env) never reaches the command;
    the file's does, PATH search included."""
    env = launcher_env_file(tmp_path, b"PATH=/nowhere:/usr/bin\0AGENT=a=b c\0EMPTY=\0")
    result = subprocess.run(
        [landlock.PYTHON, "-I", "-S", str(LAUNCHER), "--env", str(env), "rx=/usr", "rx=/lib",
         "rx=/lib64", "rx=/bin", "r=/etc", "--", "env"],
        capture_output=True, text=True, timeout=patience.seconds(10),
        env={"PATH": "/usr/bin:/bin", "LAUNCHER_ONLY": "1", "LD_PRELOAD": ""})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["PATH=/nowhere:/usr/bin", "AGENT=a=b c", "EMPTY="]


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
