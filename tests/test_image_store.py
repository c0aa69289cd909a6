"""The local image store with a real image built by the test (busybox-static,
tests/image_fixture.py): every source kind imports it, the unpacked root runs
(its absolute symlinks resolve inside it), two imports share one copy, rm and
prune respect the sandboxes that name an image, a crashed import is swept,
and the CLI drives it all."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from image_fixture import (
    OS_RELEASE,
    busybox_entries,
    File,
    busybox_image,
    docker_archive,
    import_image,
    oci_archive,
    tar_layer,
    tree,
    write_layout,
)

from tappass_host import sandbox_record
from tappass_host.image import ImageError
from tappass_host.image.source import ImageSourceError
from tappass_host.image.store import ImageStore, ImageStoreError
from tappass_host.image.unpack import Limits

MiB = 1024 * 1024


@pytest.fixture
def store(paths):
    return ImageStore(paths, Limits(256 * MiB, 64 * MiB, 10000))


@pytest.fixture
def busybox(tmp_path):
    return busybox_image(tmp_path / "layout")


def _sources(tmp_path, image):
    return {
        "oci": f"oci:{image.layout}",
        "oci-tag": f"oci:{image.layout}:latest",
        "oci-archive": f"oci-archive:{oci_archive(image.layout, tmp_path / 'image.tar')}:latest",
        "docker-archive": f"docker-archive:{docker_archive(image, tmp_path / 'docker.tar')}",
    }


@pytest.mark.parametrize("kind", ["oci", "oci-tag", "oci-archive", "docker-archive"])
def test_each_source_kind_imports_a_root_that_runs(store, busybox, tmp_path, kind):
    imported = import_image(store, _sources(tmp_path, busybox)[kind])
    assert imported.new
    root = store.rootfs(imported.record.digest)
    if kind != "docker-archive":  # a docker-archive has no manifest: the store writes one
        assert imported.record.digest == busybox.digest
    assert imported.record.names == (["tappass/busybox:1"] if kind == "docker-archive"
                                      else ["latest"])
    out = subprocess.run(["chroot", root, "/bin/cat", "/etc/os-release"],
                         capture_output=True, check=True).stdout
    assert out == OS_RELEASE
    # /usr/bin/awk -> /etc/alternatives/awk -> /bin/busybox: resolved inside the root
    out = subprocess.run(["chroot", root, "/usr/bin/awk", "BEGIN { print 6 * 7 }"],
                         capture_output=True, check=True).stdout
    assert out == b"42\n"
    assert imported.record.process["Cmd"] == ["/bin/sh"]


def test_a_digest_in_the_store_is_a_source(store, busybox):
    first = import_image(store, f"oci:{busybox.layout}")
    again = import_image(store, busybox.digest)
    assert not again.new and again.record.digest == first.record.digest
    with pytest.raises(ImageSourceError, match="not in the local store"):
        import_image(store, "sha256:" + "0" * 64)


def test_two_imports_share_one_unpacked_copy(store, busybox, tmp_path):
    first = import_image(store, f"oci:{busybox.layout}")
    before = tree(store.paths.images)
    second = import_image(store, _sources(tmp_path, busybox)["oci-archive"])
    assert (first.new, second.new) == (True, False)
    assert tree(store.paths.images) == before
    docker = import_image(store, _sources(tmp_path, busybox)["docker-archive"])
    assert docker.new and docker.record.digest != busybox.digest  # other blobs, same config
    assert store.rootfs(docker.record.digest) == store.rootfs(busybox.digest)
    roots = list(store.paths.image_rootfs_dir.iterdir())
    assert roots == [store.rootfs(busybox.digest)]
    busybox_files = [p for p in store.paths.images.rglob("busybox") if p.is_file()]
    assert len(busybox_files) == 1
    store.remove(docker.record.digest)
    assert (store.rootfs(busybox.digest) / "bin/busybox").is_file()


def test_progress_reaches_the_whole_image(store, busybox):
    seen = []
    import_image(store, f"oci:{busybox.layout}", lambda phase, done, total: seen.append(
        (phase, done, total)))
    blobs = {p.name: p.stat().st_size for p in (busybox.layout / "blobs/sha256").iterdir()}
    fetched = [s for s in seen if s[0] == "fetch"]
    unpacked = [s for s in seen if s[0] == "unpack"]
    assert fetched[-1][1:] == (sum(blobs.values()),) * 2
    layers = sum(blobs.values()) - len(busybox.config) - blobs[busybox.digest[7:]]
    assert unpacked[-1][1:] == (layers,) * 2


def test_an_index_of_two_images_needs_a_tag(store, tmp_path):
    first = write_layout(tmp_path / "two", [tar_layer([File("a", b"1")])], tag="one")
    index = json.loads((tmp_path / "two/index.json").read_text())
    second = write_layout(tmp_path / "two", [tar_layer([File("a", b"2")])], tag="two")
    index["manifests"] += json.loads((tmp_path / "two/index.json").read_text())["manifests"]
    (tmp_path / "two/index.json").write_text(json.dumps(index))
    with pytest.raises(ImageError, match="holds 2 images, not one; name one of its tags: one, two"):
        import_image(store, f"oci:{tmp_path / 'two'}")
    assert import_image(store, f"oci:{tmp_path / 'two'}:two").record.digest == second.digest
    assert import_image(store, f"oci:{tmp_path / 'two'}:one").record.digest == first.digest


def _name_image(paths, sandbox_name, digest):
    record = sandbox_record.load(paths, sandbox_name)
    record.extra["image"] = digest
    sandbox_record.save(paths.sandbox(sandbox_name), record)


def test_rm_and_prune_keep_an_image_a_sandbox_names(store, busybox, tmp_path, sandbox, paths):
    used = import_image(store, f"oci:{busybox.layout}").record
    other = write_layout(tmp_path / "other", [tar_layer([File("x", b"y")])])
    unused = import_image(store, f"oci:{other.layout}").record
    _name_image(paths, "demo", used.digest)
    with pytest.raises(ImageStoreError, match="used by sandbox\\(es\\) demo"):
        store.remove(used.digest)
    assert [r.digest for r in store.prune()] == [unused.digest]
    assert [r.digest for r in store.records()] == [used.digest]
    assert list(store.paths.image_rootfs_dir.iterdir()) == [store.rootfs(used.digest)]
    layer_blobs = {d[7:] for d in used.blobs}
    assert {p.name for p in store.paths.image_blobs.iterdir()} == layer_blobs
    _name_image(paths, "demo", None)
    assert store.remove(used.digest[:19]).digest == used.digest
    assert list(store.paths.image_blobs.iterdir()) == []
    assert list(store.paths.image_rootfs_dir.iterdir()) == []


def test_what_a_crashed_import_left_is_swept(store, busybox, tmp_path):
    kept = import_image(store, f"oci:{busybox.layout}").record
    (store.paths.image_staging / "tmpcrash" / "rootfs" / "etc").mkdir(parents=True)
    orphan_root = store.paths.image_rootfs("f" * 64)
    shutil.copytree(store.rootfs(kept.digest), orphan_root, symlinks=True)
    (store.paths.image_blobs / ("e" * 64)).write_bytes(b"half a blob")
    other = write_layout(tmp_path / "other", [tar_layer([File("x", b"y")])])
    import_image(store, f"oci:{other.layout}")
    assert list(store.paths.image_staging.iterdir()) == []
    assert not orphan_root.exists()
    assert not (store.paths.image_blobs / ("e" * 64)).exists()
    assert {r.digest for r in store.records()} == {kept.digest, other.digest}


def test_a_refused_import_of_a_good_image_after_a_bad_one_works(store, tmp_path):
    """The refusal cleans its staging: the next import is not hindered."""
    bad = write_layout(tmp_path / "bad", [tar_layer([File("../x", b"")])])
    with pytest.raises(ImageError):
        import_image(store, f"oci:{bad.layout}")
    good = write_layout(tmp_path / "good", [tar_layer(busybox_entries())])
    assert import_image(store, f"oci:{good.layout}").new
    assert list(store.paths.image_staging.iterdir()) == []


def _cli(paths, *args):
    return subprocess.run([sys.executable, "-m", "tappass_host", "--state-dir", str(paths.state),
                           "image", *args], capture_output=True, text=True)


def test_the_cli_imports_lists_removes_and_prunes(paths, busybox, tmp_path):
    done = _cli(paths, "import", f"oci:{busybox.layout}", "--json")
    assert done.returncode == 0, done.stderr
    imported = json.loads(done.stdout)
    assert imported["digest"] == busybox.digest and imported["new"] is True
    listed = json.loads(_cli(paths, "ls", "--json").stdout)
    assert [i["digest"] for i in listed] == [busybox.digest]
    text = _cli(paths, "ls").stdout
    assert busybox.digest[:19] in text and "latest" in text
    refused = _cli(paths, "import", f"oci:{tmp_path / 'nowhere'}")
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1 and "is not a directory" in refused.stderr
    removed = _cli(paths, "rm", busybox.digest)
    assert removed.returncode == 0 and busybox.digest in removed.stdout
    assert json.loads(_cli(paths, "ls", "--json").stdout) == []
    assert _cli(paths, "import", f"oci:{busybox.layout}").returncode == 0
    pruned = json.loads(_cli(paths, "prune", "--json").stdout)
    assert pruned == {"removed": [busybox.digest]}
    help_text = _cli(paths, "--help").stdout
    assert "oci-archive:FILE[:TAG]" in help_text and "docker-archive:FILE" in help_text


def test_the_store_is_private_to_its_owner(store, busybox):
    import_image(store, f"oci:{busybox.layout}")
    assert os.stat(store.paths.images).st_mode & 0o077 == 0


def _blocked_on_a_lock(pid: int) -> bool:
    """/proc/locks lists a process waiting for a lock with `->`."""
    with open("/proc/locks") as f:
        return any("->" in line and line.split()[5] == str(pid) for line in f)


def test_an_import_waits_for_the_store_lock(paths, busybox):
    from tappass_host import statefile

    ImageStore(paths, Limits(MiB, MiB, 10))._prepare()
    with statefile.locked(paths.image_lock):
        waiting = subprocess.Popen([sys.executable, "-m", "tappass_host", "--state-dir",
                                    str(paths.state), "image", "import", f"oci:{busybox.layout}"])
        while not _blocked_on_a_lock(waiting.pid):
            assert waiting.poll() is None, "the import did not wait for the lock"
            os.sched_yield()
        assert list(paths.image_records.iterdir()) == []
    assert waiting.wait() == 0
    assert [p.stem for p in paths.image_records.iterdir()] == [busybox.digest[7:]]


def test_the_cli_shows_progress_on_a_terminal(paths, busybox):
    import pty

    main, terminal = pty.openpty()
    done = subprocess.run([sys.executable, "-m", "tappass_host", "--state-dir", str(paths.state),
                           "image", "import", f"oci:{busybox.layout}"],
                          stderr=terminal, stdout=subprocess.PIPE, text=True)
    os.close(terminal)
    shown = b""
    try:
        while chunk := os.read(main, 65536):
            shown += chunk
    except OSError:  # EIO: the terminal's other end is closed and drained
        pass
    os.close(main)
    assert done.returncode == 0
    assert b"fetch:" in shown and b"unpack:" in shown
    assert "fetch:" not in done.stdout
