"""Rootless: `tappass-host start --foreground --rm` as a real non-root user.

The users (one with a subordinate id range, one without) come from
rootless_fixture; every command runs as them, inside their own user namespace
(scripts/in-crun-namespace, as `podman unshare` would). The escape probes are
the ones of test_escape, run inside the rootless sandbox as the agent.

What rootless cannot have on this host, and the tests hold it to: cgroup v1
is never delegated to a user, so no cgroup limit applies; pids_max becomes
RLIMIT_NPROC (a fork bomb still stops), memory_mb a per-process RLIMIT_DATA
(a memory hog gets ENOMEM, not an OOM kill), cpu_millis nothing, and the
start says so (warning, `layer.unavailable`). runc refuses the single-id
fallback (it needs the container's root mapped): a one-line error says so.
"""

import json
import os
import shlex
from pathlib import Path

import pytest

import escape_expectations as expect
from rootless_fixture import SIGN, rootless_users, staged  # noqa: F401  (fixtures)
from sandbox_fixture import (  # noqa: F401  (fixtures: runtime, host)
    RUNTIMES,
    host,
    python_agent,
    require_runtime,
    runtime,
    unique_name,
    write_agent,
)
from tappass_host import ids
from tappass_host.oci import invariants
from escape_expectations import FORK_BOMB

AGENT_ID = ids.ROOTLESS_FIRST_AGENT_ID

WHO = """
import json, os, resource
print(json.dumps({"uid": os.getuid(), "gid": os.getgid(),
                  "uid_map": [[int(x) for x in l.split()] for l in open("/proc/self/uid_map")],
                  "nproc": resource.getrlimit(resource.RLIMIT_NPROC)[0]}), flush=True)
open("/workspace/written", "w").write("by the agent")
raise SystemExit(7)
"""


def host_id(inner: int, mapping: list) -> int | None:
    for start, outside, count in mapping:
        if start <= inner < start + count:
            return outside + inner - start
    return None


def start(user, name, agent, runtime, *extra):
    return user.tappass("start", name, "--agent", str(agent), "--runtime", runtime,
                        "--foreground", "--rm", *extra)


def first_json(text: str) -> dict:
    return json.loads(next(line for line in text.splitlines() if line.startswith("{")))


# --- lifecycle ----------------------------------------------------------------------


def test_foreground_rm_as_a_user_with_subordinate_ids(runtime, rootless_users):
    user = rootless_users["subids"]
    name = user.enroll(unique_name("rl", runtime))
    agent = python_agent(user.agent_dir("who"), WHO)
    result = start(user, name, agent, runtime)
    assert result.returncode == 7, result.stderr  # the agent's exit code
    who = first_json(result.stdout)
    record = user.record(name)
    # a non-zero container uid of its own, recorded like a root-mode id
    assert who["uid"] == who["gid"] == record["agent_uid"] == record["agent_gid"] >= AGENT_ID
    # the sandbox's map: container 0 -> the user, 1..N -> the subordinate ids
    outer = user.namespace_map()
    assert outer[0] == (0, user.uid, 1) and outer[1][1] == user.subuid[0]
    assert who["uid_map"] == [[0, 0, 1], [1, 1, outer[1][2]]]
    on_host = host_id(host_id(who["uid"], who["uid_map"]), outer)
    assert on_host == user.subuid[0] + who["uid"] - 1 and on_host not in (0, user.uid)
    # the workspace is the agent's, and nothing of the run is left behind
    workspace = user.state / "sandboxes" / name / "workspace"
    assert (workspace / "written").read_text() == "by the agent"
    assert (workspace / "written").stat().st_uid == on_host
    assert not (user.state / "run" / name).exists()
    assert not [c for c in os.listdir(user.state / "run" / "oci" / runtime)
                if c.startswith("tappass-")]
    exit_record = json.loads((user.state / "sandboxes" / name / "exit.json").read_text())
    assert (exit_record["code"], exit_record["oom"]) == (7, False)
    assert [e["event"] for e in user.audit_events() if e["sandbox"] == name][-2:] == \
        ["layer.unavailable", "sandbox.exited"]
    status = json.loads(user.tappass("--json", "status", name).stdout)
    assert status["state"] == "exited" and status["exit"]["code"] == 7


def test_each_sandbox_gets_its_own_subordinate_id(rootless_users):
    user = rootless_users["subids"]
    agent = python_agent(user.agent_dir("who2"), WHO)
    seen = set()
    for _ in range(2):
        name = user.enroll(unique_name("rlid"))
        result = start(user, name, agent, "crun")
        assert result.returncode == 7, result.stderr
        seen.add(first_json(result.stdout)["uid"])
        assert user.record(name)["agent_uid"] in seen
    assert len(seen) == 2 and 0 not in seen


def test_the_keyring_files_belong_to_the_agents_mapped_group(rootless_users):
    user = rootless_users["subids"]
    name = user.enroll(unique_name("rlkr"))
    assert start(user, name, write_agent(user.agent_dir("true"), ["/bin/true"]), "crun") \
        .returncode == 0
    keyring = user.state / "sandboxes" / name / "keyring"
    agent_gid = user.subuid[0] + user.record(name)["agent_gid"] - 1  # subgid: the same range
    version = keyring / os.readlink(keyring / "..data")
    for path, mode in ((keyring, 0o750), (version, 0o550), (version / "keyring.json", 0o440)):
        st = path.stat()
        # "root" is the user; the group is the agent's subordinate gid
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (user.uid, agent_gid, mode), path


# --- escape probes, as the agent of a rootless sandbox -------------------------------


@pytest.fixture(scope="module", params=RUNTIMES)
def probed(request, rootless_users):
    runtime = request.param
    require_runtime(runtime)
    user = rootless_users["subids"]
    name = user.enroll(unique_name("rlprobe", runtime))
    agent = expect.write_probe_agent(user.agent_dir("probe"), user.state)
    result = start(user, name, agent, runtime)
    assert result.returncode == 0, (result.stderr[-3000:], result.stdout[-3000:])
    first, report = expect.probe_output(result.stdout)
    return {"report": report, "mounts": first["mountinfo"], "maps": first["maps"], "user": user,
            "state": user.state, "record": user.record(name), "runtime": runtime}


def test_probe_the_agent_is_a_mapped_non_root_uid(probed):
    report, user = probed["report"], probed["user"]
    assert report["uid"] == report["euid"] == probed["record"]["agent_uid"] != 0
    assert report["gid"] == probed["record"]["agent_gid"] != 0
    assert 0 not in report["groups"]
    outer = user.namespace_map()
    for kind in ("uid", "gid"):
        assert probed["maps"][kind] == [[0, 0, 1], [1, 1, outer[1][2]]], probed["maps"]
    assert host_id(report["uid"], outer) == user.subuid[0] + report["uid"] - 1


def test_probe_no_capabilities_no_new_privs_and_seccomp(probed):
    expect.no_privileges(probed)


def test_probe_the_keyring_is_readable_but_not_writable(probed):
    expect.keyring_read_only(probed)


def test_probe_the_state_is_not_visible(probed):
    expect.state_invisible(probed)


def test_probe_mount_unshare_setns_ptrace_setuid_and_escalation_syscalls_fail(probed):
    expect.escapes_fail(probed)


def test_probe_read_only_root_and_only_workspace_and_tmp_writable(probed):
    expect.only_workspace_and_tmp_writable(probed)


def test_probe_no_host_pids_and_only_loopback(probed):
    expect.isolated(probed)


# --- limits: what rootless can and cannot enforce here --------------------------------


DEGRADED = "resources layer degraded"


def test_a_fork_bomb_stops_at_pids_max_rootless(runtime, rootless_users):
    user = rootless_users["subids"]
    name = user.enroll(unique_name("rlforks", runtime),
                       process={"memory_mb": 256, "pids_max": 32, "cpu_millis": 1000})
    result = start(user, name, python_agent(user.agent_dir("forks"), FORK_BOMB), runtime)
    assert result.returncode == 0, result.stderr
    outcome = first_json(result.stdout)
    assert outcome["error"] == "EAGAIN", outcome
    assert 16 <= outcome["forked"] < 32, outcome
    assert DEGRADED in result.stderr and "pids_max is applied as RLIMIT_NPROC" in result.stderr


def test_a_memory_hog_is_refused_memory_not_oom_killed_rootless(runtime, rootless_users):
    """No memory cgroup for a user here: under crun, RLIMIT_DATA stops the hog
    (ENOMEM -> MemoryError); under runc nothing does (its Go init cannot run
    in a small data limit). Either way no OOM kill, and the start says so.
    The hog gives up by itself at twice memory_mb."""
    user = rootless_users["subids"]
    name = user.enroll(unique_name("rlhog", runtime),
                       process={"memory_mb": 48, "pids_max": 32, "cpu_millis": 1000})
    agent = python_agent(user.agent_dir("hog"), """
        hoard = []
        while len(hoard) < 96:
            hoard.append(bytearray(1 << 20))
            if len(hoard) % 4 == 0:
                print(f"held {len(hoard)} MiB", flush=True)
    """)
    result = start(user, name, agent, runtime)
    held = [int(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("held ")]
    assert DEGRADED in result.stderr, result.stderr
    if runtime == "crun":
        assert result.returncode == 1 and "MemoryError" in result.stderr, result.stderr
        assert held and 4 <= max(held) < 48, held
        assert "RLIMIT_DATA (an allocation past it fails; no OOM kill)" in result.stderr
    else:
        assert result.returncode == 0 and max(held) == 96, (result.stderr, held)
        assert "memory_mb is not enforced (under runc" in result.stderr
    record = json.loads((user.state / "sandboxes" / name / "exit.json").read_text())
    assert (record["code"], record["oom"]) == (result.returncode, False)
    unavailable = [e["details"]["feature"] for e in user.audit_events()
                   if e["sandbox"] == name and e["event"] == "layer.unavailable"
                   and e["details"]["layer"] == "resources"]
    assert unavailable == ["cgroup memory limit", "cgroup cpu limit"]


# --- the single-id fallback: no subordinate ids ----------------------------------------


def test_single_id_fallback_warns_and_runs_the_agent_as_a_non_zero_uid(rootless_users):
    user = rootless_users["single"]
    assert user.namespace_map() == [(0, user.uid, 1)]
    name = user.enroll(unique_name("rlone"))
    result = start(user, name, python_agent(user.agent_dir("who"), WHO), "crun")
    assert result.returncode == 7, result.stderr
    assert "without a subordinate id range" in result.stderr
    who = first_json(result.stdout)
    assert who["uid"] == ids.FALLBACK_AGENT_ID != 0
    # the one id mapped is the user's own (0 in its namespace)
    assert who["uid_map"] == [[ids.FALLBACK_AGENT_ID, 0, 1]]
    assert (user.state / "sandboxes" / name / "workspace" / "written").stat().st_uid == user.uid
    assert "agent_uid" not in user.record(name)  # nothing allocated: the agent is the user


def test_runc_refuses_the_single_id_fallback_in_one_line(rootless_users):
    user = rootless_users["single"]
    name = user.enroll(unique_name("rlonerunc"))
    result = start(user, name, write_agent(user.agent_dir("true"), ["/bin/true"]), "runc")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tappass-host: "), result.stderr
    assert "runc cannot run a rootless sandbox without a subordinate id range" in lines[0]
    assert not (user.state / "run" / name).exists()


def test_an_agent_package_the_user_cannot_reach_is_refused_in_one_line(rootless_users):
    """A checkout in root's 0700 home, given to a user's start: one line, no traceback."""
    user = rootless_users["subids"]
    name = user.enroll(unique_name("rlunreach"))
    closed = user.home / "closed"  # the user can reach its home, not what root closes in it
    agent = write_agent(closed / "agent", ["/bin/true"])

    def refused() -> str:
        result = start(user, name, agent, "crun")
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1, result.stderr
        assert lines[0].startswith("tappass-host: error: ") and "Permission denied" in lines[0]
        return lines[0]

    closed.chmod(0o700)  # root's, so the user cannot search it
    assert "cannot be reached" in refused()
    closed.chmod(0o711)
    (agent / "tappass-agent.toml").chmod(0o600)
    assert "cannot read" in refused()
    assert not (user.state / "run" / name).exists()


# --- units: the id layout and the rootless invariants -----------------------------------


def test_a_namespace_map_is_the_users_ids_but_its_own():
    space = ids.parse_id_map("         0       1001          1\n         1     100000      65535\n",
                             0)
    assert space == ids.IdSpace(0, ((1, 65535),))
    assert space.mappings() == ({"containerID": 0, "hostID": 0, "size": 1},
                                {"containerID": 1, "hostID": 1, "size": 65535})
    split = ids.parse_id_map("0 5000 100\n", 10)
    assert split == ids.IdSpace(10, ((0, 10), (11, 89)))


def _rootless_config(tmp_path):
    from oci_fixture import invariant_args, locked_down_config

    config = locked_down_config(tmp_path)
    config["linux"]["namespaces"].append({"type": "user"})
    config["process"]["user"] = {"uid": 1000, "gid": 1000}
    config["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 0, "size": 1},
                                      {"containerID": 1, "hostID": 1, "size": 65535}]
    config["linux"]["gidMappings"] = [dict(m) for m in config["linux"]["uidMappings"]]
    return config, invariant_args(tmp_path, rootless=True)


@pytest.mark.parametrize("change, field", [
    (lambda c: c["linux"].pop("uidMappings"), "linux.uidMappings"),
    (lambda c: c["linux"]["gidMappings"].pop(1), "linux.gidMappings"),  # agent gid unmapped
    # the agent mapped onto the user's own id, while container root is the user
    (lambda c: c["linux"]["uidMappings"].__setitem__(
        1, {"containerID": 1000, "hostID": 0, "size": 1}), "linux.uidMappings"),
    (lambda c: c["linux"]["namespaces"].pop(), "linux.namespaces"),
])
def test_rootless_invariants_refuse_a_bad_user_namespace(tmp_path, change, field):
    config, args = _rootless_config(tmp_path)
    invariants.check(config, provenance={}, **args)  # the good one passes
    change(config)
    with pytest.raises(invariants.InvariantViolation) as refused:
        invariants.check(config, provenance={}, **args)
    assert refused.value.field == field


def test_rootless_invariants_accept_the_single_id_fallback(tmp_path):
    from dataclasses import replace

    config, args = _rootless_config(tmp_path)
    fallback = ({"containerID": 1000, "hostID": 0, "size": 1},)
    for key in ("uidMappings", "gidMappings"):
        config["linux"][key] = [dict(m) for m in fallback]
    args["host"] = replace(args["host"], uid_mappings=fallback, gid_mappings=fallback)
    invariants.check(config, provenance={}, **args)


def test_runc_is_refused_for_the_single_id_fallback_before_anything_starts():
    fallback = ids.AgentIds(1000, 1000, 0, 0, ({"containerID": 1000, "hostID": 0, "size": 1},),
                            ({"containerID": 1000, "hostID": 0, "size": 1},))
    ids.check_runtime(fallback, "crun")
    with pytest.raises(ids.RootlessUnsupported):
        ids.check_runtime(fallback, "runc")
    mapped = ids.AgentIds(1000, 1000, 1000, 1000, ids.IdSpace(0, ((1, 65535),)).mappings(),
                          ids.IdSpace(0, ((1, 65535),)).mappings())
    ids.check_runtime(mapped, "runc")


def test_rootless_state_defaults_to_the_users_xdg_dirs(monkeypatch, tmp_path):
    from tappass_host import paths

    monkeypatch.setattr(paths, "is_rootless", lambda: True)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xs"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xc"))
    monkeypatch.delenv("TAPPASS_HOST_STATE_DIR", raising=False)
    assert paths.HostPaths.resolve().state == tmp_path / "xs" / "tappass-host"
    assert paths.default_config_file() == tmp_path / "xc" / "tappass-host" / "config.toml"
    assert Path("/var/lib/tappass-host") != paths.HostPaths.resolve().state


def test_detached_lifecycle_in_one_user_namespace(runtime, rootless_users):
    """start (conmon-monitored) -> status running -> logs -> a keyring flipped by
    `sync apply` is seen live -> stop -> exited, all in one user namespace:
    signals cross no namespace a user cannot reach."""
    user = rootless_users["subids"]
    name = user.enroll(unique_name("rldet", runtime))
    th = f"{user.python} -m tappass_host --state-dir {user.state} --config {user.config_file}"
    envelope = user.home / f"{name}.v2.json"
    start_err = user.home / f"{name}.start.err"
    agent = user.hello_agent()
    script = f"""
        set -ex
        wait_log() {{
            for i in $(seq 100); do {th} logs {name} | grep -q "$1" && return; sleep 0.1; done
            return 1
        }}
        {th} start {name} --agent {agent} --runtime {runtime} 2>{start_err}
        wait_log policy_version=1
        {th} --json status {name} > {user.home}/{name}.running.json
        {user.python} -c {shlex.quote(SIGN)} {user.state} {name} 2 {envelope}
        {th} sync apply {name} {envelope}
        wait_log "policy changed: policy_version=2"
        {th} logs {name}
        {th} stop {name} --timeout 5
        {th} --json status {name} > {user.home}/{name}.exited.json
    """
    result = user.run("sh", "-c", script)
    start_said = start_err.read_text() if start_err.exists() else ""
    assert result.returncode == 0, f"{result.stderr}\nstart said: {start_said}"
    docs = [json.loads((user.home / f"{name}.{state}.json").read_text())
            for state in ("running", "exited")]
    assert docs[0]["state"] == "running" and docs[0]["pid"]
    assert "hello from hello-agent: policy_version=1" in result.stdout
    assert "policy changed: policy_version=2" in result.stdout
    assert f"{name}: stopped (exit code 0)" in result.stdout
    assert docs[1]["state"] == "exited" and docs[1]["exit"]["code"] == 0


def test_a_root_agent_id_among_a_users_subordinate_ids_is_given_up(host, tmp_path, monkeypatch):
    """That user could map the id in a user namespace of its own and be the agent on this
    host. On a stock Debian the second user given subordinate ids gets 165536-231071,
    across the start of the default agent_id_range (200000-299999): a new sandbox passes
    over those ids, and one that has them is given others (its start warns)."""
    name = host.enroll(unique_name("delegated"))
    monkeypatch.setattr(ids, "SUBORDINATE_IDS", str(tmp_path / "sub{kind}id"))
    for kind in "ug":
        (tmp_path / f"sub{kind}id").write_text("alice:100000:65536\n")
    first = ids.agent_ids(host.paths, name, (200000, 299999))
    assert (first.uid, first.gid, first.moved) == (200000, 200000, None)
    (tmp_path / "subgid").write_text("alice:100000:65536\nbob:165536:65536\n")
    moved = ids.agent_ids(host.paths, name, (200000, 299999))
    assert (moved.uid, moved.gid, moved.owner_uid) == (231072, 231072, 231072)
    assert moved.moved == ("agent gid 200000 is one of 'bob''s subordinate ids "
                           "(/etc/subgid: 165536-231071)")
    assert ids.agent_ids(host.paths, name, (200000, 299999)).moved is None  # recorded
    other = host.enroll(unique_name("delegated"))
    assert ids.agent_ids(host.paths, other, (200000, 299999)).uid == 231073
    (tmp_path / "subuid").write_text("carol:200000:100000\n")  # the whole range
    with pytest.raises(ids.NoFreeIds) as refused:
        ids.agent_ids(host.paths, host.enroll(unique_name("delegated")), (200000, 299999))
    assert str(refused.value) == ("no free agent id left in agent_id_range 200000-299999 that "
                                  "is no user's subordinate id (/etc/subuid, /etc/subgid)")


def test_malformed_subordinate_id_lines_are_passed_over_not_trusted(host, tmp_path, monkeypatch):
    """/etc/subuid is the administrator's, but a broken line must neither stop a start nor
    hide the valid lines around it."""
    monkeypatch.setattr(ids, "SUBORDINATE_IDS", str(tmp_path / "sub{kind}id"))
    (tmp_path / "subuid").write_text("bob:abc:10\nbob:200000\n\ncarol:-5:10\nfrank:²:3\n"
                                     "dave:200000:1:extra\nerin:200000:2\n")
    (tmp_path / "subgid").write_bytes(b"\xff\xfe:1:2\n")
    moved = ids.agent_ids(host.paths, host.enroll(unique_name("subid")), (200000, 299999))
    assert (moved.uid, moved.gid) == (200002, 200002)  # erin's 200000-200001 passed over


def test_a_workspace_follows_its_agents_moved_ids_and_nothing_else(tmp_path):
    from tappass_host import workspace

    top, outside = tmp_path / "workspace", tmp_path / "outside"
    (top / "dir").mkdir(parents=True)
    outside.write_text("host file")
    for path in (top / "dir" / "file", top / "kept"):
        path.write_text("x")
    (top / "dir" / "link").symlink_to(outside)
    for path in (top, top / "dir", top / "dir" / "file"):
        os.lchown(path, 200000, 200000)
    os.lchown(top / "dir" / "link", 200000, 200000)
    os.chown(top / "kept", 4242, 200000)      # another owner, the old group
    os.chown(outside, 200000, 200000)         # what the symlink points at: not followed
    workspace._give(top, 231072, 231072)
    owners = {p.name: (os.lstat(p).st_uid, os.lstat(p).st_gid)
              for p in (top, top / "dir", top / "dir" / "file", top / "dir" / "link",
                        top / "kept", outside)}
    assert owners == {"workspace": (231072, 231072), "dir": (231072, 231072),
                      "file": (231072, 231072), "link": (231072, 231072),
                      "kept": (4242, 231072), "outside": (200000, 200000)}
    os.chown(top, 0, 0)  # a workspace new to its agent: nothing else is changed
    os.chown(top / "kept", 4242, 4242)
    workspace._give(top, 300001, 300001)
    assert os.lstat(top / "kept").st_gid == 4242 and os.lstat(top / "dir").st_uid == 231072
