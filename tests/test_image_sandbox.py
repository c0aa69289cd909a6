"""Agents from OCI images (issue 14), started by the real `tappass-host start`
under crun and runc: the keyring pins the image, each run gets an overlay over
the store's one shared copy, and the confinement is the host-root sandbox's
(the escape probes run in an image with python3, the Landlock launcher runs
from the host's /usr since images need not hold a python3)."""

import json
import os
from pathlib import Path

import pytest

import escape_expectations as expect
import image_fixture
from audit_records import read_audit
from sandbox_fixture import (  # noqa: F401  (fixtures: runtime, host)
    RUNTIMES,
    host,
    new_host,
    one_line_error,
    require_runtime,
    runtime,
    unique_name,
    wait_for,
    write_agent,
)

# Prints what the agent sees of its root, then the marker the tests wait on.
SHOW_ROOT = """\
cat /etc/os-release
echo "uid=$(id -u)"
ls /usr/bin/python3 2>&1 | head -n 1
echo "keyring=$(head -c 1 /run/tappass/keyring/keyring.dsse.json)"
echo "hostusr=$(ls /run/tappass/hostusr 2>&1 | head -c 60)"
echo SHOWN
"""
# Stays up until stopped.
IDLE = "echo READY; while :; do sleep 1; done\n"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """The busybox test image as an OCI layout, and another image (a different
    os-release) whose digest no keyring of these tests allows."""
    root = tmp_path_factory.mktemp("images")
    allowed = image_fixture.busybox_image(root / "busybox")
    other = image_fixture.write_layout(root / "other", [image_fixture.tar_layer(
        [*image_fixture.busybox_entries()[:-1],
         image_fixture.File("etc/os-release", b'NAME="other"\nID=other\n')])])
    for layout in (root / "busybox", root / "other"):
        for path in [layout, *layout.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    return {"allowed": allowed, "other": other}


def pinning(*digests: str, repository: str | None = None) -> dict:
    if repository:
        return {"image": {"allowed": [{"repository": repository, "digests": list(digests)}]}}
    return {"image": {"allowed_digests": list(digests)}}


def shell_agent(directory, script: str, image: str | None = None):
    manifest = None
    if image:
        manifest = ('name = "image-agent"\nversion = "0.1.0"\n'
                    'entrypoint = ["/bin/sh", "/opt/agent/run.sh"]\n'
                    f'[rootfs]\ntype = "image"\nimage = "{image}"\n')
    return write_agent(directory, ["/bin/sh", "/opt/agent/run.sh"], files={"run.sh": script},
                       manifest=manifest)


def overlay_mounts(host) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if f" {host.root}" in line and " overlay " in line]


def test_an_allowed_image_runs_and_the_agent_sees_its_root_not_the_hosts(runtime, host, images,
                                                                           tmp_path):
    image = images["allowed"]
    name = host.enroll(unique_name("img", runtime), **pinning(image.digest))
    agent = shell_agent(tmp_path / "agent", SHOW_ROOT)
    host.start_ok(name, agent, runtime, "--image", f"oci:{image.layout}")
    log = host.wait_log(name, "SHOWN", timeout=60)
    assert image_fixture.OS_RELEASE.decode().splitlines()[0] in log, log
    assert "Debian" not in log, log  # the host's os-release
    assert "uid=0" not in log
    assert "No such file" in log  # the image has no python3; the host's is not in its /usr
    assert "keyring={" in log, log
    assert "hostusr=ls: " in log  # the launcher's host /usr: unreadable under the ruleset
    status = host.status(name)
    assert status["image"] == image.digest
    assert json.loads(host.paths.sandbox(name).record.read_text())["image"] == image.digest
    inspected = json.loads(host.run("inspect", name).stdout)
    assert inspected["image"] == image.digest
    assert inspected["config"]["root"]["readonly"] is True
    assert not any(m["destination"] in ("/usr", "/etc") for m in inspected["config"]["mounts"])
    started = read_audit(host.paths.audit_log, name, "sandbox.started")
    assert started[-1]["details"]["image"] == image.digest
    # Started and exited: the run's overlay and upper are gone, the shared root unchanged.
    host.wait_exited(name, timeout=60)
    # The exit hook unmounts, then removes the upper: wait for both, not just the first.
    layer = host.paths.sandbox(name).image_layer
    wait_for(lambda: not overlay_mounts(host) and not layer.exists(),
             what="the overlay to be unmounted and its upper removed")


def test_the_shared_root_is_never_written(host, images, tmp_path):
    image = images["allowed"]
    name = host.enroll(unique_name("img-shared"), **pinning(image.digest))
    agent = shell_agent(tmp_path / "agent", IDLE)
    host.start_ok(name, agent, "crun", "--image", f"oci:{image.layout}")
    root = host.paths.image_rootfs(image_fixture.sha256(image.config)[7:])
    before = image_fixture.tree(root)
    host.wait_log(name, "READY", timeout=60)
    upper = host.paths.sandbox(name).image_upper
    assert (upper / "run" / "tappass" / "agent.env").exists()  # what start wrote: the upper's
    assert not (root / "run").exists() and not (root / "opt").exists()
    assert image_fixture.tree(root) == before
    result = host.run("stop", name, "--timeout", "2")
    assert result.returncode == 0, result.stderr
    assert not overlay_mounts(host)
    assert image_fixture.tree(root) == before


def test_the_package_names_its_image_pinned_for_its_repository(host, images, tmp_path):
    """[rootfs] image, relative to the package: a docker-archive whose RepoTags
    name tappass/busybox:1, pinned in the keyring for that repository only."""
    image = images["allowed"]
    agent = shell_agent(tmp_path / "agent", SHOW_ROOT, image="docker-archive:./image.tar")
    image_fixture.docker_archive(image, agent / "image.tar", repo_tag="tappass/busybox:1")
    (agent / "image.tar").chmod(0o644)
    digest = json.loads(host.run("--json", "image", "import",
                                 f"docker-archive:{agent / 'image.tar'}").stdout)["digest"]
    name = host.enroll(unique_name("img-pkg"), **pinning(digest, repository="tappass/other"))
    error = one_line_error(host.start(name, agent, "crun"))
    assert "may not run image" in error, error
    assert read_audit(host.paths.audit_log, name, "image.denied")[-1]["details"][
        "repository"] == "tappass/busybox"
    host.apply(name, **pinning(digest, repository="tappass/busybox"))
    host.start_ok(name, agent, "crun")
    log = host.wait_log(name, "SHOWN", timeout=60)
    assert "TapPass test image" in log


def test_a_digest_the_keyring_does_not_allow_is_refused_and_audited(host, images, tmp_path):
    allowed, other = images["allowed"], images["other"]
    name = host.enroll(unique_name("img-denied"), **pinning(allowed.digest))
    agent = shell_agent(tmp_path / "agent", SHOW_ROOT)
    result = host.start(name, agent, "crun", "--image", f"oci:{other.layout}")
    error = one_line_error(result)
    assert other.digest in error and "not in image.allowed_digests" in error, error
    denied = read_audit(host.paths.audit_log, name, "image.denied")
    assert [e["details"] for e in denied] == [{
        "digest": other.digest, "policy_version": 1,
        "reason": f"{other.digest} is not in image.allowed_digests"}]
    assert not read_audit(host.paths.audit_log, name, "sandbox.started")
    assert host.status(name)["state"] == "created"
    assert not overlay_mounts(host)
    assert "image" not in json.loads(host.paths.sandbox(name).record.read_text())
    # A keyring without the image aspect allows no image at all.
    host.apply(name)
    error = one_line_error(host.start(name, agent, "crun", "--image", f"oci:{allowed.layout}"))
    assert "allows no image" in error, error


def test_a_flip_withdrawing_the_image_marks_restart_pending(runtime, host, images, tmp_path):
    image = images["allowed"]
    name = host.enroll(unique_name("img-flip", runtime), **pinning(image.digest))
    agent = shell_agent(tmp_path / "agent", IDLE)
    host.start_ok(name, agent, runtime, "--image", f"oci:{image.layout}")
    host.wait_log(name, "READY", timeout=60)
    host.apply(name, **pinning(image.digest, "sha256:" + "0" * 64))  # still allowed
    assert host.status(name)["flags"] == []
    assert not read_audit(host.paths.audit_log, name, "image.revoked")
    version = host.apply(name, **pinning("sha256:" + "0" * 64))
    status = host.status(name)
    assert status["state"] == "running"
    assert {"restart-pending", "image-revoked"} <= set(status["flags"]), status
    assert [e["details"] for e in read_audit(host.paths.audit_log, name, "image.revoked")] == [
        {"digest": image.digest, "policy_version": version, "action": "keep"}]


def test_with_on_image_revoked_stop_a_flip_withdrawing_the_image_stops_it(runtime, host, images,
                                                                           tmp_path):
    host.configure('on_image_revoked = "stop"\n')
    image = images["allowed"]
    name = host.enroll(unique_name("img-stop", runtime), **pinning(image.digest))
    agent = shell_agent(tmp_path / "agent", IDLE)
    host.start_ok(name, agent, runtime, "--image", f"oci:{image.layout}")
    host.wait_log(name, "READY", timeout=60)
    version = host.apply(name, **pinning("sha256:" + "0" * 64))
    status = host.status(name)
    assert status["state"] == "exited", status
    assert [e["details"]["by"] for e in read_audit(host.paths.audit_log, name,
                                                   "sandbox.stopped")] == ["image_revoked"]
    assert read_audit(host.paths.audit_log, name, "image.revoked")[-1]["details"] == {
        "digest": image.digest, "policy_version": version, "action": "stop"}
    assert not overlay_mounts(host)
    # Started again under the keyring that withdrew it: refused.
    error = one_line_error(host.start(name, agent, runtime, "--image", f"oci:{image.layout}"))
    assert "may not run image" in error


def test_two_sandboxes_share_one_unpacked_copy(host, images, tmp_path):
    image = images["allowed"]
    names = [host.enroll(unique_name(f"img-two{i}"), **pinning(image.digest)) for i in (1, 2)]
    agent = shell_agent(tmp_path / "agent", "stat -c 'inode=%i' /bin/busybox; " + IDLE)
    for name in names:
        host.start_ok(name, agent, "crun", "--image", f"oci:{image.layout}")
    logs = [host.wait_log(name, "READY", timeout=60) for name in names]
    assert len(list(host.paths.image_rootfs_dir.iterdir())) == 1
    root = next(host.paths.image_rootfs_dir.iterdir())
    inode = (root / "bin" / "busybox").stat().st_ino
    for log in logs:
        assert f"inode={inode}" in log, log  # the overlay shows the shared file itself
    mounts = overlay_mounts(host)
    assert len(mounts) == 2 and all(f"lowerdir={root}," in m for m in mounts), mounts
    listed = json.loads(host.run("--json", "image", "ls").stdout)
    assert [sorted(i["used_by"]) for i in listed] == [sorted(names)]


@pytest.fixture(scope="module")
def python_image(tmp_path_factory):
    """An image holding python3 (and nothing else of the host's /usr)."""
    layout = tmp_path_factory.mktemp("python-image") / "layout"
    image = image_fixture.python_image(layout)
    for path in [layout, *layout.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return image


def test_an_entrypoint_by_bare_name_is_found_on_the_agents_path(runtime, host, python_image,
                                                                 tmp_path):
    """`entrypoint = ["python3", ...]`: the launcher (the host's python3, from
    the host's /usr, which its ruleset leaves out) searches the agent's PATH
    after the ruleset, so it may import nothing then; os.execvpe imported
    `warnings` ("cannot run python3: Permission denied")."""
    name = host.enroll(unique_name("img-bare", runtime), **pinning(python_image.digest))
    agent = write_agent(tmp_path / "agent", ["python3", "/opt/agent/main.py"], files={
        "main.py": "import sys\nprint('RAN', sys.executable, open('/etc/os-release').read())\n"})
    host.start_ok(name, agent, runtime, "--image", f"oci:{python_image.layout}")
    status = host.wait_exited(name, timeout=60)
    log = host.logs(name)
    assert status["exit"]["code"] == 0, log
    assert "RAN /usr/bin/python3 " in log and "TapPass test image" in log, log


def hostile_image(directory, *entries) -> image_fixture.Image:
    """The busybox image with `entries` added."""
    image = image_fixture.write_layout(directory, [image_fixture.tar_layer(
        [*image_fixture.busybox_entries(), *entries])])
    for path in [directory, *directory.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return image


def run_to_exit(host, runtime, image, tmp_path, script: str) -> str:
    name = host.enroll(unique_name("img-hostile", runtime), **pinning(image.digest))
    host.start_ok(name, shell_agent(tmp_path / "agent", script), runtime,
                  "--image", f"oci:{image.layout}")
    status = host.wait_exited(name, timeout=60)
    log = host.logs(name)
    assert status["exit"]["code"] == 0, log
    return log


def test_an_images_symlinked_run_never_leads_start_outside_the_root(host, tmp_path):
    """start writes /run/tappass/agent.env and makes mount points under
    /run/tappass in the run's root, on the host, as root: an image whose /run
    is an absolute link (here to a host directory) is refused before anything
    is written through it."""
    target = tmp_path / "host-dir"
    target.mkdir()
    image = hostile_image(tmp_path / "image", image_fixture.Symlink("run", str(target)))
    name = host.enroll(unique_name("img-runlink"), **pinning(image.digest))
    agent = shell_agent(tmp_path / "agent", "echo RAN\n")
    error = one_line_error(host.start(name, agent, "crun", "--image", f"oci:{image.layout}"))
    assert "outside the sandbox's rootfs" in error, error
    assert list(target.iterdir()) == []
    assert not overlay_mounts(host)


PRELOADED = """\
#include <unistd.h>
__attribute__((constructor)) static void preloaded(void) { write(2, "PRELOADED\\n", 10); }
"""


def test_the_launcher_loads_nothing_an_images_ld_so_preload_names(runtime, host, tmp_path):
    """The host's loader, which starts the launcher in the image's root before
    its ruleset, loads what /etc/ld.so.preload there names: a library whose
    constructor would run unconfined, and a text file it would say it could
    not preload. The run's overlay masks the list with an empty one."""
    import subprocess

    (tmp_path / "preloaded.c").write_text(PRELOADED)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(tmp_path / "preloaded.so"),
                    str(tmp_path / "preloaded.c")], check=True)
    image = hostile_image(
        tmp_path / "image", image_fixture.File("preloaded.so",
                                               (tmp_path / "preloaded.so").read_bytes(), 0o755),
        image_fixture.File("etc/ld.so.preload", b"/preloaded.so /etc/os-release\n"))
    log = run_to_exit(host, runtime, image, tmp_path,
                      "echo \"preload=[$(cat /etc/ld.so.preload)]\"; echo DONE\n")
    assert "PRELOADED" not in log, log
    assert "ld.so.preload" not in log.replace("preload=[]", ""), log
    assert "preload=[]" in log and "DONE" in log, log


def test_the_launcher_imports_nothing_from_the_image(runtime, host, tmp_path):
    """The host's python3 looks for lib/python311.zip up from its own
    directory (/run/tappass/hostusr/bin: the image's /run, /) and imports
    its standard library from the first it finds: PYTHONHOME pins it."""
    import io
    import zipfile

    hijack = io.BytesIO()
    with zipfile.ZipFile(hijack, "w") as archive:
        archive.writestr("encodings/__init__.py",
                         "import posix\nposix.write(2, b'HIJACKED the launcher\\n')\n")
    zipped = hijack.getvalue()
    image = hostile_image(tmp_path / "image", image_fixture.Dir("run"),
                          image_fixture.Dir("run/lib"), image_fixture.Dir("lib"),
                          image_fixture.File("run/lib/python311.zip", zipped),
                          image_fixture.File("lib/python311.zip", zipped))
    log = run_to_exit(host, runtime, image, tmp_path, "echo DONE\n")
    assert "HIJACKED" not in log and "DONE" in log, log


@pytest.fixture(scope="module")
def debian_image(tmp_path_factory):
    """Debian with python3, as debootstrap makes it (image_fixture.debian_layer)."""
    return image_fixture.debian_image(tmp_path_factory.mktemp("debian-image") / "layout")


DEBIAN_AGENT = """\
import os, subprocess, sys
print("OS", open("/etc/os-release").read().replace("\\n", " | "))
print("PYTHON", sys.executable, os.stat(sys.executable).st_ino)
awk = subprocess.run(["awk", "BEGIN { print 6 * 7 }"], capture_output=True, text=True)
print("AWK", awk.stdout.strip(), os.path.realpath("/usr/bin/awk"), os.readlink("/usr/bin/awk"))
print("DONE")
"""


def test_a_debian_image_runs_python3_by_name_through_its_absolute_symlinks(runtime, host,
                                                                           debian_image, tmp_path):
    """A real distribution's root: its own os-release and python3, and awk
    through /usr/bin/awk -> /etc/alternatives/awk -> /usr/bin/mawk, absolute
    links resolved in the sandbox's root."""
    image = debian_image
    name = host.enroll(unique_name("img-debian", runtime), **pinning(image.digest))
    agent = write_agent(tmp_path / "agent", ["python3", "/opt/agent/main.py"],
                        files={"main.py": DEBIAN_AGENT})
    result = host.start(name, agent, runtime, "--image", f"oci:{image.layout}", timeout=300)
    assert result.returncode == 0, result.stderr
    status = host.wait_exited(name, timeout=60)
    log = host.logs(name)
    assert status["exit"]["code"] == 0, log
    root = host.paths.image_rootfs(image_fixture.sha256(image.config)[7:])
    assert image_fixture.DEBIAN_MARK.decode().strip() in log, log  # the image's, not the host's
    assert f"PYTHON /usr/bin/python3 {(root / 'usr/bin/python3').stat().st_ino}" in log, log
    assert "AWK 42 /usr/bin/mawk /etc/alternatives/awk" in log, log
    assert (root / "etc/alternatives/awk").readlink() == Path("/usr/bin/mawk")


@pytest.fixture(scope="module", params=[(r, i) for i in ("python", "debian") for r in RUNTIMES],
                ids=lambda p: f"{p[1]}-{p[0]}")
def probed(request):
    """The escape probe as the agent of the python3 image and of the Debian
    one, once per runtime."""
    runtime, kind = request.param
    require_runtime(runtime)
    image = request.getfixturevalue(f"{kind}_image")
    h = new_host()
    try:
        key = h.make_machine_key()
        name = h.enroll(unique_name("img-probe", runtime), **pinning(image.digest))
        agent = expect.write_probe_agent(h.root / "agent", h.state)  # python3 by its bare name
        started = h.start(name, agent, runtime, "--image", f"oci:{image.layout}", timeout=300)
        assert started.returncode == 0, started.stderr
        status = h.wait_exited(name, timeout=120)
        log = h.logs(name)
        assert status["exit"]["code"] == 0, (status, log[-3000:])
        wrapper, report = expect.probe_output(log)
        record = json.loads(h.paths.sandbox(name).record.read_text())
        yield {"report": report, "mounts": wrapper["mountinfo"], "record": record, "key": key,
               "host": h, "state": h.state, "runtime": runtime, "log": log}
    finally:
        h.cleanup()


def test_probe_the_agent_runs_from_the_image(probed):
    assert "/run/tappass/hostusr" in probed["mounts"]
    assert "ro" in probed["mounts"]["/run/tappass/hostusr"]
    assert probed["record"]["image"].startswith("sha256:")


def test_probe_no_capabilities_no_new_privs_and_seccomp(probed):
    expect.no_privileges(probed)


def test_probe_the_keyring_is_readable_but_not_writable(probed):
    expect.keyring_read_only(probed)


def test_probe_the_machine_key_and_the_state_are_not_visible(probed):
    expect.state_invisible(probed)


def test_probe_mount_unshare_setns_ptrace_setuid_fail(probed):
    expect.escapes_fail(probed)


def test_probe_the_root_is_read_only_and_only_workspace_and_tmp_are_writable(probed):
    expect.only_workspace_and_tmp_writable(probed)


def test_probe_no_host_pids_and_only_loopback(probed):
    expect.isolated(probed)


def test_rootless_outside_the_users_namespace_an_image_start_is_refused_in_one_line():
    """Rootless, the overlay is mounted in the user's namespace, which every
    command enters (tests/test_image_rootless.py): a process outside it (not
    uid 0 there) is refused before anything is imported or created."""
    from tappass_host.runtime import imageroot

    imageroot.require_root(False)
    imageroot.require_root(True)  # uid 0 in a namespace of its own
    child = os.fork()
    if child == 0:
        os.setuid(65534)
        try:
            imageroot.require_root(True)
        except imageroot.ImageRootUnavailable as refusal:
            os._exit(3 if "needs root, or the user's own namespace" in str(refusal) else 1)
        os._exit(0)
    assert os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 3


def test_a_start_without_agent_reruns_the_last_image(host, images, tmp_path):
    """`start NAME` (tappass-host@.service, and the daemon's restarts through
    state.json) runs the last run's image again, re-admitted by the keyring:
    never the host's root in its place."""
    image = images["allowed"]
    name = host.enroll(unique_name("img-again"), **pinning(image.digest))
    agent = shell_agent(tmp_path / "agent", SHOW_ROOT)
    host.start_ok(name, agent, "crun", "--image", f"oci:{image.layout}")
    host.wait_exited(name, timeout=60)
    result = host.run("start", name)
    assert result.returncode == 0, result.stderr
    wait_for(lambda: host.logs(name).count("SHOWN") == 2, timeout=60, what="the second run")
    assert host.logs(name).count("TapPass test image") == 2
    assert host.status(name)["image"] == image.digest
    host.wait_exited(name, timeout=60)
    host.apply(name, **pinning("sha256:" + "0" * 64))
    assert "may not run image" in one_line_error(host.run("start", name))
