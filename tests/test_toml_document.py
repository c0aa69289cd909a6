"""The TOML documents `start` reads, parsed once (tappass_host.toml_document,
issue 13), and the agent manifest read as the hostile input it is: a parse is
kept under the digest of the document's bytes in a cache of root's alone, and
nothing kept is ever taken for another document, nor read from a cache others
could write."""

import os
import stat
import subprocess
import sys
import threading

import pytest

from tappass_host import agent, config, toml_document
from tappass_host.errors import ConfigError
from tappass_host.paths import HostPaths

MANIFEST = b'name = "a"\nversion = "1"\nentrypoint = ["/bin/true"]\n[env]\nX = "1"\n'


@pytest.fixture
def paths(tmp_path) -> HostPaths:
    paths = HostPaths.resolve(tmp_path / "state")
    paths.state.mkdir(mode=0o700)
    return paths


def entries(paths):
    cache = paths.toml_cache
    return sorted(cache.iterdir()) if cache.exists() else []


def parse_in_a_fresh_interpreter(data: bytes, paths) -> tuple[dict, bool]:
    """(the parse, whether tomllib was imported for it)."""
    code = ("import json, sys; from tappass_host import toml_document\n"
            "from tappass_host.paths import HostPaths\n"
            "doc = toml_document.parse(sys.stdin.buffer.read(), HostPaths.resolve(sys.argv[1]))\n"
            "print(json.dumps([doc, 'tomllib' in sys.modules]))")
    result = subprocess.run([sys.executable, "-c", code, str(paths.state)], input=data,
                            capture_output=True, check=True)
    import json

    doc, imported = json.loads(result.stdout)
    return doc, imported


def test_a_document_is_parsed_once_then_read_from_its_entry(paths, tmp_path):
    first, imported = parse_in_a_fresh_interpreter(MANIFEST, paths)
    assert imported and first["env"] == {"X": "1"}
    (entry,) = entries(paths)
    assert stat.S_IMODE(paths.toml_cache.stat().st_mode) == 0o700
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600
    again, imported = parse_in_a_fresh_interpreter(MANIFEST, paths)
    assert again == first and not imported


def test_one_byte_changed_is_another_document(paths, tmp_path):
    toml_document.parse(MANIFEST, paths)
    changed = MANIFEST.replace(b'X = "1"', b'X = "2"')
    assert toml_document.parse(changed, paths)["env"] == {"X": "2"}
    assert len(entries(paths)) == 2
    assert toml_document.parse(MANIFEST, paths)["env"] == {"X": "1"}


def test_types_are_kept_exactly_and_dates_are_never_kept(paths, tmp_path):
    doc = b'i = 1\nf = 1.0\nneg = -0.0\nbig = 9223372036854775807\nb = true\na = [1, "x"]\n'
    for _ in range(2):
        parsed = toml_document.parse(doc, paths)
        assert parsed == {"i": 1, "f": 1.0, "neg": -0.0, "big": 2 ** 63 - 1, "b": True,
                          "a": [1, "x"]}
        assert type(parsed["i"]) is int and type(parsed["f"]) is float
    assert len(entries(paths)) == 1
    dated = b"when = 1979-05-27T07:32:00Z\nnan = nan\n"
    for _ in range(2):
        parsed = toml_document.parse(dated, paths)
        assert parsed["when"].year == 1979 and parsed["nan"] != parsed["nan"]
    assert len(entries(paths)) == 1  # not kept: JSON does not hold it exactly


@pytest.mark.parametrize("tampering", ["body", "header", "empty", "symlink"])
def test_a_damaged_or_swapped_entry_is_a_miss(paths, tmp_path, tampering):
    toml_document.parse(MANIFEST, paths)
    (entry,) = entries(paths)
    data = entry.read_bytes()
    if tampering == "body":  # the digest no longer matches
        entry.write_bytes(data.replace(b'"1"', b'"9"'))
    elif tampering == "header":
        entry.write_bytes(b"sha256:" + b"0" * 64 + data[data.index(b"\n"):])
    elif tampering == "empty":  # a crash between the rename and the data's writeback
        entry.write_bytes(b"")
    else:
        forged = tmp_path / "forged"
        forged.write_bytes(data.replace(b'"1"', b'"9"'))
        entry.unlink()
        entry.symlink_to(forged)
    assert toml_document.parse(MANIFEST, paths)["env"] == {"X": "1"}


@pytest.mark.parametrize("where", ["entry", "directory"])
def test_an_entry_others_could_have_written_is_not_read(paths, tmp_path, where):
    """A forged entry, its digest right, is used only from a cache no one else can write."""
    toml_document.parse(MANIFEST, paths)
    (entry,) = entries(paths)
    header, _, body = entry.read_bytes().partition(b"\n")
    import hashlib

    forged = body.replace(b'"1"', b'"9"')
    entry.write_bytes(b"sha256:" + hashlib.sha256(forged).hexdigest().encode() + b"\n" + forged)
    assert toml_document.parse(MANIFEST, paths)["env"] == {"X": "9"}  # ours: it is trusted
    (entry if where == "entry" else paths.toml_cache).chmod(0o666 if where == "entry" else 0o777)
    assert toml_document.parse(MANIFEST, paths)["env"] == {"X": "1"}


def test_bad_documents_raise_as_tomllib_does_and_are_not_kept(paths, tmp_path):
    with pytest.raises(ValueError, match="Invalid value"):
        toml_document.parse(b"name = \n", paths)
    with pytest.raises(UnicodeDecodeError):
        toml_document.parse(b'name = "\xff"\n', paths)
    assert entries(paths) == []


def test_no_state_directory_is_made_for_a_cache(tmp_path):
    paths = HostPaths.resolve(tmp_path / "no-state")
    assert toml_document.parse(MANIFEST, paths)["name"] == "a"
    assert not (tmp_path / "no-state").exists()


def test_the_config_file_is_read_through_the_cache_with_its_errors_in_one_line(paths, tmp_path):
    path = tmp_path / "config.toml"
    path.write_bytes(b"max_sandboxes = 7\n")
    assert config.load(path, paths=paths)["max_sandboxes"] == 7
    assert config.load(path, paths=paths)["max_sandboxes"] == 7
    assert len(entries(paths)) == 1
    path.write_bytes(b"max_sandboxes = \n")
    with pytest.raises(ConfigError, match=r"is not valid TOML"):
        config.load(path, paths=paths)
    path.write_bytes(b'runtime = "\xfe"\n')
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(byte 11 is not UTF-8\)"):
        config.load(path, paths=paths)


# --- the agent's manifest is hostile input ---------------------------------


def package(tmp_path, manifest: bytes | None = MANIFEST):
    directory = tmp_path / "pkg"
    directory.mkdir()
    if manifest is not None:
        (directory / agent.MANIFEST).write_bytes(manifest)
    return directory


def test_a_manifest_is_loaded_and_its_parse_kept(paths, tmp_path):
    directory = package(tmp_path)
    for _ in range(2):
        manifest = agent.load(str(directory), paths)
        assert manifest.entrypoint == ("/bin/true",) and dict(manifest.env) == {"X": "1"}
    assert len(entries(paths)) == 1


def test_a_fifo_manifest_is_refused_not_waited_on(tmp_path):
    directory = package(tmp_path, None)
    os.mkfifo(directory / agent.MANIFEST)
    result = {}
    worker = threading.Thread(target=lambda: result.update(
        error=pytest.raises(agent.BadAgent, agent.load, str(directory))), daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "start hung on a FIFO in the package"
    assert "is not a regular file" in str(result["error"].value)


def test_an_oversized_manifest_is_refused(tmp_path):
    directory = package(tmp_path, MANIFEST + b"#" * agent.MAX_MANIFEST_BYTES)
    with pytest.raises(agent.BadAgent, match=r"is larger than 256 KiB"):
        agent.load(str(directory))


def test_a_manifest_that_is_not_utf8_is_one_line(tmp_path):
    directory = package(tmp_path, MANIFEST.replace(b'"a"', b'"\xe9"'))
    with pytest.raises(agent.BadAgent, match=r"is not UTF-8 text \(byte 8 is not UTF-8\)"):
        agent.load(str(directory))


def test_a_missing_manifest_is_one_line(tmp_path):
    directory = package(tmp_path, None)
    with pytest.raises(agent.BadAgent, match=r"has no tappass-agent.toml"):
        agent.load(str(directory))
