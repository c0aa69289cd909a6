"""Agents from images, rootless (issue 14): a plain user's tappass-host, with
no wrapper, in the user's own namespace (tappass_host.userns), imports the
image into its own store and mounts each run's overlay in that namespace's
mount namespace, as rootless podman does."""

import json
import os
import shutil

import pytest

import escape_expectations as expect
import image_fixture
from rootless_fixture import rootless_users, staged  # noqa: F401  (fixtures)
from sandbox_fixture import (  # noqa: F401  (fixture: runtime)
    RUNTIMES,
    require_runtime,
    runtime,
    unique_name,
    write_agent,
)

SHOW = """\
cat /etc/os-release
echo "uid=$(id -u)"
echo "write=$(touch /etc/x 2>/dev/null && echo done || echo refused)"
echo "hostusr=$(ls /run/tappass/hostusr 2>&1 | head -c 60)"
echo SHOWN
"""


def readable_by(user, path) -> None:
    for p in [path, *path.rglob("*")]:
        os.chown(p, user.uid, user.gid)
        p.chmod(0o755 if p.is_dir() else 0o644)


def test_a_plain_user_runs_an_agent_from_an_image_in_its_own_namespace(runtime, rootless_users):
    user = rootless_users["subids"]
    layout = user.home / unique_name("layout", runtime)
    image = image_fixture.write_layout(layout, [image_fixture.tar_layer([
        *image_fixture.busybox_entries(),
        image_fixture.File("etc/ld.so.preload", b"/etc/os-release\n")])])
    readable_by(user, layout)
    agent = write_agent(user.agent_dir("image"), ["/bin/sh", "/opt/agent/run.sh"],
                        files={"run.sh": SHOW})
    name = user.enroll(unique_name("img-rl", runtime), image={"allowed_digests": [image.digest]})

    started = user.tappass("start", name, "--agent", str(agent), "--runtime", runtime,
                           "--image", f"oci:{layout}", namespace=False, timeout=120)
    assert started.returncode == 0, started.stderr
    try:
        log = ""
        for _ in range(600):
            # the state first: the log of an agent that has exited is whole (conmon writes
            # the exit after the last of its output), a log read before may not be
            status = json.loads(user.tappass("--json", "status", name, namespace=False).stdout)
            log = user.tappass("logs", name, namespace=False).stdout
            if "SHOWN" in log or status["state"] != "running":
                break
        assert "SHOWN" in log, (status, log)
        assert image_fixture.OS_RELEASE.decode().splitlines()[0] in log, log
        assert "uid=0\n" not in log and "write=refused" in log, log
        assert "hostusr=ls: " in log, log  # the launcher's host /usr: not readable after the ruleset
        assert "ld.so.preload" not in log, log  # masked for the host's loader here too
        assert status["image"] == image.digest
        # The user's own store, unpacked as the user: nothing of root's.
        rootfs = user.state / "images" / "rootfs" / image_fixture.sha256(image.config)[7:]
        assert (rootfs / "bin" / "busybox").stat().st_uid == user.uid
        assert (rootfs / "etc" / "os-release").read_bytes() == image_fixture.OS_RELEASE
        listed = json.loads(user.tappass("--json", "image", "ls", namespace=False).stdout)
        assert name in next(i["used_by"] for i in listed if i["digest"] == image.digest)
        with open("/proc/self/mountinfo") as f:  # the run's overlay: in the user's namespace only
            assert str(user.state) not in f.read()
    finally:
        user.tappass("stop", name, "--timeout", "2", namespace=False)
    assert json.loads(user.tappass("--json", "status", name, namespace=False).stdout)[
        "state"] == "exited"
    assert not (user.state / "run" / name / "image-overlay").exists()
    shutil.rmtree(layout, ignore_errors=True)


def test_a_user_without_subordinate_ids_runs_an_agent_from_an_image(rootless_users):
    """The single-id fallback (crun only): the agent is the user itself."""
    user = rootless_users["single"]
    layout = user.home / unique_name("layout-single")
    image = image_fixture.busybox_image(layout)
    readable_by(user, layout)
    agent = write_agent(user.agent_dir("image-single"), ["/bin/sh", "/opt/agent/run.sh"],
                        files={"run.sh": SHOW})
    name = user.enroll(unique_name("img-rl-one"), image={"allowed_digests": [image.digest]})
    result = user.tappass("start", name, "--agent", str(agent), "--runtime", "crun",
                          "--image", f"oci:{layout}", "--foreground", "--rm", namespace=False,
                          timeout=120)
    assert result.returncode == 0, result.stderr
    assert image_fixture.OS_RELEASE.decode().splitlines()[0] in result.stdout, result.stdout
    assert "write=refused" in result.stdout and "SHOWN" in result.stdout, result.stdout
    assert not (user.state / "run" / name / "image-overlay").exists()
    shutil.rmtree(layout, ignore_errors=True)


# --- escape probes, as the agent of a rootless image-based sandbox ----------------


@pytest.fixture(scope="module")
def python_layout(rootless_users, tmp_path_factory):
    user = rootless_users["subids"]
    layout = user.home / unique_name("python-layout")
    image = image_fixture.python_image(layout)
    readable_by(user, layout)
    yield image
    shutil.rmtree(layout, ignore_errors=True)


@pytest.fixture(scope="module", params=RUNTIMES)
def probed(request, rootless_users, python_layout):
    runtime = request.param
    require_runtime(runtime)
    user = rootless_users["subids"]
    name = user.enroll(unique_name("rlimgprobe", runtime),
                       image={"allowed_digests": [python_layout.digest]})
    agent = expect.write_probe_agent(user.agent_dir("probe"), user.state)
    result = user.tappass("start", name, "--agent", str(agent), "--runtime", runtime,
                          "--image", f"oci:{python_layout.layout}", "--foreground", "--rm",
                          namespace=False, timeout=180)
    assert result.returncode == 0, (result.stderr[-3000:], result.stdout[-3000:])
    first, report = expect.probe_output(result.stdout)
    return {"report": report, "mounts": first["mountinfo"], "maps": first["maps"], "user": user,
            "state": user.state, "runtime": runtime, "name": name}


def test_probe_the_agent_runs_from_the_image_as_a_mapped_non_root_uid(probed):
    assert "ro" in probed["mounts"]["/run/tappass/hostusr"]
    assert probed["report"]["uid"] != 0 and probed["report"]["euid"] != 0
    assert not (probed["state"] / "run" / probed["name"] / "image-overlay").exists()


def test_probe_no_capabilities_no_new_privs_and_seccomp(probed):
    expect.no_privileges(probed)


def test_probe_the_keyring_is_readable_but_not_writable(probed):
    expect.keyring_read_only(probed)


def test_probe_the_state_is_not_visible(probed):
    expect.state_invisible(probed)


def test_probe_mount_unshare_setns_ptrace_setuid_fail(probed):
    expect.escapes_fail(probed)


def test_probe_the_root_is_read_only_and_only_workspace_and_tmp_are_writable(probed):
    expect.only_workspace_and_tmp_writable(probed)


def test_probe_no_host_pids_and_only_loopback(probed):
    expect.isolated(probed)
