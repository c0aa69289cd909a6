"""What every escape probe report must say, root or rootless.

`probed` is the dict the probe fixtures of test_escape and test_rootless
build: the probe's JSON `report`, the sandbox's `mounts` (mount point ->
options) and where its host `state` lives.
"""

import json
import os
import shutil
from pathlib import Path

from sandbox_fixture import PROBES, write_agent

# The probe agent's entrypoint: records the sandbox's mount table and id maps,
# then execs the probe as PID 1, which prints one JSON report.
WRAPPER = """
import json, os, sys
with open("/proc/self/mountinfo") as f:
    mounts = {}
    for line in f:
        fields = line.split()
        mounts[fields[4]] = fields[5].split(",")
maps = {kind: [[int(x) for x in line.split()] for line in open(f"/proc/self/{kind}_map")]
        for kind in ("uid", "gid")}
print(json.dumps({"mountinfo": mounts, "maps": maps}), flush=True)
os.execv("/usr/bin/python3", ["python3", "/opt/agent/escape_probe.py", *sys.argv[1:]])
"""

ESCAPES = ("mount_ok", "unshare_user_ok", "unshare_mount_ok", "setns_ok", "ptrace_ok",
           "setuid_ok")


def details(probed) -> str:
    return json.dumps(probed["report"]["details"], indent=1, sort_keys=True)[:6000]


def write_probe_agent(directory: Path, state: Path) -> Path:
    """The probe as an agent package, with a setuid-root python beside it
    (which must give the agent nothing); `state` is the host's, to look for."""
    agent = write_agent(directory, [
        "python3", "/opt/agent/wrapper.py", "--state-dir", str(state),
        "--suid-python", "/opt/agent/suid-python"], files={"wrapper.py": WRAPPER})
    shutil.copy(PROBES / "escape_probe.py", agent / "escape_probe.py")
    setuid_python = agent / "suid-python"
    shutil.copy2(os.path.realpath("/usr/bin/python3"), setuid_python)
    os.chown(setuid_python, 0, 0)
    setuid_python.chmod(0o4755)
    return agent


def probe_output(text: str) -> tuple[dict, dict]:
    """The wrapper's record (mountinfo, maps) and the probe's report."""
    docs = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    return next(d for d in docs if "mountinfo" in d), next(d for d in docs if "uid" in d)


def no_privileges(probed) -> None:
    report = probed["report"]
    for capability_set in ("CapEff", "CapInh", "CapPrm", "CapBnd", "CapAmb"):
        assert int(report[capability_set], 16) == 0, capability_set
    assert report["NoNewPrivs"] == "1"
    assert report["Seccomp"] == "2"
    assert 0 not in report["groups"]


def keyring_read_only(probed) -> None:
    report = probed["report"]
    assert report["can_read_keyring"]
    assert not report["can_write_keyring"], details(probed)
    ring = report["details"]["keyring"]
    assert ring["create"] in ("EROFS", "EACCES") and ring["overwrite"] in ("EROFS", "EACCES")
    options = probed["mounts"]["/run/tappass/keyring"]
    assert {"ro", "nosuid", "nodev", "noexec"} <= set(options), options


def state_invisible(probed) -> None:
    report, state = probed["report"], probed["state"]
    assert (state / "machine" / "key.pem").is_file()  # it is there, on the host
    assert not report["machine_key_visible"], details(probed)
    exists = report["details"]["machine_key"]["exists"]
    assert exists == dict.fromkeys(exists, False)
    assert not any(str(state) in point for point in probed["mounts"])


def escapes_fail(probed) -> None:
    report = probed["report"]
    assert {e: report[e] for e in ESCAPES} == dict.fromkeys(ESCAPES, False), details(probed)
    assert report["setuid_binary_euid"] == str(report["uid"]), details(probed)
    denials = report["seccomp_denials"]
    assert denials == {name: "EPERM" for name in denials} | {"clone3": "ENOSYS"}


def only_workspace_and_tmp_writable(probed) -> None:
    report = probed["report"]
    assert not report["rootfs_writable"]
    writes = report["details"]["writes"]
    for directory in ("/", "/usr", "/etc", "/opt/agent"):
        assert writes[directory] == "EROFS", (directory, writes)
    assert report["writable_dirs"] == ["/tmp", "/workspace"], writes
    assert "ro" in probed["mounts"]["/"]


def isolated(probed) -> None:
    """No host processes, loopback only, nothing reachable."""
    report = probed["report"]
    assert not report["host_pids_visible"], details(probed)
    assert report["details"]["processes"]["my_pid"] == 1
    assert report["interfaces"] == ["EACCES"]  # /sys is outside the Landlock ruleset
    assert report["details"]["network"]["if_nameindex"] == ["lo"]
    assert not report["network_reachable"]


# The limit probes' agents (test_escape, test_rootless_systemd): a fork bomb that reports
# how far it got, and a memory hog that reports what it held.
FORK_BOMB = """
import errno, json, os, signal, time
children, error = [], None
for _ in range(4096):
    try:
        pid = os.fork()
    except OSError as exc:
        error = errno.errorcode[exc.errno]
        break
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    children.append(pid)
print(json.dumps({"forked": len(children), "error": error}), flush=True)
for pid in children:
    os.kill(pid, signal.SIGKILL)
for pid in children:
    os.waitpid(pid, 0)
"""
MEMORY_HOG = """
hoard = []
while True:
    hoard.append(bytearray(1 << 20))
    if len(hoard) % 4 == 0:
        print(f"held {len(hoard)} MiB", flush=True)
"""
