"""The daemon's supervision end to end (DESIGN §6, §9): a real daemon process,
the real devplane, sandboxes under real crun and runc started by the real CLI.

Restarts per the agent's restart policy with backoff, every exit audited
exactly once, an operator's stop never undone, on_expiry, restarts on a
policy change, acks retried after an outage, oversized events dropped unread.
"""

import json
import os
import re
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest

import patience
from daemon_fixture import *  # noqa: F403
from daemon_fixture import (AGENT, POLICY, SYNC_CONFIG, acks, agent_log, audit_events, enroll,
                            publish, publish_raw, wait_agent_sees)
from devplane_fixture import run_host, wait_for

SUPERVISION = """
[supervision]
backoff_initial_s = 0.2
backoff_max_s = 0.8
stable_after_s = 30
"""


@pytest.fixture
def agents():
    """Agent packages in a directory every agent uid can read."""
    root = Path(tempfile.mkdtemp(prefix="tp-agents-", dir="/tmp"))
    root.chmod(0o755)

    def make(restart: str, script: str) -> Path:
        directory = root / f"agent-{len(list(root.iterdir()))}"
        directory.mkdir(mode=0o755)
        directory.chmod(0o755)
        (directory / "tappass-agent.toml").write_text(
            f'name = "sup-agent"\nversion = "0.1.0"\n'
            f'entrypoint = ["/bin/sh", "-c", {json.dumps(script)}]\nrestart = "{restart}"\n')
        return directory

    yield make
    shutil.rmtree(root, ignore_errors=True)


def configure(host, top_level: str = "", supervision: str = SUPERVISION) -> None:
    host.config.write_text(top_level + SYNC_CONFIG + supervision)


def events_of(host, name: str, kind: str) -> list[dict]:
    return [e for e in audit_events(host) if e["event"] == kind and e["sandbox"] == name]


def status(host, name: str) -> dict:
    return json.loads(run_host(host, "--json", "status", name).stdout)


def enrolled_with_v1(devplane, host, name: str, **publish_args) -> None:
    enroll(devplane, host, name)
    devplane.publish(name, POLICY, **publish_args)


def settle_exits(host, name: str) -> None:
    """Wait until every run that started has its exit audited (the last exit
    hook may still be running after the daemon stopped)."""
    wait_for(lambda: len(events_of(host, name, "sandbox.exited"))
             == len(events_of(host, name, "sandbox.started")), timeout=15)


# --- restart policies ------------------------------------------------------------------


@pytest.mark.parametrize("runtime", ["crun", "runc"])
def test_a_crashing_agent_is_restarted_with_backoff_each_exit_audited_once(
        devplane, host, agents, sandboxes, daemons, name, runtime):
    configure(host)
    enrolled_with_v1(devplane, host, name)
    sandboxes(name, runtime, agents("on-failure", "echo run; exit 3"))
    daemon = daemons(host)

    daemon.wait_line(f"{name}: restarted (on-failure", count=4, timeout=30)
    assert daemon.terminate() == 0
    settle_exits(host, name)

    exits = events_of(host, name, "sandbox.exited")
    starts = events_of(host, name, "sandbox.started")
    restarts = events_of(host, name, "sandbox.restarted")
    assert len(exits) == len(starts) >= 5
    assert len(restarts) == len(starts) - 1
    assert all(e["details"]["code"] == 3 for e in exits)
    # every exit belongs to its own run: none recorded twice
    assert len({e["details"]["started_at"] for e in exits}) == len(exits)
    assert all(r["details"]["reason"] == "on-failure" for r in restarts)
    assert all(s["details"]["runtime"] == runtime for s in starts)
    delays = [float(d) for d in re.findall(rf"{name}: exited \(code 3\); restart policy "
                                           r"'on-failure': restarting in ([\d.]+) s",
                                           daemon.text())]
    # capped exponential: 0.1-0.2, 0.2-0.4, then 0.4-0.8 at the cap
    assert delays[0] <= 0.2 < 0.4 <= delays[2] <= 0.8 and max(delays) <= 0.8
    assert run_host(host, "audit", "verify").returncode == 0


def test_restart_policy_no_is_not_restarted(devplane, host, agents, sandboxes, daemons, name):
    configure(host)
    enrolled_with_v1(devplane, host, name)
    sandboxes(name, "crun", agents("no", "echo run; exit 3"))
    daemon = daemons(host)

    daemon.wait_line(f"{name}: exited (code 3); restart policy 'no': left stopped")
    time.sleep(patience.seconds(2))  # well past the backoff cap and a rescan
    assert "restarted" not in daemon.text()
    assert status(host, name)["state"] == "exited"
    assert len(events_of(host, name, "sandbox.started")) == 1
    assert len(events_of(host, name, "sandbox.exited")) == 1


def test_restart_policy_always_restarts_after_a_clean_exit(devplane, host, agents, sandboxes,
                                                           daemons, name):
    configure(host)
    enrolled_with_v1(devplane, host, name)
    sandboxes(name, "crun", agents("always", "echo run; exit 0"))
    daemon = daemons(host)

    daemon.wait_line(f"{name}: restarted (always", count=2, timeout=20)
    assert daemon.terminate() == 0
    settle_exits(host, name)
    exits = events_of(host, name, "sandbox.exited")
    assert len(exits) >= 3 and all(e["details"]["code"] == 0 for e in exits)


@pytest.mark.parametrize("runtime", ["crun", "runc"])
def test_an_operator_stop_is_not_undone_but_a_crash_is(devplane, host, agents, sandboxes,
                                                       daemons, name, runtime):
    configure(host)
    enrolled_with_v1(devplane, host, name)
    # `always`: even a clean exit is restarted, so only the recorded intent
    # can keep an operator's stop in place
    pid = sandboxes(name, runtime, agents("always", "echo up; exec sleep 1000"))
    daemon = daemons(host)
    daemon.wait_line(f"{name}: stream open")

    os.kill(pid, signal.SIGKILL)  # a crash: restarted
    daemon.wait_line(f"{name}: restarted (always", timeout=20)
    wait_for(lambda: status(host, name)["state"] == "running")
    assert status(host, name)["pid"] != pid

    stopped = run_host(host, "stop", name, "--timeout", "2")
    assert stopped.returncode == 0, stopped.stderr
    time.sleep(patience.seconds(2))  # well past the backoff cap and a rescan
    assert daemon.text().count(f"{name}: restarted") == 1
    assert status(host, name)["state"] == "exited"
    by = [e["details"].get("by") for e in events_of(host, name, "sandbox.stopped")]
    assert by == ["operator"]
    settle_exits(host, name)
    # the crash, then the stop (sleep as pid 1 ignores SIGTERM: stop's SIGKILL ends it)
    assert [e["details"]["code"] for e in events_of(host, name, "sandbox.exited")] == [137, 137]


def test_an_operator_stop_calls_off_a_pending_restart(devplane, host, agents, sandboxes, daemons,
                                                      name):
    configure(host, supervision=SUPERVISION.replace("0.2", "4").replace("0.8", "4"))
    enrolled_with_v1(devplane, host, name)
    sandboxes(name, "crun", agents("on-failure", "echo run; exit 3"))
    daemon = daemons(host)
    daemon.wait_line(f"{name}: exited (code 3); restart policy 'on-failure': restarting in")

    stopped = run_host(host, "stop", name)
    assert stopped.returncode != 0 and stopped.stderr.count("\n") == 1
    assert "it exited; the daemon will not restart it" in stopped.stderr
    daemon.wait_line(f"{name}: stopped by the operator; pending restart called off")
    time.sleep(patience.seconds(5))  # past the 4 s the restart was due in
    assert f"{name}: restarted" not in daemon.text()
    assert len(events_of(host, name, "sandbox.started")) == 1
    again = run_host(host, "stop", name)  # and a second stop is the plain error
    assert again.stderr.strip() == f"tappass-host: error: sandbox {name!r} is not running"


# --- keyring expiry ----------------------------------------------------------------------

# A keyring that expires while its sandbox runs: long enough for the enrollment and
# the start (in the VM lane, emulated, a fixed 8 s ran out before the start).
EXPIRING_TTL = round(patience.seconds(8))


def test_on_expiry_stop_stops_the_sandbox_until_a_fresh_keyring(devplane, host, sandboxes,
                                                                daemons, name):
    configure(host, 'on_expiry = "stop"\n')
    enrolled_with_v1(devplane, host, name, ttl=EXPIRING_TTL)
    sandboxes(name)
    daemon = daemons(host)

    daemon.wait_line(f"{name}: keyring expired; stopping the sandbox", timeout=20)
    wait_for(lambda: status(host, name)["state"] == "exited")
    assert "stale" in status(host, name)["flags"]
    time.sleep(patience.seconds(2))  # supervision must not bring it back on an expired keyring
    assert status(host, name)["state"] == "exited"
    assert "restarted" not in daemon.text()
    expired = events_of(host, name, "keyring.expired")
    assert len(expired) == 1 and expired[0]["details"]["policy_version"] == 1
    assert [e["details"]["by"] for e in events_of(host, name, "sandbox.stopped")] == ["expiry"]

    fresh = devplane.publish(name, POLICY)[0].policy_version
    daemon.wait_line(f"{name}: restarted (keyring_refreshed", timeout=20)
    wait_agent_sees(host, name, fresh)
    now = status(host, name)
    assert now["state"] == "running" and "stale" not in now["flags"]
    assert len(events_of(host, name, "keyring.expired")) == 1


def test_on_expiry_keep_keeps_it_running_stale_audited_once(devplane, host, sandboxes, daemons,
                                                             name):
    configure(host)  # on_expiry defaults to keep
    enrolled_with_v1(devplane, host, name, ttl=EXPIRING_TTL)
    pid = sandboxes(name)
    daemon = daemons(host)

    daemon.wait_line(f"{name}: keyring policy_version 1 expired", timeout=20)
    time.sleep(patience.seconds(2.5))  # more ticks: still audited once
    now = status(host, name)
    assert now["state"] == "running" and now["pid"] == pid and "stale" in now["flags"]
    assert len(events_of(host, name, "keyring.expired")) == 1
    assert daemon.terminate() == 0
    again = daemons(host)  # a restarted daemon does not audit the same expiry again
    again.wait_line(f"{name}: stream open")
    time.sleep(patience.seconds(1))
    assert len(events_of(host, name, "keyring.expired")) == 1


# --- restart on a policy change -------------------------------------------------------


FS_CHANGE = {**POLICY, "filesystem": {"workspace": "/workspace", "read_only": [],
                                      "deny_paths": ["/etc/shadow"]}}


def test_restart_on_policy_change_restarts_for_filesystem_not_secrets(devplane, host, tmp_path,
                                                                      sandboxes, daemons, name):
    configure(host, "restart_on_policy_change = true\n")
    enrolled_with_v1(devplane, host, name)
    pid = sandboxes(name)
    daemon = daemons(host)
    daemon.wait_line(f"{name}: stream open")

    v2 = publish(devplane, tmp_path, {**POLICY, "secrets": {"DEMO_TOKEN": "rotated"}}, name)
    wait_agent_sees(host, name, v2)
    time.sleep(patience.seconds(1))
    assert status(host, name)["pid"] == pid and "restarting" not in daemon.text()

    v3 = publish(devplane, tmp_path, FS_CHANGE, name)
    daemon.wait_line(f"{name}: restarted (policy_change", timeout=20)
    now = status(host, name)
    assert now["state"] == "running" and now["pid"] != pid
    assert now["started_with_version"] == v3 and "restart-pending" not in now["flags"]
    config = json.loads((host.paths.sandbox(name).bundle / "config.json").read_text())
    assert "/etc/shadow" in config["linux"]["maskedPaths"]
    assert [e["details"]["reason"] for e in events_of(host, name, "sandbox.restarted")] \
        == ["policy_change"]
    assert [e["details"]["by"] for e in events_of(host, name, "sandbox.stopped")] \
        == ["policy_change"]


def test_without_restart_on_policy_change_restart_pending_stays(devplane, host, tmp_path,
                                                                sandboxes, daemons, name):
    configure(host)
    enrolled_with_v1(devplane, host, name)
    pid = sandboxes(name)
    daemon = daemons(host)
    daemon.wait_line(f"{name}: stream open")

    v2 = publish(devplane, tmp_path, FS_CHANGE, name)
    wait_agent_sees(host, name, v2)
    time.sleep(patience.seconds(2))
    now = status(host, name)
    assert now["pid"] == pid and "restart-pending" in now["flags"]
    assert "restarted" not in daemon.text()


# --- acks and oversized events ----------------------------------------------------------


def fail_acks(devplane, sandbox_id: str) -> Path:
    """Make the devplane fail every ack for the sandbox (its ack log becomes a
    directory) until the returned path is removed."""
    ack_log = devplane.root / "acks" / f"{sandbox_id}.jsonl"
    ack_log.unlink(missing_ok=True)
    ack_log.mkdir(parents=True)
    return ack_log


def test_an_ack_lost_to_an_outage_is_sent_later(devplane, host, tmp_path, daemons, name):
    configure(host)
    sandbox_id = enroll(devplane, host, name)
    daemon = daemons(host)
    daemon.wait_line(f"{name}: stream open")
    ack_log = fail_acks(devplane, sandbox_id)

    assert publish(devplane, tmp_path, POLICY, name) == 1
    daemon.wait_line(f"{name}: ack of policy_version 1 failed")
    devplane.stop()  # and then it is down altogether
    ack_log.rmdir()
    time.sleep(patience.seconds(1))
    devplane.restart()

    wait_for(lambda: any(a["policy_version"] == 1 and a["status"] == "applied"
                         for a in acks(devplane, name)), timeout=20)
    daemon.wait_line(f"{name}: ack of policy_version 1 sent on retry")
    assert len(acks(devplane, name)) == 1


def test_an_unsent_ack_survives_a_daemon_restart(devplane, host, tmp_path, daemons, name):
    configure(host)
    sandbox_id = enroll(devplane, host, name)
    daemon = daemons(host)
    daemon.wait_line(f"{name}: stream open")
    ack_log = fail_acks(devplane, sandbox_id)
    assert publish(devplane, tmp_path, POLICY, name) == 1
    daemon.wait_line(f"{name}: ack of policy_version 1 failed")
    kept = host.paths.sandbox(name).root / "unacked.json"
    assert json.loads(kept.read_text())["policy_version"] == 1
    daemon.proc.kill()  # -9: no chance to send it
    daemon.proc.wait()
    ack_log.rmdir()

    again = daemons(host)
    again.wait_line(f"{name}: ack of policy_version 1 sent on retry")
    assert [(a["policy_version"], a["status"]) for a in acks(devplane, name)] == [(1, "applied")]
    assert not kept.exists()


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_an_oversized_event_is_dropped_unread_and_rejected(devplane, host, tmp_path, daemons,
                                                           name):
    configure(host)
    enroll(devplane, host, name)
    daemon = daemons(host)
    daemon.wait_line(f"{name}: stream open")
    before = _peak_rss_kib(daemon.proc.pid)

    # one 48 MiB `data:` line: a reader that buffers lines would hold it all
    huge = b'{"payloadType":"' + b"A" * (48 << 20) + b'"}'
    publish_raw(devplane, tmp_path, huge, 7, name)
    daemon.wait_line(f"{name}: rejected policy_version 7: too_large", timeout=60)

    assert _peak_rss_kib(daemon.proc.pid) - before < 16 << 10
    # On a slow machine the stream can stall on the 48 MiB first, and the pull
    # after it meets the same keyring: rejected too, by its digest (a body
    # too large to read has no version to name).
    rejected = [(e["details"]["reason"], e["details"].get("policy_version"))
                for e in events_of(host, name, "keyring.rejected")]
    assert ("too_large", 7) in rejected and set(rejected) <= {("too_large", 7),
                                                              ("too_large", None)}, rejected
    wait_for(lambda: any(a["policy_version"] == 7 and a["reason"] == "too_large"
                         for a in acks(devplane, name)))
    assert not (host.paths.sandbox(name).keyring / "keyring.json").exists()
    # the stream survives it: the next valid keyring applies
    following = publish(devplane, tmp_path, POLICY, name)
    daemon.wait_line(f"{name}: applied policy_version {following}")
    assert run_host(host, "audit", "verify").returncode == 0
