"""Rootless limits enforced through the user's own systemd manager, as rootless
podman gets them (tappass_host.systemd.user_bus).

On a host with systemd as PID 1 and cgroup v2 (the VM lane, scripts/test-vm),
a plain user whose manager runs (`loginctl enable-linger`) and is delegated
the cpu, memory and pids controllers gets each sandbox in a scope of its own,
`tappass-<name>.scope` in the manager's tappass.slice, holding the keyring's
limits: nothing about them is degraded, a fork bomb stops at pids_max, a
memory hog is OOM-killed and reported. A user without a running manager is
told, in the start's warning, the one command that gives it one. Each
command is a fresh `runuser` with no wrapper, from outside any delegated
cgroup, as from an ssh login.

This host of CI (no systemd as PID 1, cgroup v1) has no user managers: the
tests say so and skip there; the lane runs them.
"""

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

import patience
from audit_records import read_audit
from daemon_fixture import POLICY
from devplane_fixture import devplane, make_devplane  # noqa: F401  (fixtures)
from rootless_fixture import rootless_users, staged  # noqa: F401  (fixtures)
from cgroup_limits import UNIFIED, nearest_limit, own_cgroup
from escape_expectations import FORK_BOMB, MEMORY_HOG
from sandbox_fixture import python_agent, runtime, unique_name, wait_for  # noqa: F401
from tappass_host import systemd
from test_rootless_userns import Shell

SYSTEMD = Path("/run/systemd/system").is_dir()
pytestmark = pytest.mark.skipif(
    not (UNIFIED and SYSTEMD and shutil.which("loginctl")),
    reason="needs systemd as PID 1 and cgroup v2 (the VM lane runs it: scripts/test-vm)")

LIMITS = {"memory_mb": 64, "pids_max": 32, "cpu_millis": 300}
SLEEPER = """
import time
print("up", flush=True)
time.sleep(3600)
"""


def is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.stat().st_mode)
    except OSError:
        return False


@pytest.fixture(scope="module")
def managed_user(rootless_users):
    """The user with subordinate ids, its systemd manager kept running (linger)."""
    user = rootless_users["subids"]
    runtime_dir = Path(f"/run/user/{user.uid}")
    subprocess.run(["loginctl", "enable-linger", user.name], check=True, capture_output=True,
                   timeout=patience.seconds(60))
    try:
        wait_for(lambda: is_socket(runtime_dir / "bus"), 120, what=f"{user.name}'s manager's bus")
        yield user, runtime_dir
    finally:
        subprocess.run(["loginctl", "disable-linger", user.name], capture_output=True,
                       timeout=patience.seconds(60))
        subprocess.run(["systemctl", "stop", f"user@{user.uid}.service"], capture_output=True,
                       timeout=patience.seconds(120))


class ManagedShell(Shell):
    """A login shell of the user: XDG_RUNTIME_DIR set, as pam_systemd sets it."""

    def __init__(self, user, runtime_dir: Path, label: str):
        super().__init__(user, label)
        self.runtime_dir = runtime_dir

    def run(self, *args: str, env: dict | None = None, timeout: float = 120):
        return super().run(*args, env={"XDG_RUNTIME_DIR": str(self.runtime_dir), **(env or {})},
                           timeout=timeout)


def enroll(shell: Shell, devplane, name: str, process: dict) -> None:
    url_file = shell.user.home / f"{name}.url"
    url_file.write_text(devplane.bootstrap(name))
    os.chown(url_file, shell.user.uid, shell.user.gid)
    url_file.chmod(0o600)
    shell.ok("init", name, "--enroll-url", f"@{url_file}", "--trust-key", devplane.trust_key)
    devplane.publish(name, {**POLICY, "process": process})


def agent(shell: Shell, label: str, source: str) -> Path:
    directory = python_agent(shell.user.agent_dir(label), source)
    for path in (directory, *directory.iterdir()):
        path.chmod(0o755)
    return directory


def start_warnings(shell: Shell, name: str, agent_dir: Path, runtime: str,
                   *extra: str) -> str:
    started = shell.run("start", name, "--agent", str(agent_dir), "--runtime", runtime, *extra)
    assert started.returncode == 0, started.stderr
    return started.stderr


def test_the_users_manager_holds_the_sandbox_and_its_limits(runtime, managed_user, devplane):
    user, runtime_dir = managed_user
    shell = ManagedShell(user, runtime_dir, f"scope-{runtime}")
    name = unique_name("uscope", runtime)
    enroll(shell, devplane, name, LIMITS)
    warned = start_warnings(shell, name, agent(shell, "sleeper", SLEEPER), runtime)
    assert "resources layer degraded" not in warned, warned
    shell.wait_log(name, "up")
    status = json.loads(shell.ok("--json", "status", name))
    pid = status["pid"]

    cgroup = own_cgroup(pid)
    scope = (f"/user.slice/user-{user.uid}.slice/user@{user.uid}.service/tappass.slice/"
             f"{systemd.sandbox_slice(name)}/tappass-{name}.scope")
    assert str(cgroup) == scope or str(cgroup).startswith(scope + "/"), cgroup
    assert nearest_limit(cgroup, "memory") == str(LIMITS["memory_mb"] << 20)
    assert nearest_limit(cgroup, "pids") == str(LIMITS["pids_max"])
    assert nearest_limit(cgroup, "cpu") == "30000 100000"
    # The user's manager shows it where an operator looks.
    shown = user.run("env", f"XDG_RUNTIME_DIR={runtime_dir}", "systemctl", "--user", "show",
                     "--property=ActiveState", f"tappass-{name}.scope", namespace=False)
    assert "ActiveState=active" in shown.stdout, (shown.stdout, shown.stderr)
    unavailable = read_audit(shell.state / "audit" / "audit.jsonl", name, "layer.unavailable")
    assert not [e for e in unavailable if "cgroup" in e["details"]["feature"]], unavailable

    stopped = shell.ok("stop", name, "--timeout", "5")
    assert f"{name}: stopped" in stopped
    wait_for(lambda: not Path("/sys/fs/cgroup", *Path(scope).parts[1:]).exists(), 60,
             what=f"{scope} to go with the sandbox")


def test_a_fork_bomb_stops_at_pids_max_and_a_memory_hog_is_oom_killed(
        runtime, managed_user, devplane):
    user, runtime_dir = managed_user
    shell = ManagedShell(user, runtime_dir, f"limits-{runtime}")
    bomb = unique_name("ubomb", runtime)
    enroll(shell, devplane, bomb, LIMITS)
    start_warnings(shell, bomb, agent(shell, "bomb", FORK_BOMB), runtime)
    assert wait_exited(shell, bomb)["exit"]["code"] == 0
    line = next(line for line in shell.ok("logs", bomb).splitlines() if line.startswith("{"))
    outcome = json.loads(line)
    assert outcome["error"] == "EAGAIN", outcome
    assert 16 <= outcome["forked"] < LIMITS["pids_max"], outcome  # the agent is one of them

    hog = unique_name("uhog", runtime)
    enroll(shell, devplane, hog, LIMITS)
    start_warnings(shell, hog, agent(shell, "hog", MEMORY_HOG), runtime)
    status = wait_exited(shell, hog)
    assert status["exit"]["oom"] is True and status["exit"]["signal"] == "SIGKILL", status
    held = [int(line.split()[1]) for line in shell.ok("logs", hog).splitlines()
            if line.startswith("held ")]
    assert held and max(held) < LIMITS["memory_mb"], held


def wait_exited(shell: Shell, name: str) -> dict:
    return wait_for(lambda: (s := json.loads(shell.ok("--json", "status", name)))["state"]
                    == "exited" and s, 60, what=f"{name} to exit")


def test_without_a_running_manager_the_warning_names_the_command_that_starts_one(
        rootless_users, devplane):
    runtime = "crun"  # runc cannot run a user without subordinate ids (ids.check_runtime)
    user = rootless_users["single"]
    active = subprocess.run(["systemctl", "is-active", f"user@{user.uid}.service"],
                            capture_output=True, text=True, timeout=patience.seconds(60))
    assert active.stdout.strip() != "active", "the user's manager must not be running here"
    shell = Shell(user, f"nomgr-{runtime}")
    name = unique_name("nomgr", runtime)
    enroll(shell, devplane, name, LIMITS)
    warned = start_warnings(shell, name, agent(shell, "sleeper", SLEEPER), runtime)
    lines = [line for line in warned.splitlines() if "resources layer degraded" in line]
    assert len(lines) == 1, warned
    assert f"loginctl enable-linger {user.name}" in lines[0], lines[0]
    assert "degraded" in json.loads(shell.ok("--json", "status", name))["flags"]
    shell.ok("stop", name, "--timeout", "5")
