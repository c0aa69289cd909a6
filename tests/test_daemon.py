"""`tappass-host daemon` end to end: a real devplane, a real daemon process,
real sandboxes started by the real CLI under crun and runc (DESIGN §6, §7, §9).

Needs root and, on hybrid-cgroup hosts, scripts/in-crun-namespace (scripts/test
runs the suite under it). A runtime that cannot start a sandbox fails the
test: nothing here is skipped for it.
"""

import json
import random
import os
import signal
import socket
import time
from datetime import datetime, timedelta, timezone

import pytest

import patience
from cgroup_limits import cgroup_limits
from daemon_fixture import *  # noqa: F403
from daemon_fixture import (POLICY, acks, agent_log, audit_events, enroll, keyring_version,
                            publish, publish_raw, running_with_v1, wait_agent_sees)
from devplane_fixture import run_host, wait_for
from tappass_host import signing, strictjson
from tappass_host.keyring import envelope

# --- the mission's acceptance test ------------------------------------------------


@pytest.mark.parametrize("runtime", ["crun", "runc"])
def test_a_published_policy_reaches_the_running_agent(devplane, host, tmp_path, sandboxes,
                                                      daemons, name, runtime):
    pid, daemon = running_with_v1(devplane, host, tmp_path, sandboxes, daemons, name, runtime)

    assert publish(devplane, tmp_path, {**POLICY, "secrets": {"DEMO_TOKEN": "rotated"}}, name) == 2
    wait_agent_sees(host, name, 2)

    assert keyring_version(host, name) == 2
    assert json.loads(run_host(host, "--json", "status", name).stdout)["pid"] == pid
    log = daemon.wait_line(f"{name}: applied policy_version 2")
    assert "tp-secret" not in log and "rotated" not in log
    wait_for(lambda: any(a["policy_version"] == 2 and a["status"] == "applied"
                         for a in acks(devplane, name)))
    # the pull at start applied v1; the stream brought v2: nothing was applied twice
    applied = [e["details"]["policy_version"] for e in audit_events(host)
               if e["event"] == "keyring.applied"]
    assert applied == [1, 2]
    assert not [e for e in audit_events(host) if e["event"] == "keyring.rejected"]
    assert daemon.terminate() == 0
    assert "daemon: stopped" in daemon.text()
    verify = run_host(host, "audit", "verify")
    assert verify.returncode == 0, verify.stderr


# --- bad updates over the stream ----------------------------------------------------


def _forged(host, name) -> tuple[bytes, int]:
    sandbox_id = json.loads(host.paths.sandbox(name).record.read_text())["sandbox_id"]
    now = datetime.now(timezone.utc)
    payload = {**POLICY, "schema": "tappass.keyring/v1", "sandbox_id": sandbox_id,
               "policy_version": 2, "issued_at": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
               "expires_at": (now + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")}
    return envelope.sign(strictjson.canonical(payload), [signing.generate()]), 2


def _push_bad(kind, devplane, host, tmp_path, name) -> int:
    """Push one bad keyring of `kind`; returns the version it claims."""
    if kind == "bad_signature":
        data, version = _forged(host, name)
        publish_raw(devplane, tmp_path, data, version, name)
        return version
    if kind == "rollback":
        return publish(devplane, tmp_path, {**POLICY, "policy_version": 0}, name)
    past = datetime.now(timezone.utc) - timedelta(hours=2)
    return publish(devplane, tmp_path, {
        **POLICY, "issued_at": past.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "expires_at": (past + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")}, name)


@pytest.mark.parametrize("kind", ["bad_signature", "rollback", "expired"])
def test_a_bad_update_is_dropped_audited_and_the_next_one_applies(devplane, host, tmp_path,
                                                                 sandboxes, daemons, name, kind):
    _, daemon = running_with_v1(devplane, host, tmp_path, sandboxes, daemons, name)
    keyring_dir = host.paths.sandbox(name).keyring
    before = os.readlink(keyring_dir / "..data")

    claimed = _push_bad(kind, devplane, host, tmp_path, name)
    daemon.wait_line(f"{name}: rejected policy_version {claimed}: {kind}")

    assert os.readlink(keyring_dir / "..data") == before
    assert keyring_version(host, name) == 1
    rejected = [e for e in audit_events(host) if e["event"] == "keyring.rejected"]
    assert [e["details"]["reason"] for e in rejected] == [kind]
    assert rejected[0]["sandbox"] == name
    wait_for(lambda: any(a["status"] == "rejected" and a["reason"] == kind
                         for a in acks(devplane, name)))

    following = publish(devplane, tmp_path, POLICY, name)
    wait_agent_sees(host, name, following)
    assert "policy_version=" + str(claimed) not in agent_log(host, name).replace(
        f"policy_version={following}", "")
    assert keyring_version(host, name) == following
    wait_for(lambda: any(a["policy_version"] == following and a["status"] == "applied"
                         for a in acks(devplane, name)))
    assert run_host(host, "audit", "verify").returncode == 0


# --- outages ------------------------------------------------------------------------------


def test_the_daemon_rides_out_a_control_plane_outage(devplane, host, tmp_path, sandboxes,
                                                     daemons, name):
    pid, daemon = running_with_v1(devplane, host, tmp_path, sandboxes, daemons, name)

    devplane.stop()
    daemon.wait_line("retrying with backoff, keeping policy_version 1")
    time.sleep(patience.seconds(1.5))  # a few failed reconnects
    assert keyring_version(host, name) == 1
    status = json.loads(run_host(host, "--json", "status", name).stdout)
    assert status["state"] == "running" and status["pid"] == pid
    assert status["keyring_version"] == 1

    devplane.restart()
    daemon.wait_line(f"{name}: stream open again (policy_version 1)")
    assert publish(devplane, tmp_path, POLICY, name) == 2
    wait_agent_sees(host, name, 2)
    assert keyring_version(host, name) == 2


def test_a_stalled_stream_is_detected_and_reopened(devplane, host, tmp_path, daemons, name):
    enroll(devplane, host, name)
    daemon = daemons(host)
    daemon.wait_line(f"{name}: stream open (policy_version None)")
    devplane.proc.send_signal(signal.SIGSTOP)
    try:
        daemon.wait_line("nothing received for 3 s", timeout=10)
    finally:
        devplane.proc.send_signal(signal.SIGCONT)
    daemon.wait_line(f"{name}: stream open again")
    assert publish(devplane, tmp_path, POLICY, name) == 1
    wait_for(lambda: (host.paths.sandbox(name).keyring / "keyring.json").exists())
    assert keyring_version(host, name) == 1


# --- live limits ------------------------------------------------------------------------------


@pytest.mark.parametrize("runtime", ["crun", "runc"])
def test_lower_pids_max_applies_live(devplane, host, tmp_path, sandboxes, daemons, name, runtime):
    pid, daemon = running_with_v1(devplane, host, tmp_path, sandboxes, daemons, name, runtime)
    assert cgroup_limits(pid)["pids"] == 128

    lower = {**POLICY, "process": {**POLICY["process"], "pids_max": 40}}
    assert publish(devplane, tmp_path, lower, name) == 2
    daemon.wait_line(f"{name}: applied policy_version 2; process limits updated live (pids 40)")

    assert cgroup_limits(pid)["pids"] == 40
    status = json.loads(run_host(host, "--json", "status", name).stdout)
    assert status["pid"] == pid and "restart-pending" not in status["flags"]
    # A change outside `process` updates nothing live.
    assert publish(devplane, tmp_path, {**lower, "secrets": {"X": "y"}}, name) == 3
    log = daemon.wait_line(f"{name}: applied policy_version 3")
    assert "applied policy_version 3;" not in log


# --- enrollment while running, readiness, shutdown -----------------------------------------


def test_sandboxes_enrolled_or_removed_while_running(devplane, host, tmp_path, daemons):
    daemon = daemons(host)
    daemon.wait_line("daemon: ready, 0 sandbox(es)")
    enroll(devplane, host, "late")
    daemon.wait_line("late: stream open (policy_version None)")
    assert publish(devplane, tmp_path, POLICY, name="late") == 1
    daemon.wait_line("late: applied policy_version 1")
    assert keyring_version(host, "late") == 1

    import shutil

    shutil.rmtree(host.paths.sandbox("late").root)
    daemon.wait_line("late: no longer enrolled; stream closed")
    assert daemon.terminate() == 0


def test_ready_is_sent_to_systemd_once_streams_are_open(devplane, host, tmp_path, daemons, name):
    enroll(devplane, host, name)
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(patience.seconds(15))
        daemon = daemons(host, env={"NOTIFY_SOCKET": address})
        assert sock.recv(256) == b"READY=1"
        assert f"{name}: stream open" in daemon.text()
        daemon.proc.send_signal(signal.SIGTERM)
        assert sock.recv(256) == b"STOPPING=1"
    assert daemon.proc.wait(patience.seconds(10)) == 0


# --- crash and resume, renewal --------------------------------------------------------------


def test_a_killed_daemon_resumes_from_the_current_version(devplane, host, tmp_path, daemons,
                                                          name):
    enroll(devplane, host, name)
    daemon = daemons(host)
    daemon.wait_line(f"{name}: stream open")
    for _ in range(5):
        devplane.publish(name, POLICY)
    daemon.proc.kill()  # -9, while updates may still be arriving
    daemon.proc.wait()
    for _ in range(5):
        devplane.publish(name, POLICY)

    again = daemons(host)
    again.wait_line(f"{name}: stream open")
    wait_for(lambda: keyring_version(host, name) == 10)
    applied = [e["details"]["policy_version"] for e in audit_events(host)
               if e["event"] == "keyring.applied"]
    assert applied == sorted(set(applied)) and applied[-1] == 10
    assert not [e for e in audit_events(host) if e["event"] == "keyring.rejected"]
    assert again.terminate() == 0
    verify = run_host(host, "audit", "verify")
    assert verify.returncode == 0, verify.stderr


def test_certificates_are_renewed_on_schedule(make_devplane, host, tmp_path, daemons, name):
    devplane = make_devplane(cert_ttl=patience.seconds(6))  # renewed at about half of it
    enroll(devplane, host, name)
    cert = host.paths.sandbox(name).cert
    first = cert.read_bytes()
    daemon = daemons(host)
    daemon.wait_line(f"{name}: certificate renewed", timeout=15)
    assert cert.read_bytes() != first
    assert any(e["event"] == "cert.renewed" for e in audit_events(host))
    # the renewed certificate carries the next connection
    devplane.restart()
    daemon.wait_line(f"{name}: stream open again")
    assert publish(devplane, tmp_path, POLICY, name) == 1
    wait_for(lambda: (host.paths.sandbox(name).keyring / "keyring.json").exists())


def test_one_daemon_keeps_eight_running_sandboxes_at_their_latest(devplane, host, tmp_path,
                                                                  sandboxes, daemons, name):
    """Waits on progress, not on a sense of the machine's speed: as long as
    streams keep opening and the sandboxes' keyrings and agents keep moving,
    it waits; only a long stall with nothing moving fails it."""
    names = [f"{name}-{i}" for i in range(8)]

    def wait_progressing(done, progress, what: str, stall_s: float = 120.0) -> None:
        stall_s = patience.seconds(stall_s)
        seen, since = progress(), time.monotonic()
        while not done():
            assert daemon.proc.poll() is None, f"the daemon exited:\n{daemon.text()}"
            now = progress()
            if now != seen:
                seen, since = now, time.monotonic()
            assert time.monotonic() - since < stall_s, \
                f"no progress towards {what} in {stall_s:.0f} s:\n{daemon.text()}"
            time.sleep(0.1)

    def versions() -> tuple:
        return tuple(keyring_version(host, each) for each in names)

    def agents_saw_latest() -> bool:
        return all(f"policy_version={latest[each]}" in agent_log(host, each) for each in names)

    for each in names:
        enroll(devplane, host, each)
        devplane.publish(each, POLICY)
        sandboxes(each)
    daemon = daemons(host)
    # Readiness waits for the streams at most READY_WAIT_S (an emulated machine
    # opens eight in more), so the streams are waited for on their own.
    wait_progressing(lambda: "daemon: ready, 8 sandbox(es)" in daemon.text()
                     and daemon.text().count("stream open (policy_version 1)") >= 8,
                     lambda: daemon.text(), "the daemon's readiness and eight streams")
    assert daemon.text().count("stream open (policy_version 1)") == 8

    rng = random.Random(5)
    latest = dict.fromkeys(names, 1)
    for _ in range(50):
        each = rng.choice(names)
        latest[each] = devplane.publish(each, POLICY)[0].policy_version

    wait_progressing(lambda: versions() == tuple(latest[each] for each in names),
                     versions, "every sandbox's latest keyring")
    wait_progressing(agents_saw_latest, lambda: [agent_log(host, each) for each in names],
                     "every agent seeing its latest keyring")
    assert versions() == tuple(latest[each] for each in names)
    assert not [e for e in audit_events(host) if e["event"] == "keyring.rejected"]
