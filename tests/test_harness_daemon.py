"""A Claude Code rule the harness grammar refuses, pushed over the real devplane's stream
to a real daemon with a running sandbox (crun and runc): rejected as `invalid`, audited,
acked, and the next good keyring applies (sync apply's side: tests/test_harness.py)."""

import json
import os

import pytest

from daemon_fixture import *  # noqa: F403
from daemon_fixture import (POLICY, acks, audit_events, keyring_version, publish,
                            running_with_v1, wait_agent_sees)
from devplane_fixture import wait_for

SETTINGS = "harness/claude-code/settings.json"


@pytest.mark.parametrize("runtime", ["crun", "runc"])
def test_the_daemon_rejects_a_rule_claude_code_does_not_understand(devplane, host, tmp_path,
                                                                   sandboxes, daemons, name,
                                                                   runtime):
    _, daemon = running_with_v1(devplane, host, tmp_path, sandboxes, daemons, name, runtime)
    keyring_dir = host.paths.sandbox(name).keyring
    before = os.readlink(keyring_dir / "..data")

    bad = {"runtime": "claude-code",
           "permissions": {"deny": ["Bash(rm:*)", "bash(curl:*)"], "allow": []}}
    claimed = publish(devplane, tmp_path, {**POLICY, "harness": bad}, name)
    daemon.wait_line(f"{name}: rejected policy_version {claimed}: invalid")

    assert "bash(curl" not in daemon.text()
    assert os.readlink(keyring_dir / "..data") == before and keyring_version(host, name) == 1
    rejected = [e for e in audit_events(host) if e["event"] == "keyring.rejected"]
    assert [e["details"]["reason"] for e in rejected] == ["invalid"]
    wait_for(lambda: any(a["status"] == "rejected" and a["reason"] == "invalid"
                         for a in acks(devplane, name)))

    good = {"runtime": "claude-code",
            "permissions": {"deny": ["Bash(rm:*)", "Bash(curl:*)"], "allow": [],
                            "ask": ["Bash(git push:*)"], "defaultMode": "dontAsk"}}
    following = publish(devplane, tmp_path, {**POLICY, "harness": good}, name)
    wait_agent_sees(host, name, following)
    settings = json.loads((keyring_dir / SETTINGS).read_text())
    assert settings["permissions"]["deny"] == ["Bash(rm:*)", "Bash(curl:*)"]
    assert settings["permissions"]["defaultMode"] == "dontAsk"
