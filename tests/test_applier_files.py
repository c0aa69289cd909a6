"""Files of appliers, third-party ones included, reach the keyring version
directory and flip with it (issue 10, item 5): at start and on a flip by
`sync apply` or the daemon, under `layers/<layer>/…` (the harness layer's
under `harness/…`). A layer's paths and contents are hostile: a bad file set
is refused whole, naming the layer, at start (nothing starts) and on a flip
(`invalid`, audited with the layer; the current keyring stays).

The applier `notes` is installed as a third party does it: a distribution
with an entry point in `tappass_host.appliers`, named in config `appliers`.
TAPPASS_TEST_FILES picks what it returns.
"""

import json
import os
import stat
import subprocess

import pytest

import patience
from applier_fixture import NOTE, NOTES_APPLIER, install_applier
from audit_records import read_audit
from sandbox_fixture import (  # noqa: F401  (fixtures: runtime, host)
    host,
    one_line_error,
    runtime,
    unique_name,
    wait_for,
    write_agent,
)
from tappass_host.config import DEFAULTS
from tappass_host.layers import LayerResult
from tappass_host.layers.files import MAX_FILE_BYTES, LayerFilesRejected, version_files

HOSTILE = ("absolute", "dotdot", "dotdot_inside", "data_link", "hidden", "empty_segment",
           "trailing_slash", "control", "oversize", "too_many", "too_deep", "not_bytes",
           "file_and_dir")


@pytest.fixture
def notes(host):
    """Install the `notes` applier and configure it last; returns env(mode)."""
    base = install_applier(host.root / "site", "notes", NOTES_APPLIER)
    host.configure(f"appliers = {json.dumps([*DEFAULTS['appliers'], 'notes'])}\n")
    return lambda mode="note": {**base, "TAPPASS_TEST_FILES": mode}


def sync_apply(host, name, env, tmp_path) -> subprocess.CompletedProcess:
    envelope = tmp_path / f"keyring-{host.versions.get(name, 0) + 1}.dsse.json"
    envelope.write_bytes(host.envelope(name))
    return host.run("sync", "apply", name, str(envelope), env=env)


def version_tree(keyring) -> dict[str, bytes]:
    current = keyring / os.readlink(keyring / "..data")
    return {str(p.relative_to(current)): p.read_bytes()
            for p in sorted(current.rglob("*")) if p.is_file()}


# --- through real sandboxes ---------------------------------------------------------------


def test_a_third_party_layers_file_reaches_the_agent_and_flips_with_the_keyring(
        runtime, host, notes, tmp_path):
    """Keyring v1 is applied before any start (no inputs recorded: harness files
    only); the start completes the version; `sync apply` of v2 renders the file
    anew with the start's inputs, and the running agent reads the new one."""
    name = host.enroll(unique_name("notes", runtime))
    keyring = host.paths.sandbox(name).keyring
    assert "layers/notes/note.txt" not in version_tree(keyring)
    agent = write_agent(tmp_path / "agent", [
        "/bin/sh", "-c", f"while :; do cat {NOTE} || echo unreadable; sleep 0.1; done"])
    result = subprocess.run(host.argv("start", name, "--agent", str(agent), "--runtime", runtime),
                            capture_output=True, text=True, timeout=patience.seconds(30), env=notes())
    host.started.append(name)
    assert result.returncode == 0, result.stderr
    host.wait_log(name, "note v1")

    applied = sync_apply(host, name, notes(), tmp_path)
    assert applied.returncode == 0, applied.stderr
    host.wait_log(name, "note v2")
    assert "unreadable" not in host.logs(name)

    tree = version_tree(keyring)
    assert tree["keyring.json"] and json.loads(tree["keyring.json"])["policy_version"] == 2
    assert tree["layers/notes/note.txt"] == b"note v2\n"
    # the layer cannot reach the harness layer's directory, even by its path
    assert "layers/notes/claude-code/settings.json" in tree
    assert not any(path.startswith("harness/") for path in tree)
    current = keyring / os.readlink(keyring / "..data")
    note = current / "layers" / "notes" / "note.txt"
    assert stat.S_IMODE(note.stat().st_mode) == 0o440
    assert stat.S_IMODE(note.parent.stat().st_mode) == 0o550
    assert os.readlink(keyring / "layers") == "..data/layers"


@pytest.mark.parametrize("mode", HOSTILE)
def test_a_hostile_file_set_at_start_is_refused_naming_the_layer(host, notes, mode):
    name = host.enroll(unique_name("hostile"))
    keyring = host.paths.sandbox(name).keyring
    before = version_tree(keyring)
    result = subprocess.run(host.argv("start", name, "--agent", str(write_agent(
        host.root / "agent", ["/bin/true"])), "--runtime", "crun"),
        capture_output=True, text=True, timeout=patience.seconds(30), env=notes(mode))
    host.started.append(name)
    error = one_line_error(result)
    assert "layer 'notes' files refused" in error, error
    assert not host.paths.sandbox(name).runtime.exists()
    assert host.containers("crun") == []
    assert "sandbox.started" not in [e["event"] for e in read_audit(host.paths.audit_log, name)]
    assert version_tree(keyring) == before
    assert not os.path.exists("/etc/cron.d/evil")


def test_a_hostile_file_set_on_a_flip_is_rejected_and_the_keyring_stays(
        host, notes, tmp_path):
    name = host.enroll(unique_name("flip"))
    agent = write_agent(tmp_path / "agent", ["/bin/true"])
    result = subprocess.run(host.argv("start", name, "--agent", str(agent), "--runtime", "crun",
                                      "--foreground"),
                            capture_output=True, text=True, timeout=patience.seconds(30), env=notes())
    host.started.append(name)
    assert result.returncode == 0, result.stderr
    keyring = host.paths.sandbox(name).keyring
    before = version_tree(keyring)
    assert before["layers/notes/note.txt"] == b"note v1\n"
    for mode in HOSTILE:
        rejected = sync_apply(host, name, notes(mode), tmp_path)
        error = one_line_error(rejected)
        assert "keyring rejected (invalid)" in error and "layer 'notes'" in error, (mode, error)
        assert version_tree(keyring) == before, mode
        host.versions[name] -= 1  # nothing was applied: the next envelope is the same version
    rejections = read_audit(host.paths.audit_log, name, "keyring.rejected")
    assert [(r["details"]["reason"], r["details"]["layer"]) for r in rejections] == \
        [("invalid", "notes")] * len(HOSTILE)
    applied = sync_apply(host, name, notes(), tmp_path)
    assert applied.returncode == 0, applied.stderr
    assert version_tree(keyring)["layers/notes/note.txt"] == b"note v2\n"


def test_without_a_recorded_start_a_flip_carries_the_harness_files(host, notes, tmp_path):
    """No start yet: no agent to render for; the harness files (the keyring's
    alone) flip, the other layers' come with the first start."""
    name = host.enroll(unique_name("nostart"))
    host.versions[name] = 1
    envelope = tmp_path / "k.json"
    envelope.write_bytes(host.envelope(name, harness={"runtime": "claude-code",
                                                      "permissions": {"deny": ["Bash"]}}))
    assert host.run("sync", "apply", name, str(envelope), env=notes()).returncode == 0
    tree = version_tree(host.paths.sandbox(name).keyring)
    assert "harness/claude-code/settings.json" in tree
    assert not any(path.startswith("layers/") for path in tree)


# --- the rules, directly ---------------------------------------------------------------


def test_each_layer_writes_under_its_own_directory():
    files = version_files([
        ("harness", LayerResult(files={"claude-code/settings.json": b"{}"})),
        ("claude-code", LayerResult(files={"settings.json": b"[]"})),
        ("identity", LayerResult()),
    ])
    assert files == {"harness/claude-code/settings.json": b"{}",
                     "layers/claude-code/settings.json": b"[]"}


@pytest.mark.parametrize("layer", ["..", "a/b", "", "Upper", ".hidden", "x" * 64])
def test_a_layer_whose_name_is_no_directory_name_cannot_write_files(layer):
    with pytest.raises(LayerFilesRejected) as refused:
        version_files([(layer, LayerResult(files={"f": b"x"}))])
    assert "cannot be a directory name" in str(refused.value)


def test_the_limits_are_exact():
    version_files([("big", LayerResult(files={"f": b"x" * MAX_FILE_BYTES}))])
    version_files([("many", LayerResult(files={f"f{i}": b"" for i in range(64)}))])
    version_files([("deep", LayerResult(files={"/".join("d" * 8): b""}))])
    with pytest.raises(LayerFilesRejected, match="more than 4194304 bytes"):
        version_files([("sum", LayerResult(files={f"f{i}": b"x" * MAX_FILE_BYTES
                                                   for i in range(5)}))])


def test_a_refusal_names_the_layer_and_shows_no_control_characters():
    with pytest.raises(LayerFilesRejected) as refused:
        version_files([("notes", LayerResult(files={"a\x1b[2Jb": b"x"}))])
    message = str(refused.value)
    assert message.startswith("layer 'notes' files refused: ") and "\x1b" not in message
    assert refused.value.layer == "notes"
