"""A reboot empties the runtime directory (/run): the daemon brings sandboxes back per their
restart policy, from the intent `start` kept under the state directory (runtime/runintent.py).

The reboot is simulated on the real parts, abruptly as a power cut: the daemon stopped, the
sandbox's conmon killed (no exit hook runs) and its container deleted by the runtime itself,
the workspace unmounted, the run directory wiped, and the boot id the intent recorded changed.
Then a real daemon starts again, as systemd starts it after a boot.
"""

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import patience
from daemon_fixture import *  # noqa: F403
from daemon_fixture import AGENT, POLICY, SYNC_CONFIG, agent_log, audit_events, enroll
from devplane_fixture import run_host, wait_for
from tappass_host.processes import process_alive

RUNTIMES = ("crun", "runc")


@pytest.fixture
def agent_with():
    """hello-agent with another restart policy, where every agent uid can read it."""
    root = Path(tempfile.mkdtemp(prefix="tp-reboot-", dir="/tmp"))
    root.chmod(0o755)

    def make(restart: str) -> Path:
        directory = root / restart
        shutil.copytree(AGENT, directory)
        for path in (directory, *directory.iterdir()):
            path.chmod(0o755 if path.is_dir() else 0o644)
        manifest = directory / "tappass-agent.toml"
        manifest.write_text(manifest.read_text().replace('restart = "on-failure"',
                                                         f'restart = "{restart}"'))
        assert f'restart = "{restart}"' in manifest.read_text()
        return directory

    yield make
    shutil.rmtree(root, ignore_errors=True)


def events_of(host, name: str, kind: str) -> list[dict]:
    return [e for e in audit_events(host) if e["event"] == kind and e["sandbox"] == name]


def status(host, name: str) -> dict:
    result = run_host(host, "--json", "status", name)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def started(devplane, host, name: str, runtime: str, agent: Path, sandboxes, daemons):
    """Enrolled, v1 published, started detached, the agent up, a daemon watching."""
    host.config.write_text(SYNC_CONFIG)
    enroll(devplane, host, name)
    devplane.publish(name, POLICY)
    pid = sandboxes(name, runtime, agent)
    wait_for(lambda: "policy_version=1" in agent_log(host, name))
    daemon = daemons(host)
    daemon.wait_line(f"{name}: stream open")
    return pid, daemon


def reboot(host, name: str, runtime: str, daemon) -> None:
    sandbox = host.paths.sandbox(name)
    assert daemon.terminate() == 0
    state = json.loads(sandbox.run_state.read_text())
    os.kill(state["conmon_pid"], signal.SIGKILL)  # the exit hook never runs
    wait_for(lambda: not process_alive(state["conmon_pid"]))
    subprocess.run([runtime, "--root", str(host.paths.runtime / "oci" / runtime), "delete",
                    "--force", f"tappass-{name}"], check=True, capture_output=True,
                   timeout=patience.seconds(30))
    wait_for(lambda: not process_alive(state["pid"]))
    if os.path.ismount(sandbox.workspace):
        subprocess.run(["umount", str(sandbox.workspace)], check=True,
                       timeout=patience.seconds(30))
    shutil.rmtree(host.paths.runtime)
    intent = json.loads(sandbox.run_intent.read_text())
    assert intent["boot_id"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    sandbox.run_intent.write_text(json.dumps({**intent, "boot_id": "0" * 8 + "-an-earlier-boot"}))


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("restart", ["always", "on-failure"])
def test_a_reboot_brings_the_sandbox_back_per_its_restart_policy(devplane, host, sandboxes,
                                                                 daemons, agent_with, name,
                                                                 runtime, restart):
    pid, daemon = started(devplane, host, name, runtime, agent_with(restart), sandboxes, daemons)
    reboot(host, name, runtime, daemon)
    assert status(host, name)["state"] != "running"

    again = daemons(host)
    again.wait_line(f"{name}: restarted (reboot")
    now = wait_for(lambda: (s := status(host, name))["state"] == "running" and s)
    assert now["pid"] != pid and now["runtime"] == runtime
    # the new run answers: its agent read the keyring and said so, and a command runs in it
    wait_for(lambda: agent_log(host, name).count("policy_version=1") == 2)
    answer = run_host(host, "shell", name, "--", "/bin/sh", "-c", "echo answering")
    assert answer.returncode == 0 and answer.stdout.strip() == "answering", answer.stderr
    restarted = events_of(host, name, "sandbox.restarted")
    assert [e["details"]["reason"] for e in restarted] == ["reboot"]
    assert len(events_of(host, name, "sandbox.started")) == 2
    # the intent is of this boot again: a daemon restart leaves the run alone
    assert again.terminate() == 0
    third = daemons(host)
    third.wait_line("daemon: ready")
    time.sleep(patience.seconds(1))  # its supervision's first ticks
    assert status(host, name)["pid"] == now["pid"]
    assert len(events_of(host, name, "sandbox.restarted")) == 1


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_after_a_reboot_restart_no_stays_down_and_is_reported(devplane, host, sandboxes, daemons,
                                                              agent_with, name, runtime):
    _, daemon = started(devplane, host, name, runtime, agent_with("no"), sandboxes, daemons)
    reboot(host, name, runtime, daemon)

    again = daemons(host)
    again.wait_line(f"{name}: its run of ")
    assert "(reboot); restart policy 'no': left stopped" in again.text()
    [left] = events_of(host, name, "sandbox.left_stopped")
    assert left["details"]["reason"] == "reboot" and left["details"]["restart_policy"] == "no"
    assert not host.paths.sandbox(name).run_intent.exists()
    time.sleep(patience.seconds(2))  # more ticks: it stays down
    assert status(host, name)["state"] != "running"
    assert not events_of(host, name, "sandbox.restarted")
    assert len(events_of(host, name, "sandbox.started")) == 1
    # reported once, not again by the next daemon
    assert again.terminate() == 0
    third = daemons(host)
    third.wait_line("daemon: ready")
    time.sleep(patience.seconds(1))  # its supervision's first ticks
    assert len(events_of(host, name, "sandbox.left_stopped")) == 1


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_an_operator_stop_before_the_reboot_keeps_it_down_after(devplane, host, sandboxes,
                                                                 daemons, agent_with, name,
                                                                 runtime):
    _, daemon = started(devplane, host, name, runtime, agent_with("always"), sandboxes, daemons)
    stopped = run_host(host, "stop", name, "--timeout", "2")
    assert stopped.returncode == 0, stopped.stderr
    assert not host.paths.sandbox(name).run_intent.exists()
    assert daemon.terminate() == 0
    shutil.rmtree(host.paths.runtime)

    again = daemons(host)
    again.wait_line("daemon: ready")
    time.sleep(patience.seconds(1))  # its supervision's first ticks
    assert again.terminate() == 0
    assert "restarted" not in again.text() and "was lost" not in again.text()
    assert status(host, name)["state"] != "running"
    assert not events_of(host, name, "sandbox.restarted")
