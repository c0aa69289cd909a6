"""Work not redone at start (tappass_host.oci.bundle_cache): a start of the same
inputs reuses the bundle an earlier start rendered and checked; any changed
input, a changed host path the checks looked at, or a damaged entry is a miss,
and the start is then the full path's. Real sandboxes, crun and runc; whether a
start reused its config is its `sandbox.started` audit record's
`config_reused`.
"""

import hashlib
import json
import os
import stat

import pytest

import escape_expectations as expect
from audit_records import read_audit
from sandbox_fixture import (  # noqa: F401  (host and runtime are fixtures)
    host, one_line_error, runtime, unique_name, write_agent)
from tappass_host.oci import bundle_cache
from tappass_host.layers import BUILTIN


def reused(host, name) -> list[bool]:
    return [e["details"]["config_reused"]
            for e in read_audit(host.paths.audit_log, name, "sandbox.started")]


def start_foreground(host, name, agent, runtime):
    result = host.start(name, agent, runtime, "--foreground", "--rm")
    assert result.returncode == 0, result.stderr
    return result


def start_detached(host, name, agent, runtime) -> bytes:
    """Start, wait for the agent's exit; the config.json the run had."""
    result = host.start(name, agent, runtime)
    assert result.returncode == 0, result.stderr
    host.wait_exited(name)
    return host.paths.sandbox(name).bundle_config.read_bytes()


def entries(host) -> list:
    directory = host.paths.bundle_cache
    return sorted(directory.iterdir()) if directory.is_dir() else []


def test_the_cache_knows_the_builtin_appliers():
    assert bundle_cache.BUILTIN_APPLIERS == frozenset(BUILTIN)


def test_a_second_start_reuses_the_checked_config_kept_root_only(host, runtime):
    name = host.enroll(unique_name("cache", runtime))
    agent = write_agent(host.root / "agent", ["/bin/true"])
    first = start_detached(host, name, agent, runtime)
    assert reused(host, name) == [False]
    (entry,) = entries(host)
    assert stat.S_IMODE(os.lstat(host.paths.bundle_cache).st_mode) == 0o700
    assert stat.S_IMODE(os.lstat(entry).st_mode) == 0o600
    second = start_detached(host, name, agent, runtime)
    assert reused(host, name) == [False, True]
    assert second == first  # the same config, byte for byte
    start_foreground(host, name, agent, runtime)
    assert reused(host, name) == [False, True, True]
    assert entries(host) == [entry]


def change_keyring(host, name, agent):
    host.apply(name, process={"memory_mb": 128, "pids_max": 32, "cpu_millis": 250})


def change_manifest(host, name, agent):
    write_agent(agent, ["/bin/true"], env={"GREETING": "changed"})


def change_config(host, name, agent):
    host.configure("max_sandboxes = 7\n")


@pytest.mark.parametrize("change", [change_keyring, change_manifest, change_config])
def test_a_changed_input_is_a_miss(host, runtime, change):
    name = host.enroll(unique_name("miss", runtime))
    agent = write_agent(host.root / "agent", ["/bin/true"])
    before = start_detached(host, name, agent, runtime)
    start_detached(host, name, agent, runtime)
    change(host, name, agent)
    after = start_detached(host, name, agent, runtime)
    start_detached(host, name, agent, runtime)
    assert reused(host, name) == [False, True, False, True]
    if change is change_keyring:  # rendered for the new keyring
        config = json.loads(after)
        assert config["linux"]["resources"]["pids"]["limit"] == 32 != json.loads(
            before)["linux"]["resources"]["pids"]["limit"]
    if change is change_manifest:
        env = (host.paths.sandbox(name).rootfs / "run/tappass/agent.env").read_bytes()
        assert b"GREETING=changed\0" in env


def test_a_read_only_path_that_appeared_is_a_miss(host, runtime):
    """The filesystem layer skips a `filesystem.read_only` path the host lacks:
    the key is the same, the host is not."""
    ref = host.root / "ref"
    name = host.enroll(unique_name("fact", runtime),
                       filesystem={"workspace": "/workspace", "read_only": [str(ref)],
                                   "deny_paths": []})
    agent = write_agent(host.root / "agent", ["/bin/true"])
    before = json.loads(start_detached(host, name, agent, runtime))
    ref.mkdir()
    after = json.loads(start_detached(host, name, agent, runtime))
    assert reused(host, name) == [False, False]
    assert str(ref) not in [m["destination"] for m in before["mounts"]]
    assert str(ref) in [m["destination"] for m in after["mounts"]]


def test_a_bind_source_swapped_for_the_state_is_refused_not_reused(host, runtime):
    """A read-only path checked as a plain directory, then made a link to the
    state directory: a reused config would bind the state (machine key and all)
    into the sandbox; the full path's invariants refuse it."""
    ref = host.root / "ref"
    ref.mkdir()
    name = host.enroll(unique_name("swap", runtime),
                       filesystem={"workspace": "/workspace", "read_only": [str(ref)],
                                   "deny_paths": []})
    agent = write_agent(host.root / "agent", ["/bin/true"])
    start_detached(host, name, agent, runtime)
    ref.rmdir()
    ref.symlink_to(host.state)
    error = one_line_error(host.start(name, agent, runtime))
    assert "must not mount tappass-host state" in error, error
    assert reused(host, name) == [False]


def flip_a_byte(data: bytes) -> bytes:
    at = data.index(b'"config":') + 40
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


def with_digest(body: bytes) -> bytes:
    return b"sha256:" + hashlib.sha256(body).hexdigest().encode() + b"\n" + body


def other_key(data: bytes) -> bytes:
    """Intact, but kept for other inputs (another entry's content under this name)."""
    body = json.loads(data.partition(b"\n")[2])
    body["key"] = "0" * 64
    return with_digest(json.dumps(body).encode())


TAMPERINGS = {
    "flipped_byte": flip_a_byte,
    "truncated": lambda data: data[:len(data) // 2],
    "empty": lambda data: b"",
    "not_json": lambda data: with_digest(b"{not json"),
    "other_key": other_key,
    "other_format": lambda data: with_digest(json.dumps(
        {**json.loads(data.partition(b"\n")[2]), "format": 0}).encode()),
}


@pytest.mark.parametrize("tampering", sorted(TAMPERINGS))
def test_a_damaged_entry_is_a_miss_and_the_start_is_right(host, runtime, tampering):
    name = host.enroll(unique_name("tamper", runtime))
    agent = write_agent(host.root / "agent", ["/bin/true"])
    first = start_detached(host, name, agent, runtime)
    (entry,) = entries(host)
    entry.write_bytes(TAMPERINGS[tampering](entry.read_bytes()))
    second = start_detached(host, name, agent, runtime)
    assert second == first
    third = start_detached(host, name, agent, runtime)
    assert third == first
    assert reused(host, name) == [False, False, True]  # the full path wrote it anew


@pytest.mark.parametrize("where", ["entry", "directory"])
def test_an_entry_others_could_write_is_not_used(host, runtime, where):
    name = host.enroll(unique_name("mode", runtime))
    agent = write_agent(host.root / "agent", ["/bin/true"])
    start_detached(host, name, agent, runtime)
    (entry,) = entries(host)
    (entry if where == "entry" else host.paths.bundle_cache).chmod(
        0o666 if where == "entry" else 0o777)
    start_detached(host, name, agent, runtime)
    assert reused(host, name) == [False, False]


def test_a_sandbox_from_a_reused_config_passes_the_escape_probes(host, runtime):
    key = host.make_machine_key()
    name = host.enroll(unique_name("probe", runtime))
    agent = expect.write_probe_agent(host.root / "agent", host.state)
    for _ in range(2):
        host.paths.sandbox(name).agent_log.unlink(missing_ok=True)  # this run's report only
        started = host.start(name, agent, runtime)
        assert started.returncode == 0, started.stderr
        status = host.wait_exited(name, timeout=60)
        log = host.logs(name)
        assert status["exit"]["code"] == 0, (status, log[-3000:])
    assert reused(host, name) == [False, True]
    wrapper, report = expect.probe_output(log)
    probed = {"report": report, "mounts": wrapper["mountinfo"], "key": key,
              "record": json.loads(host.paths.sandbox(name).record.read_text()),
              "host": host, "state": host.state, "runtime": runtime}
    assert report["uid"] != 0 and (report["uid"], report["gid"]) == (
        probed["record"]["agent_uid"], probed["record"]["agent_gid"])
    expect.no_privileges(probed)
    expect.keyring_read_only(probed)
    expect.state_invisible(probed)
    expect.escapes_fail(probed)
    expect.only_workspace_and_tmp_writable(probed)
    expect.isolated(probed)
