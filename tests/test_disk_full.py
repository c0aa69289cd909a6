"""A full disk (issue 10, item 3): an agent cannot fill the filesystem that
holds the keyrings and the audit log, and nothing that fills it stops good
updates for good. Real sandboxes under crun and runc, a real daemon, the real
devplane over HTTPS.

The host's `sandboxes/` and `audit/` live on one small tmpfs the test mounts,
as /var/lib/tappass-host would on a small disk (the runtime dir stays apart,
as /run does).
"""

import errno
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

import patience
from daemon_fixture import *  # noqa: F403
from daemon_fixture import (AGENT, POLICY, SYNC_CONFIG, acks, agent_log, audit_events, enroll,
                            keyring_version, publish, wait_agent_sees)
from devplane_fixture import ENV, PYTHON, run_host, wait_for
from rootless_fixture import rootless_users, staged  # noqa: F401  (fixtures)
from sandbox_fixture import python_agent, unique_name
from tappass_host import workspace
from tappass_host.paths import HostPaths

DISK_MB = 48
WORKSPACE_MB = 16
MIB = 1024 * 1024

FILLER = """
import errno, json, os, time
written = 0
try:
    fd = os.open("/workspace/fill", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    chunk = b"x" * (1 << 20)
    while True:
        written += os.write(fd, chunk)
except OSError as exc:
    print(json.dumps({"error": errno.errorcode.get(exc.errno), "written": written}), flush=True)
seen = None
while True:
    try:
        with open(os.environ["TAPPASS_KEYRING_PATH"]) as f:
            version = json.load(f)["policy_version"]
    except (OSError, ValueError):
        version = None
    if version != seen:
        print(f"policy_version={version}", flush=True)
        seen = version
    time.sleep(0.05)
"""


@pytest.fixture
def small_disk(host, tmp_path):
    """`sandboxes/` and `audit/` of `host` on one DISK_MB tmpfs; yields its mount point."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = []

    def mount(*argv):
        subprocess.run(["mount", *argv], check=True, capture_output=True)
        mounted.append(Path(argv[-1]))

    try:
        mount("-t", "tmpfs", "-o", f"size={DISK_MB}m,mode=0755", "tappass-test-disk", str(disk))
        for target, mode in ((host.paths.sandboxes, 0o755), (host.paths.audit_log.parent, 0o700)):
            (disk / target.name).mkdir(mode=mode)
            target.mkdir(mode=mode, parents=True, exist_ok=True)
            mount("--bind", str(disk / target.name), str(target))
        host.config.write_text(SYNC_CONFIG + f"[filesystem]\nworkspace_mb = {WORKSPACE_MB}\n")
        yield disk
    finally:
        for target in reversed(mounted):
            subprocess.run(["umount", "-R", "-l", str(target)], capture_output=True)


@pytest.fixture
def filler_agent():
    root = Path(tempfile.mkdtemp(prefix="tp-filler-", dir="/tmp"))
    root.chmod(0o755)
    (root / "tappass-agent.toml").write_text(
        'name = "filler"\nversion = "0.1.0"\nentrypoint = ["python3", "/opt/agent/main.py"]\n')
    (root / "main.py").write_text(FILLER)
    for path in root.iterdir():
        path.chmod(0o644)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def free_bytes(disk: Path) -> int:
    st = os.statvfs(disk)
    return st.f_bavail * st.f_frsize


def fill(disk: Path) -> Path:
    """Fill `disk` to the last byte, as some process on the host might."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (MIB, 4096, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    assert free_bytes(disk) == 0
    return filler


def applied_and_acked(devplane, host, name, version) -> None:
    wait_agent_sees(host, name, version)
    assert keyring_version(host, name) == version
    wait_for(lambda: any(e["event"] == "keyring.applied" and e["sandbox"] == name
                         and e["details"]["policy_version"] == version
                         for e in audit_events(host)))
    wait_for(lambda: any(a["policy_version"] == version and a["status"] == "applied"
                         for a in acks(devplane, name)))


@pytest.mark.parametrize("runtime", ["crun", "runc"])
def test_an_agent_filling_its_workspace_leaves_room_for_policy_updates(
        devplane, host, small_disk, tmp_path, sandboxes, daemons, name, runtime, filler_agent):
    enroll(devplane, host, name)
    assert publish(devplane, tmp_path, POLICY, name) == 1
    sandboxes(name, runtime, filler_agent)

    def filled():
        for line in agent_log(host, name).splitlines():
            if line.startswith("{"):
                return json.loads(line)
        return None
    outcome = wait_for(filled, 30)
    # The agent hit the end of its own filesystem, not of the host's.
    assert outcome["error"] in ("ENOSPC", "EDQUOT"), outcome
    assert WORKSPACE_MB * MIB // 2 < outcome["written"] <= WORKSPACE_MB * MIB, outcome
    assert free_bytes(small_disk) > 8 * MIB, free_bytes(small_disk)
    sandbox = host.paths.sandbox(name)
    assert os.stat(sandbox.workspace).st_dev != os.stat(sandbox.keyring).st_dev

    daemon = daemons(host)
    daemon.wait_line(f"{name}: stream open (policy_version 1)")
    assert publish(devplane, tmp_path, {**POLICY, "secrets": {"DEMO_TOKEN": "two"}}, name) == 2
    applied_and_acked(devplane, host, name, 2)
    assert run_host(host, "audit", "verify").returncode == 0

    # The workspace persists across runs; stopped, it holds only what it uses.
    stopped = run_host(host, "stop", name, "--timeout", "2")
    assert stopped.returncode == 0, stopped.stderr
    assert not os.path.ismount(sandbox.workspace)
    image = workspace.image_of(sandbox)
    assert image.stat().st_blocks * 512 >= outcome["written"]


@pytest.mark.parametrize("runtime", ["crun", "runc"])
def test_the_daemon_survives_a_full_disk_and_applies_what_it_missed(
        devplane, host, small_disk, tmp_path, sandboxes, daemons, name, runtime):
    enroll(devplane, host, name)
    assert publish(devplane, tmp_path, POLICY, name) == 1
    sandboxes(name, runtime, AGENT)
    wait_agent_sees(host, name, 1)
    daemon = daemons(host)
    daemon.wait_line(f"{name}: stream open (policy_version 1)")
    keyring_file = host.paths.sandbox(name).keyring / "keyring.json"
    good = keyring_file.read_bytes()
    # The workspace's size is reserved on the state filesystem while it runs.
    sandbox = host.paths.sandbox(name)
    image = workspace.image_of(sandbox)
    assert image.stat().st_blocks * 512 >= WORKSPACE_MB * MIB
    # A host-wide fstrim (fstrim.timer) gives its free blocks back; the daemon takes them again.
    # (The daemon may take them back before a stat here could see the gap: the trim's
    # own count says they were given.)
    trim = subprocess.run(["fstrim", "-v", str(sandbox.workspace)], check=True,
                          capture_output=True, text=True)
    assert int(re.search(r"\((\d+) bytes\) trimmed", trim.stdout)[1]) > WORKSPACE_MB * MIB // 2, \
        trim.stdout
    wait_for(lambda: image.stat().st_blocks * 512 >= WORKSPACE_MB * MIB)

    filler = fill(small_disk)
    assert publish(devplane, tmp_path, {**POLICY, "secrets": {"DEMO_TOKEN": "two"}}, name) == 2
    log = daemon.wait_line("No space left on device; retrying with backoff, "
                           "keeping policy_version 1")
    assert "Traceback" not in log
    # The last good keyring stays whole; the worker keeps trying (the event is
    # gone: only a retry's pull can still bring v2).
    assert keyring_file.read_bytes() == good
    assert "policy_version=2" not in agent_log(host, name)

    filler.unlink()
    applied_and_acked(devplane, host, name, 2)
    # audited where the full disk let it be (an append within the log's last page)
    failures = [e["details"] for e in audit_events(host)
                if e["event"] == "sync.failed" and e["sandbox"] == name]
    assert failures == [{"error": "OSError", "message": "No space left on device"}] or \
        "(not audited: cannot write the audit log" in daemon.text(), (failures, daemon.text())
    assert publish(devplane, tmp_path, {**POLICY, "secrets": {"DEMO_TOKEN": "three"}}, name) == 3
    applied_and_acked(devplane, host, name, 3)
    assert daemon.proc.poll() is None

    # Full again: `stop` still stops the sandbox, in one line at worst.
    fill(small_disk)
    stopped = run_host(host, "stop", name, "--timeout", "2")
    assert "internal error" not in stopped.stderr and "Traceback" not in stopped.stderr
    if stopped.returncode != 0:
        assert stopped.stderr.count("\n") == 1, stopped.stderr
        assert "No space left on device" in stopped.stderr
    status = json.loads(run_host(host, "--json", "status", name).stdout)
    assert status["state"] == "exited", status
    assert run_host(host, "audit", "verify").returncode == 0
    # stopped, the workspace holds only what it uses
    assert not os.path.ismount(sandbox.workspace)
    assert image.stat().st_blocks * 512 < WORKSPACE_MB * MIB // 2


WRITER = """
import os, time
with open("/workspace/data", "wb") as f:
    f.write(os.urandom(2 << 20))
print("written", flush=True)
while not os.path.exists("/workspace/go"):
    time.sleep(0.02)
os.remove("/workspace/go")  # the workspace persists: the next run waits for its own
"""


@pytest.mark.parametrize("runtime", ["crun", "runc"])
def test_the_end_of_a_run_gives_back_what_its_workspace_does_not_use(
        devplane, host, small_disk, tmp_path, name, runtime):
    """A run reserves its whole workspace; its end gives back all the image
    does not use: trimmed on the workspace's own mount, or, when the daemon
    refilled the image after a host-wide fstrim during the run (ext4 then
    skips the groups it trimmed before on that mount), on a mount of its own."""
    enroll(devplane, host, name)
    assert publish(devplane, tmp_path, POLICY, name) == 1
    agent = python_agent(tmp_path / "writer", WRITER)
    sandbox = host.paths.sandbox(name)
    image = workspace.image_of(sandbox)
    for host_trim in (False, True):
        run = subprocess.Popen(
            [PYTHON, "-m", "tappass_host", "--state-dir", str(host.root), "--config",
             str(host.config), "start", name, "--agent", str(agent), "--runtime", runtime,
             "--foreground", "--rm"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        try:
            assert run.stdout.readline().strip() == "written", run.stderr.read()
            assert image.stat().st_blocks * 512 >= WORKSPACE_MB * MIB  # reserved
            if host_trim:  # fstrim.timer, then the daemon's supervision
                subprocess.run(["fstrim", str(sandbox.workspace)], check=True)
                assert image.stat().st_blocks * 512 < WORKSPACE_MB * MIB // 2
                workspace.keep_reserved(sandbox)
                assert image.stat().st_blocks * 512 >= WORKSPACE_MB * MIB
                assert sandbox.workspace_refilled.exists()
            (sandbox.workspace / "go").touch()
            assert run.wait(timeout=patience.seconds(30)) == 0, run.stderr.read()
        finally:
            run.kill()
            run.wait()
        assert not os.path.ismount(sandbox.workspace)
        assert 2 * MIB <= image.stat().st_blocks * 512 < WORKSPACE_MB * MIB // 2, host_trim
        assert not sandbox.runtime.exists()  # --rm: the note went with the run's state


@pytest.mark.parametrize("runtime", ["crun", "runc"])
def test_stop_on_a_full_disk_stops_and_says_what_was_not_recorded(
        devplane, host, small_disk, tmp_path, sandboxes, name, runtime):
    """Without a workspace of its own (workspace_mb = 0) nothing is given back
    at the end of the run: the exit cannot be recorded, and stop says so in one line."""
    host.config.write_text(SYNC_CONFIG + "[filesystem]\nworkspace_mb = 0\n")
    enroll(devplane, host, name)
    assert publish(devplane, tmp_path, POLICY, name) == 1
    sandboxes(name, runtime, AGENT)
    wait_agent_sees(host, name, 1)

    fill(small_disk)
    stopped = run_host(host, "stop", name, "--timeout", "2")
    assert stopped.returncode == 1
    assert stopped.stderr.count("\n") == 1 and "Traceback" not in stopped.stderr, stopped.stderr
    assert f"sandbox '{name}' stopped (exit code " in stopped.stderr
    assert "could not be recorded: " in stopped.stderr
    assert "No space left on device" in stopped.stderr
    status = json.loads(run_host(host, "--json", "status", name).stdout)
    assert status["state"] != "running", status
    assert run_host(host, "audit", "verify").returncode == 0


@pytest.mark.parametrize("runtime", ["crun", "runc"])
def test_a_rootless_workspace_has_no_limit_and_start_says_so(runtime, rootless_users):
    """A user cannot mount the workspace's own filesystem: a plain directory
    it is, reported (warning, layer.unavailable, degraded), never silently."""
    user = rootless_users["subids"]
    name = user.enroll(unique_name("rlws", runtime))
    agent = python_agent(user.agent_dir("ws"), 'open("/workspace/w", "w").write("x")\n')
    result = user.tappass("start", name, "--agent", str(agent), "--runtime", runtime,
                          "--foreground", "--rm")
    assert result.returncode == 0, result.stderr
    assert "warning: filesystem layer degraded: the workspace has no size limit (rootless" \
        in result.stderr
    unavailable = [e["details"] for e in user.audit_events()
                   if e["sandbox"] == name and e["event"] == "layer.unavailable"]
    assert {"layer": "filesystem", "feature": "workspace size limit"} in unavailable
    assert not HostPaths.resolve(user.state).sandbox(name).workspace_image.exists()
    assert (user.state / "sandboxes" / name / "workspace" / "w").read_text() == "x"


@pytest.mark.parametrize("runtime", ["crun", "runc"])
def test_an_update_flipped_when_its_audit_cannot_be_written_is_acked_applied(
        devplane, host, small_disk, tmp_path, sandboxes, daemons, name, runtime):
    """The flip succeeds and only the `keyring.applied` append fails (here the
    audit directory is read-only; on a full disk, its last page is): the agent
    has the update, so the control plane learns it is applied, and the daemon
    says what was not done."""
    enroll(devplane, host, name)
    assert publish(devplane, tmp_path, POLICY, name) == 1
    sandboxes(name, runtime, AGENT)
    daemon = daemons(host)
    daemon.wait_line(f"{name}: stream open (policy_version 1)")
    audit_dir = host.paths.audit_log.parent
    subprocess.run(["mount", "-o", "remount,bind,ro", str(audit_dir)], check=True)
    try:
        assert publish(devplane, tmp_path, {**POLICY, "secrets": {"DEMO_TOKEN": "two"}},
                       name) == 2
        log = daemon.wait_line(f"{name}: applied policy_version 2; NOT done: after the flip: "
                               "cannot write the audit log")
        assert "Read-only file system" in log and "Traceback" not in log
        wait_agent_sees(host, name, 2)
        wait_for(lambda: any(a["policy_version"] == 2 and a["status"] == "applied"
                             for a in acks(devplane, name)))
    finally:
        subprocess.run(["mount", "-o", "remount,bind,rw", str(audit_dir)], check=True)
    assert publish(devplane, tmp_path, {**POLICY, "secrets": {"DEMO_TOKEN": "three"}}, name) == 3
    applied_and_acked(devplane, host, name, 3)
    assert run_host(host, "audit", "verify").returncode == 0


def test_a_host_without_loop_devices_is_named_in_the_workspace_error(tmp_path, monkeypatch):
    """mount -o loop with no loop module loaded said only "Operation not
    permitted" (seen on a minimal arm64 host): the error names the cause.
    A failed mount leaves no loop device bound to the image."""
    from tappass_host import loopdev

    image, mountpoint = tmp_path / "workspace.img", tmp_path / "mnt"
    image.write_bytes(bytes(4096))  # no filesystem: the mount fails either way
    mountpoint.mkdir()
    with pytest.raises(workspace.WorkspaceError) as present:
        workspace._mount(image, mountpoint)
    assert "modprobe loop" not in str(present.value)
    assert "as ext4 on" in str(present.value) and "\n" not in str(present.value)
    assert loopdev.bound_devices(image.stat()) == []  # autoclear: freed with our close
    monkeypatch.setattr(loopdev, "LOOP_CONTROL", str(tmp_path / "loop-control"))
    with pytest.raises(workspace.WorkspaceError) as missing:
        workspace._mount(image, mountpoint)
    message = str(missing.value)
    assert "\n" not in message and message.startswith("workspace: mount: ")
    assert f"({tmp_path / 'loop-control'} is missing: load the loop module, modprobe loop)" in message
