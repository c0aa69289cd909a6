"""tappass_host.loopdev: the workspace's image mounted through a loop device
without `mount`'s process, keeping mount -o loop's guarantees (real loop
devices, real ext4, a real second mount namespace)."""

import os
import subprocess
import sys
import textwrap

import pytest

from sandbox_fixture import require_root, wait_for
from tappass_host import loopdev, workspace

MIB = 1024 * 1024


@pytest.fixture
def image(tmp_path):
    require_root()
    path = tmp_path / "workspace.img"
    with open(path, "wb") as f:
        f.truncate(8 * MIB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(path)], check=True, capture_output=True)
    return path


def test_a_mount_binds_a_device_with_autoclear_and_the_unmount_frees_it(image, tmp_path):
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    workspace._mount(image, mountpoint)
    try:
        [(device, name)] = loopdev.bound_devices(image.stat())
        assert os.stat(mountpoint).st_dev == device
        with open(f"/sys/block/{name}/loop/autoclear") as f:
            assert f.read().strip() == "1"
        (mountpoint / "written").write_text("x")
        assert os.statvfs(mountpoint).f_flag & os.ST_NOSUID and os.statvfs(mountpoint).f_flag & os.ST_NODEV
    finally:
        assert workspace._unmount(mountpoint)
    wait_for(lambda: loopdev.bound_devices(image.stat()) == [])


def test_an_image_mounted_in_another_namespace_is_never_behind_a_second_device(image, tmp_path):
    """Two loop devices over one image would be two filesystems over the same
    blocks: the second mount must use the first one's device."""
    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    theirs.mkdir()
    ours.mkdir()
    holder = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from pathlib import Path
            from tappass_host import loopdev
            loopdev.mount(Path({str(image)!r}), Path({str(theirs)!r}), "ext4", "")
            Path({str(theirs)!r}, "from-theirs").write_text("theirs")
            print("mounted", flush=True)
            sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline().strip() == "mounted"
        assert not os.path.ismount(theirs)  # theirs is in their namespace only
        bound = loopdev.bound_devices(image.stat())
        [(device, _)] = bound
        workspace._mount(image, ours)
        try:
            assert loopdev.bound_devices(image.stat()) == bound
            assert os.stat(ours).st_dev == device
            assert (ours / "from-theirs").read_text() == "theirs"  # one filesystem
        finally:
            assert workspace._unmount(ours)
        assert len(loopdev.bound_devices(image.stat())) == 1  # still theirs
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    wait_for(lambda: loopdev.bound_devices(image.stat()) == [])


def test_a_bound_device_whose_last_user_lets_go_is_kept_bound_until_the_mount(image, tmp_path):
    """The device found bound to the image may lose its last user between the
    lookup and the mount (udev's probe after the unmount that made the image; a
    container's mount namespace ending): its autoclear would then fail the
    mount with EIO (seen in the VM lane). The device the lookup returns is held."""
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    device, theirs = loopdev._bind_free(image)  # another user's binding, with autoclear
    found, held = loopdev._hold_bound(image.stat())
    assert found == device
    try:
        os.close(theirs)  # their last close: the autoclear would clear it now
        assert [name for _, name in loopdev.bound_devices(image.stat())] == \
            [device.removeprefix("/dev/")]
        loopdev._mount(found, mountpoint, "ext4", "")
    finally:
        os.close(held)
    try:
        (mountpoint / "written").write_text("x")
    finally:
        assert workspace._unmount(mountpoint)
    wait_for(lambda: loopdev.bound_devices(image.stat()) == [])
