"""The daemon confined as tappass-host.service confines it (systemd_exec:
its capability bounding set, no_new_privs, system call filter) still does
its work with real sandboxes under crun and runc: restarts an agent (a
runtime under conmon, whose exit hook inherits the confinement) and applies
a published keyring's process limits to the running sandbox live
(`<runtime> update`)."""

import json
import subprocess
from pathlib import Path

import pytest

import patience
from daemon_fixture import *  # noqa: F403
from daemon_fixture import POLICY, SYNC_CONFIG, DaemonProcess, audit_events, enroll
from devplane_fixture import ENV, PYTHON, wait_for
from sandbox_fixture import RUNTIMES
from systemd_exec import exec_prefix, is_confined

DAEMON_UNIT = Path(__file__).resolve().parent.parent / "systemd" / "tappass-host.service"

# Crashes on its first run only, then stays up (the workspace keeps the count).
AGENT = ('n=$(cat /workspace/runs 2>/dev/null || echo 0); echo $((n + 1)) > /workspace/runs; '
         'echo "run $n"; [ "$n" = 0 ] && exit 3; exec sleep 3600')


class ConfinedDaemon(DaemonProcess):
    def __init__(self, host, log: Path):
        self.log = log
        with open(log, "ab") as err:
            self.proc = subprocess.Popen(
                [*exec_prefix(DAEMON_UNIT, PYTHON), PYTHON, "-m", "tappass_host",
                 "--state-dir", str(host.root), "--config", str(host.config), "daemon"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=ENV)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_the_confined_daemon_restarts_agents_and_updates_limits_live(devplane, host, sandboxes,
                                                                     name, runtime, tmp_path):
    host.config.write_text(SYNC_CONFIG + "[supervision]\nbackoff_initial_s = 0.1\n"
                           "backoff_max_s = 0.5\n")
    enroll(devplane, host, name)
    devplane.publish(name, POLICY)
    agent = tmp_path / "agent"
    agent.mkdir(mode=0o755)
    agent.chmod(0o755)
    (agent / "tappass-agent.toml").write_text(
        f'name = "confined"\nversion = "0.1.0"\nentrypoint = ["/bin/sh", "-c", '
        f'{json.dumps(AGENT)}]\nrestart = "on-failure"\n')
    tmp_path.chmod(0o755)
    sandboxes(name, runtime, agent)

    daemon = ConfinedDaemon(host, tmp_path / "daemon.log")
    try:
        daemon.wait_line(f"{name}: restarted (on-failure", timeout=30)
        assert is_confined(daemon.proc.pid)
        wait_for(lambda: (host.paths.sandbox(name).workspace / "runs").read_text().strip()
                 == "2", 15)
        limits = {**POLICY["process"], "pids_max": 200}
        devplane.publish(name, {**POLICY, "process": limits})
        daemon.wait_line(f"{name}: applied policy_version 2; process limits updated live "
                         "(pids 200)", timeout=30)
        assert "NOT done" not in daemon.text() and "Traceback" not in daemon.text()
    finally:
        assert daemon.terminate() == 0, daemon.text()
    subprocess.run([PYTHON, "-m", "tappass_host", "--state-dir", str(host.root), "--config",
                    str(host.config), "stop", name, "--timeout", "2"], env=ENV,
                   capture_output=True, timeout=patience.seconds(60))

    def exits_recorded():
        events = audit_events(host)
        starts = [e for e in events if e["event"] == "sandbox.started" and e["sandbox"] == name]
        exits = [e for e in events if e["event"] == "sandbox.exited" and e["sandbox"] == name]
        return len(starts) == len(exits) == 2

    wait_for(exits_recorded, 15)  # the second exit by the hook of a conmon the daemon started
