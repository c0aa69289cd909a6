"""A third-party layer's file flips with the keyring on a hot flip by the
daemon (issue 10, item 5): the real devplane publishes v2, the real daemon
verifies it, renders every applier's files with the inputs of the sandbox's
start and flips; the running agent reads the new file."""

import json
import subprocess

import patience
from applier_fixture import NOTE, NOTES_APPLIER, install_applier
from daemon_fixture import *  # noqa: F403  (fixtures: devplane, host, daemons, name, runtime)
from daemon_fixture import ENV, POLICY, PYTHON, SYNC_CONFIG, agent_log, enroll, publish, run_host
from sandbox_fixture import runtime, wait_for, write_agent  # noqa: F401  (fixture: runtime)
from tappass_host.config import DEFAULTS


def test_the_daemon_flips_a_third_party_layers_file_to_the_running_agent(
        devplane, host, tmp_path, daemons, name, runtime):
    install_applier(tmp_path / "site", "notes", NOTES_APPLIER)
    site = {"PYTHONPATH": str(tmp_path / "site")}
    host.config.write_text(f"appliers = {json.dumps([*DEFAULTS['appliers'], 'notes'])}\n"
                           + SYNC_CONFIG)
    enroll(devplane, host, name)
    assert publish(devplane, tmp_path, POLICY, name) == 1
    agent = write_agent(tmp_path / "agent", [
        "/bin/sh", "-c", f"while :; do cat {NOTE} || echo unreadable; sleep 0.1; done"])
    try:
        started = subprocess.run(
            [PYTHON, "-m", "tappass_host", "--state-dir", str(host.root), "--config",
             str(host.config), "start", name, "--agent", str(agent), "--runtime", runtime],
            capture_output=True, text=True, timeout=patience.seconds(60), env={**ENV, **site})
        assert started.returncode == 0, started.stderr
        wait_for(lambda: "note v1" in agent_log(host, name), 15)
        daemon = daemons(host, env=site)
        daemon.wait_line(f"{name}: stream open (policy_version 1)")

        assert publish(devplane, tmp_path, POLICY, name) == 2
        daemon.wait_line(f"{name}: applied policy_version 2")
        wait_for(lambda: "note v2" in agent_log(host, name), 15)
        assert "unreadable" not in agent_log(host, name)
    finally:
        run_host(host, "stop", name, "--timeout", "2")
        root = host.paths.runtime / "oci" / runtime
        subprocess.run([runtime, "--root", str(root), "delete", "--force", f"tappass-{name}"],
                       capture_output=True)
