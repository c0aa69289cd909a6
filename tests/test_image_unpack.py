"""Crafted malicious layers against the image store's unpacking (the
invariants at the top of tappass_host/image/unpack.py): each one is refused
with its reason, or neutralized, and a refused import leaves the store as it
was. Every import goes the whole way: layout, verification, unpacking."""

import gzip
import os
import stat
import tarfile

import pytest
from image_fixture import (
    Dir,
    Entry,
    File,
    Hardlink,
    Symlink,
    busybox_image,
    import_image,
    sha256,
    tar_layer,
    tree,
    write_layout,
)

from tappass_host.image.manifest import ImageRejected
from tappass_host.image.store import ImageStore
from tappass_host.image.unpack import Limits

MiB = 1024 * 1024


@pytest.fixture
def store(paths):
    store = ImageStore(paths, Limits(64 * MiB, 16 * MiB, 1000))
    _import(store, busybox_image(paths.state.parent / "base"))  # a store that holds something
    return store


@pytest.fixture
def outside(tmp_path):
    """A host directory the layers aim at, with a file in it."""
    directory = tmp_path / "outside"
    directory.mkdir()
    (directory / "victim").write_text("host data\n")
    return directory


def _import(store, image):
    return import_image(store, f"oci:{image.layout}").record


def _layers(store, *layers, name="evil", **kw):
    return write_layout(store.paths.state.parent / name, [tar_layer(e) for e in layers], **kw)


def _refused(store, image, reason):
    before = tree(store.paths.images)
    with pytest.raises(ImageRejected) as caught:
        _import(store, image)
    assert caught.value.reason == reason, caught.value
    assert "\n" not in str(caught.value)
    assert tree(store.paths.images) == before, "a refused import changed the store"
    return caught.value


def _rootfs(store, image):
    return store.rootfs(_import(store, image).digest)


def _inside(outside):
    """`outside`'s path as a name inside an image (no leading /)."""
    parts = str(outside).strip("/").split("/")
    return [Dir("/".join(parts[:i + 1])) for i in range(len(parts))]


def test_a_dotdot_name_is_refused(store, outside):
    escape = "../" * 20 + str(outside).strip("/") + "/planted"
    _refused(store, _layers(store, [File(escape, b"x")]), "path")
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]


def test_an_absolute_name_is_refused(store, outside):
    _refused(store, _layers(store, [File(f"{outside}/planted", b"x")]), "path")
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]


def test_a_write_through_an_absolute_symlink_stays_in_the_root(store, outside):
    """lnk -> /<outside>, then lnk/planted: the kernel resolves lnk under the
    root, so the file lands at <root>/<outside>/planted."""
    image = _layers(store, [*_inside(outside), Symlink("lnk", str(outside)),
                            File("lnk/planted", b"x"), File("lnk/victim", b"overwritten")])
    root = _rootfs(store, image)
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]
    assert (outside / "victim").read_text() == "host data\n"
    assert (root / str(outside).strip("/") / "planted").read_bytes() == b"x"
    assert os.readlink(root / "lnk") == str(outside)


def test_a_write_through_a_relative_symlink_of_a_lower_layer_stays_in_the_root(store, outside):
    up = "../" * 30 + str(outside).strip("/")
    image = _layers(store, [*_inside(outside), Dir("a"), Symlink("a/lnk", up)],
                    [File("a/lnk/planted", b"x")])
    root = _rootfs(store, image)
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]
    assert (root / str(outside).strip("/") / "planted").read_bytes() == b"x"


def test_a_write_through_a_symlink_to_nowhere_is_refused(store, outside):
    """The target does not exist inside the root: never created on the host either."""
    image = _layers(store, [Symlink("lnk", str(outside / "sub")), File("lnk/planted", b"x")])
    _refused(store, image, "path")
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]


def test_a_file_replaces_a_symlink_instead_of_writing_through_it(store, outside):
    image = _layers(store, [Symlink("f", str(outside / "victim"))], [File("f", b"layer data")])
    root = _rootfs(store, image)
    assert (outside / "victim").read_text() == "host data\n"
    assert stat.S_ISREG((root / "f").lstat().st_mode)
    assert (root / "f").read_bytes() == b"layer data"


def test_a_hard_link_through_a_symlink_to_a_host_file_is_refused(store, outside):
    image = _layers(store, [Symlink("lnk", str(outside)), Hardlink("stolen", "lnk/victim")])
    _refused(store, image, "hard_link")
    assert (outside / "victim").stat().st_nlink == 1


def test_a_hard_link_out_with_dotdot_is_refused(store, outside):
    image = _layers(store, [Hardlink("stolen", "../" * 20 + str(outside).strip("/") + "/victim")])
    _refused(store, image, "path")
    assert (outside / "victim").stat().st_nlink == 1


def test_a_hard_link_to_a_missing_target_is_refused(store):
    _refused(store, _layers(store, [Hardlink("h", "no/such/file")]), "hard_link")


def test_a_hard_link_inside_the_image_works(store):
    root = _rootfs(store, _layers(store, [File("a", b"same"), Hardlink("b", "a")]))
    assert (root / "a").stat().st_ino == (root / "b").stat().st_ino


def test_device_nodes_and_fifos_are_skipped(store):
    image = _layers(store, [Dir("dev"),
                            Entry("dev/sda", tarfile.CHRTYPE, devmajor=8, devminor=0),
                            Entry("dev/loop", tarfile.BLKTYPE, devmajor=7, devminor=0),
                            Entry("dev/pipe", tarfile.FIFOTYPE), File("dev/kept", b"k")])
    record = _import(store, image)
    root = store.rootfs(record.digest)
    assert sorted(p.name for p in (root / "dev").iterdir()) == ["kept"]
    assert record.skipped == {"devices": 2, "fifos": 1}


def test_setuid_setgid_and_shared_write_bits_are_dropped(store):
    image = _layers(store, [Dir("d", 0o2777), File("d/su", b"#!", 0o6755),
                            File("d/ww", b"w", 0o666)])
    root = _rootfs(store, image)
    assert stat.S_IMODE((root / "d/su").stat().st_mode) == 0o755
    assert stat.S_IMODE((root / "d/ww").stat().st_mode) == 0o644
    assert stat.S_IMODE((root / "d").stat().st_mode) == 0o755


def test_files_belong_to_the_importer_not_the_tars_owner(store):
    entries = [File("f", b"x")]
    layer = tar_layer(entries)
    with tarfile.open(fileobj=__import__("io").BytesIO(layer)) as tar:
        assert tar.getmember("f").uid == 0
    image = _layers(store, [Entry("owned", tarfile.REGTYPE, b"x", pax={"uid": "4242",
                                                                      "gid": "4242"})])
    root = _rootfs(store, image)
    assert (root / "owned").stat().st_uid == os.geteuid()


def test_whiteouts_remove_lower_entries_and_opaque_keeps_this_layers(store):
    image = _layers(store,
                    [Dir("etc"), File("etc/gone", b"1"), File("etc/kept", b"1"), Dir("opq"),
                     File("opq/lower", b"1")],
                    [File("etc/.wh.gone"), Dir("opq"), File("opq/upper", b"2"),
                     File("opq/.wh..wh..opq")])
    root = _rootfs(store, image)
    assert sorted(p.name for p in (root / "etc").iterdir()) == ["kept"]
    assert sorted(p.name for p in (root / "opq").iterdir()) == ["upper"]


def test_whiteouts_through_a_symlink_stay_in_the_root(store, outside):
    image = _layers(store,
                    [*_inside(outside), File(str(outside).strip("/") + "/victim", b"image's"),
                     Symlink("lnk", str(outside)), Symlink("opq", str(outside))],
                    [File("lnk/.wh.victim")], [File("opq/.wh..wh..opq")])
    root = _rootfs(store, image)
    assert (outside / "victim").read_text() == "host data\n"
    assert not (root / str(outside).strip("/") / "victim").exists()


def test_a_whiteout_carrying_data_is_skipped_past(store):
    """tarfile skips a member's unread data while reading the next header:
    that does not count as header bytes."""
    image = _layers(store, [File("a", b"1"), File("b", b"2")],
                    [File(".wh.a", b"\0" * (512 * 1024)), File("c", b"3")])
    assert sorted(p.name for p in _rootfs(store, image).iterdir()) == ["b", "c"]


def test_a_file_over_the_size_cap_is_refused(store):
    image = _layers(store, [File("big", b"\0" * (17 * MiB))])
    _refused(store, image, "too_large")


def test_a_decompression_bomb_is_refused_before_it_is_written(store):
    """Layers of 2 x 12 MiB of zeros gzip to a few KiB and unpack past the 64 MiB cap
    at the third; nothing reaches the store."""
    image = _layers(store, *[[File(f"z{i}", b"\0" * (12 * MiB)),
                              File(f"y{i}", b"\0" * (12 * MiB))] for i in range(3)])
    assert all(p.stat().st_size < MiB for p in (image.layout / "blobs/sha256").iterdir())
    _refused(store, image, "too_large")


def test_too_many_entries_are_refused(store):
    _refused(store, _layers(store, [File(f"f{i}") for i in range(1001)]), "too_large")


def test_a_huge_pax_header_is_refused(store):
    """tarfile holds a pax header in memory: over 256 KiB between two entries is refused."""
    image = _layers(store, [Entry("f", tarfile.REGTYPE, b"x", pax={"comment": "A" * (MiB)})])
    _refused(store, image, "too_large")


def test_a_truncated_layer_is_refused(store):
    truncated = tar_layer([File("f", b"x" * 100_000)])[:50_000]
    image = write_layout(store.paths.state.parent / "cut", [truncated])
    _refused(store, image, "malformed")


def test_absolute_symlinks_are_kept_as_written(store, tmp_path):
    root = _rootfs(store, busybox_image(tmp_path / "bb2", tag=None))
    assert os.readlink(root / "usr/bin/awk") == "/etc/alternatives/awk"
    assert os.readlink(root / "etc/alternatives/awk") == "/bin/busybox"


def test_a_tampered_layer_is_refused(store):
    image = _layers(store, [File("a", b"good")])
    blob = next(p for p in (image.layout / "blobs/sha256").iterdir()
                if p.read_bytes()[:2] == b"\x1f\x8b")
    blob.write_bytes(gzip.compress(tar_layer([File("a", b"evil")]), mtime=0)[:blob.stat().st_size]
                     .ljust(blob.stat().st_size, b"\0"))
    _refused(store, image, "digest")


def test_a_layer_unlike_its_diff_id_is_refused(store):
    image = _layers(store, [File("a", b"x")], diff_ids=[sha256(b"another layer")])
    _refused(store, image, "digest")


def test_a_zstd_layer_is_refused_with_a_clear_line(store):
    image = _layers(store, [File("a", b"x")], gzip_layers=False,
                    layer_media_type="application/vnd.oci.image.layer.v1.tar+zstd")
    error = _refused(store, image, "unsupported")
    assert "zstd" in str(error)


def test_a_layer_of_another_media_type_is_refused(store):
    image = _layers(store, [File("a", b"x")], layer_media_type="application/x-evil")
    _refused(store, image, "media_type")


def test_a_manifest_over_the_cap_is_refused(store):
    image = _layers(store, [File("a", b"x")],
                    manifest_extra={"annotations": {"pad": "x" * (4 * MiB)}})
    _refused(store, image, "too_large")
