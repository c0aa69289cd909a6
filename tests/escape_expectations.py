"""What every escape probe report must say, root or rootless.

`probed` is the dict the probe fixtures of test_escape and test_rootless
build: the probe's JSON `report`, the sandbox's `mounts` (mount point ->
options) and where its host `state` lives.
"""

import json
import os
import shutil

ESCAPES = ("mount_ok", "unshare_user_ok", "unshare_mount_ok", "setns_ok", "ptrace_ok",
           "setuid_ok")


def details(probed) -> str:
    return json.dumps(probed["report"]["details"], indent=1, sort_keys=True)[:6000]


def copy_setuid_python(directory) -> None:
    """A setuid-root python in the agent package: it must give the agent nothing."""
    target = directory / "suid-python"
    shutil.copy2(os.path.realpath("/usr/bin/python3"), target)
    os.chown(target, 0, 0)
    target.chmod(0o4755)


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
