"""Rootless as podman does it: a plain user runs `tappass-host` with no wrapper.

The users come from rootless_fixture (one with a subordinate id range, one
without); unlike tests/test_rootless.py, nothing wraps their commands: each
is a fresh `runuser` (a new shell of the user) running the staged
tappass-host, which enters the user's namespace itself (tappass_host.userns)
and, on this host's hybrid cgroups (DESIGN §12), covers the cgroup2 mount in
that namespace's mount namespace. What is checked, on the host's side (as
root, from /proc): the pause process holding the namespace, its id maps,
that conmon and the agent live inside it, the agent's own subordinate id.
"""

import json
import os
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

import patience
from daemon_fixture import POLICY
from devplane_fixture import devplane, make_devplane  # noqa: F401  (fixtures)
from rootless_fixture import rootless_users, staged  # noqa: F401  (fixtures)
from sandbox_fixture import runtime, unique_name, wait_for, write_agent  # noqa: F401
from tappass_host import ids, userns

PAUSE_CMDLINE = f"{userns.PAUSE_NAME}\0infinity\0".encode()


class Shell:
    """tappass-host as `user`, each call a new `runuser` (no wrapper), on a state dir
    of its own."""

    def __init__(self, user, label: str):
        self.user = user
        self.state = user.home / unique_name(label)

    @property
    def pause_file(self) -> Path:
        return self.state / "run" / "pause.pid"

    def run(self, *args: str, env: dict | None = None, timeout: float = 120):
        argv = [self.user.python, "-m", "tappass_host", "--state-dir", str(self.state),
                "--config", str(self.user.config_file), *args]
        if env:
            argv = ["env", *(f"{k}={v}" for k, v in env.items()), *argv]
        return self.user.run(*argv, timeout=timeout, namespace=False)

    def ok(self, *args: str, **kwargs) -> str:
        result = self.run(*args, **kwargs)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def pause(self) -> tuple[int, str, int, int]:
        """(pid, start time, user ns inode, mount ns inode) from the pid file."""
        pid, start, _, user_ino, mnt_ino = self.pause_file.read_text().split()
        return int(pid), start, int(user_ino), int(mnt_ino)

    def wait_log(self, name: str, text: str) -> str:
        """The sandbox's log once it holds `text`; fails if the sandbox stops first."""
        while True:
            logs = self.ok("logs", name)
            if text in logs:
                return logs
            state = json.loads(self.ok("--json", "status", name))["state"]
            assert state == "running", f"{name} is {state} and never logged {text!r}: {logs}"
            time.sleep(0.1)


def ns_inode(pid: int, kind: str) -> int:
    return os.stat(f"/proc/{pid}/ns/{kind}").st_ino


def id_map(pid: int, kind: str = "uid") -> list[tuple[int, int, int]]:
    text = Path(f"/proc/{pid}/{kind}_map").read_text()
    return [tuple(int(x) for x in line.split()) for line in text.splitlines()]


def host_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[2])  # effective
    raise AssertionError(f"no Uid line for {pid}")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def kill_and_wait(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    while alive(pid):
        time.sleep(0.02)


def enroll(shell: Shell, devplane, name: str) -> None:
    """`init` as the user, from a bootstrap URL in a file (a credential: not in argv)."""
    url_file = shell.user.home / f"{name}.url"
    url_file.write_text(devplane.bootstrap(name))
    os.chown(url_file, shell.user.uid, shell.user.gid)
    url_file.chmod(0o600)
    shell.ok("init", name, "--enroll-url", f"@{url_file}", "--trust-key", devplane.trust_key)
    devplane.publish(name, POLICY)


# --- the lifecycle, from shell to shell ------------------------------------------------


def test_init_start_status_logs_stop_from_separate_shells_without_a_wrapper(
        runtime, rootless_users, devplane):
    user = rootless_users["subids"]
    shell = Shell(user, f"life-{runtime}")
    name = unique_name("ns", runtime)
    enroll(shell, devplane, name)
    pause = shell.pause()
    assert alive(pause[0])

    shell.ok("start", name, "--agent", str(shell.user.hello_agent()), "--runtime", runtime)
    running = json.loads(shell.ok("--json", "status", name))
    assert running["state"] == "running", running
    logs = shell.wait_log(name, "hello from hello-agent: policy_version=1")
    assert "hello from hello-agent" in logs

    # one pause process all along, holding the namespace: uid 0 -> the user, 1.. -> the range
    assert shell.pause() == pause and alive(pause[0])
    pid = pause[0]
    start, count = user.subuid
    assert id_map(pid) == [(0, user.uid, 1), (1, start, count)]
    assert id_map(pid, "gid") == [(0, user.gid, 1), (1, start, count)]
    assert Path(f"/proc/{pid}/cmdline").read_bytes() == PAUSE_CMDLINE
    assert Path(f"/proc/{pid}/environ").read_bytes() == b""
    # conmon and the agent's sandbox hang off that namespace
    state = json.loads((shell.state / "run" / name / "state.json").read_text())
    assert ns_inode(state["conmon_pid"], "user") == pause[2]
    assert ns_inode(state["conmon_pid"], "mnt") == pause[3]
    agent = running["pid"]
    agent_uid = json.loads((shell.state / "sandboxes" / name / "sandbox.json").read_text())[
        "agent_uid"]
    assert agent_uid >= ids.ROOTLESS_FIRST_AGENT_ID
    # the agent is its own subordinate id on the host: neither root nor the user
    assert host_uid(agent) == start + agent_uid - 1 not in (0, user.uid)
    # in a user namespace of its own, laid out like the user's (as the host numbers it)
    assert ns_inode(agent, "user") != pause[2]
    assert id_map(agent) == [(0, user.uid, 1), (1, start, count)]

    stopped = shell.ok("stop", name, "--timeout", "5")
    assert f"{name}: stopped" in stopped
    assert not alive(agent)
    # conmon ends after its exit hook, which stop does not wait out
    wait_for(lambda: not alive(state["conmon_pid"]), 10, what="conmon's end")
    assert json.loads(shell.ok("--json", "status", name))["state"] == "exited"
    assert shell.pause() == pause and alive(pause[0])


def test_the_hybrid_cgroup2_mount_is_covered_only_in_the_users_mount_namespace(
        rootless_users):
    shell = Shell(rootless_users["subids"], "hybrid")
    shell.ok("status")
    pid = shell.pause()[0]

    def top_mount(mountinfo: str, point: str) -> str | None:
        found = None
        for line in mountinfo.splitlines():
            fields = line.split()
            if fields[4] == point:
                found = fields[fields.index("-") + 1]
        return found

    here = Path("/proc/self/mountinfo").read_text()
    inside = Path(f"/proc/{pid}/mountinfo").read_text()
    if os.path.ismount(userns.HYBRID_CGROUP2) and not Path(
            "/sys/fs/cgroup/cgroup.controllers").exists():
        assert top_mount(here, userns.HYBRID_CGROUP2) == "cgroup2"
        assert top_mount(inside, userns.HYBRID_CGROUP2) == "tmpfs"
    else:  # pure v1 or v2: nothing covered
        assert top_mount(inside, userns.HYBRID_CGROUP2) == top_mount(here, userns.HYBRID_CGROUP2)


# --- the pause process's life ------------------------------------------------------------


def test_a_killed_pause_process_is_replaced_inside_the_namespace_a_running_sandbox_holds(
        rootless_users, devplane):
    user = rootless_users["subids"]
    shell = Shell(user, "killed")
    name = unique_name("nskill")
    enroll(shell, devplane, name)
    shell.ok("start", name, "--agent", str(shell.user.hello_agent()), "--runtime", "crun")
    shell.wait_log(name, "policy_version=1")
    old = shell.pause()
    kill_and_wait(old[0])

    # the next command finds conmon still in the namespace and a new pause process joins it
    assert json.loads(shell.ok("--json", "status", name))["state"] == "running"
    new = shell.pause()
    assert new[0] != old[0] and alive(new[0])
    assert new[2:] == old[2:]
    assert ns_inode(new[0], "user") == old[2]
    agent = json.loads(shell.ok("--json", "status", name))["pid"]
    assert f"{name}: stopped" in shell.ok("stop", name, "--timeout", "5")
    assert not alive(agent)


def test_with_nothing_left_in_it_a_killed_pause_process_is_replaced_by_a_new_namespace(
        rootless_users):
    user = rootless_users["subids"]
    shell = Shell(user, "fresh")
    shell.ok("status")
    old = shell.pause()
    # held open, the old namespace lives on (without a process), so its inode stays its own
    held = os.open(f"/proc/{old[0]}/ns/user", os.O_RDONLY)
    try:
        kill_and_wait(old[0])
        shell.ok("status")
        new = shell.pause()
        assert alive(new[0]) and new[2] != old[2] and ns_inode(new[0], "user") == new[2]
    finally:
        os.close(held)
    start, count = user.subuid
    assert id_map(new[0]) == [(0, user.uid, 1), (1, start, count)]


@pytest.mark.parametrize("content", ["empty", "garbage", "outsider", "other-boot"])
def test_a_stale_or_foreign_pid_file_is_replaced(rootless_users, content):
    """Another boot's record, a record naming a process of the user outside any
    namespace of its own (its init namespaces), or garbage: a new pause process."""
    user = rootless_users["subids"]
    shell = Shell(user, "stale")
    outsider = subprocess.Popen(["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}",
                                 "--clear-groups", "sleep", "600"])
    try:
        pid = outsider.pid
        while Path(f"/proc/{pid}/cmdline").read_bytes() != b"sleep\x00600\x00":  # until exec'd
            time.sleep(0.02)
        start_time = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        records = {
            "empty": "",
            "garbage": "garbage 1 2\n",
            "other-boot": f"{pid} {start_time} {'0' * 8}-0000-0000-0000-{'0' * 12} "
                          f"{ns_inode(pid, 'user')} {ns_inode(pid, 'mnt')}\n",
            "outsider": f"{pid} {start_time} {boot} {ns_inode(pid, 'user')} "
                        f"{ns_inode(pid, 'mnt')}\n",
        }
        (shell.state / "run").mkdir(parents=True)
        shutil.chown(shell.state, user.uid, user.gid)
        shutil.chown(shell.state / "run", user.uid, user.gid)
        shell.pause_file.write_text(records[content])
        shutil.chown(shell.pause_file, user.uid, user.gid)
        shell.ok("status")
        new = shell.pause()
        assert new[0] != pid and alive(new[0])
        assert Path(f"/proc/{new[0]}/cmdline").read_bytes() == PAUSE_CMDLINE
    finally:
        outsider.kill()
        outsider.wait()


def test_concurrent_first_commands_make_one_pause_process(rootless_users):
    user = rootless_users["subids"]
    shell = Shell(user, "race")
    before = pause_processes(user)
    procs = [subprocess.Popen(["runuser", "-u", user.name, "--", user.python, "-m",
                               "tappass_host", "--state-dir", str(shell.state), "status"],
                              env=user.env(), cwd=user.home, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for _ in range(4)]
    for proc in procs:
        _, err = proc.communicate(timeout=patience.seconds(120))
        assert proc.returncode == 0, err
    assert pause_processes(user) - before == {shell.pause()[0]}


def pause_processes(user) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if (os.stat(f"/proc/{entry}").st_uid == user.uid
                        and Path(f"/proc/{entry}/cmdline").read_bytes() == PAUSE_CMDLINE):
                    found.add(int(entry))
            except OSError:
                pass
    return found


def test_commands_that_need_no_state_make_no_namespace(rootless_users):
    user = rootless_users["subids"]
    shell = Shell(user, "nohelp")
    before = pause_processes(user)
    for args in (["--help"], ["start", "--help"], ["status", "--help"], ["systemd", "--help"]):
        result = shell.run(*args)
        assert result.returncode == 0, result.stderr
    assert not shell.state.exists()
    assert pause_processes(user) == before


# --- the single-id fallback and what an administrator must do ------------------------------


def test_a_user_without_subordinate_ids_gets_a_namespace_of_its_own_id(rootless_users):
    user = rootless_users["single"]
    name = user.enroll(unique_name("nsone"))
    agent = write_agent(user.agent_dir("id"), ["/bin/sh", "-c", "id -u"])
    # user.enroll used the user's own state dir: start there
    result = user.tappass("start", name, "--agent", str(agent), "--runtime", "crun",
                          "--foreground", "--rm", namespace=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(ids.FALLBACK_AGENT_ID)
    assert "without a subordinate id range" in result.stderr  # the identity layer's warning
    pid = int((user.state / "run" / "pause.pid").read_text().split()[0])
    assert id_map(pid) == [(0, user.uid, 1)] and id_map(pid, "gid") == [(0, user.gid, 1)]
    assert Path(f"/proc/{pid}/setgroups").read_text().strip() == "deny"


def test_a_failing_newuidmap_is_one_line_saying_what_the_administrator_must_do(
        rootless_users):
    """A newuidmap that lacks its privilege (a copy of the real one: no setuid bit)."""
    user = rootless_users["subids"]
    shell = Shell(user, "nomap")
    tools = user.home / unique_name("tools")
    tools.mkdir(mode=0o755)
    for tool in ("newuidmap", "newgidmap"):
        shutil.copyfile(shutil.which(tool), tools / tool)
        (tools / tool).chmod(0o755)
        assert not (tools / tool).stat().st_mode & stat.S_ISUID
    before = pause_processes(user)
    result = shell.run("status", env={"PATH": f"{tools}:/usr/sbin:/usr/bin:/sbin:/bin"})
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tappass-host: error: newuidmap failed (")
    assert "an administrator must make newuidmap setuid root" in lines[0]
    assert pause_processes(user) == before and not shell.pause_file.exists()


def test_the_apparmor_restriction_is_named_with_what_to_do(monkeypatch, tmp_path):
    sysctl = tmp_path / "apparmor_restrict_unprivileged_userns"
    sysctl.write_text("1\n")
    monkeypatch.setitem(userns.SYSCTLS, "apparmor", str(sysctl))
    advice = userns._advice("newuidmap")
    assert "kernel.apparmor_restrict_unprivileged_userns=1" in advice
    assert "AppArmor profile that allows `userns,`" in advice and "\n" not in advice
    sysctl.write_text("0\n")
    assert "AppArmor" not in userns._advice("newuidmap")
