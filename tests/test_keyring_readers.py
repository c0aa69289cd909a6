"""One reader and one writer of a sandbox's keyring directory (issue 11 item 5):
only tappass_host/keyring/store.py opens what is in it. Every other module
asks the store (`read_current`, `current_version`, `is_current`, `follow`),
so a reader can never see the directory other than the store's invariants
say (one whole version, through `..data`).

Found with ast: outside store.py and paths.py (which names the files), no
module uses SandboxPaths' keyring file properties, imports the names of the
keyring directory's files from paths, or joins a name onto a keyring
directory (`sandbox.keyring / ...`)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "tappass_host"
READER = "keyring/store.py"
NAMER = "paths.py"

FILE_PROPERTIES = {"keyring_payload", "keyring_envelope"}
FILE_NAMES = {"KEYRING_PAYLOAD", "KEYRING_ENVELOPE", "KEYRING_DATA", "KEYRING_DATA_TMP",
              "KEYRING_STAGING_PREFIX", "KEYRING_HARNESS_DIR", "KEYRING_LAYERS_DIR"}

# (module, name): uses of a name that do not open the host's keyring directory.
ALLOWED = {
    # The payload's path inside the sandbox, for the agent's TAPPASS_KEYRING_PATH.
    ("layers/keyring.py", "KEYRING_PAYLOAD"),
    # The subdirectories a layer's files go to, as relative paths the store writes.
    ("layers/files.py", "KEYRING_HARNESS_DIR"),
    ("layers/files.py", "KEYRING_LAYERS_DIR"),
}


def _readings(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and node.attr in FILE_PROPERTIES:
            found.append((node.lineno, node.attr))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").endswith("paths"):
            found += [(node.lineno, a.name) for a in node.names if a.name in FILE_NAMES]
        elif (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)
              and isinstance(node.left, ast.Attribute) and node.left.attr == "keyring"):
            found.append((node.lineno, "keyring / ..."))
    return found


def test_only_the_store_reads_the_keyring_directory():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = path.relative_to(PACKAGE).as_posix()
        if module in (READER, NAMER) or module.startswith("devplane/"):
            continue
        offenders += [f"{module}:{line}: {what}" for line, what in _readings(path)
                      if (module, what) not in ALLOWED]
    assert not offenders, "read the keyring directory through KeyringStore:\n" + "\n".join(offenders)


def test_the_check_sees_each_way_of_reading(tmp_path):
    module = tmp_path / "m.py"
    module.write_text(
        "from tappass_host.paths import KEYRING_ENVELOPE\n"
        "a = paths.sandbox(name).keyring_payload.read_bytes()\n"
        "b = open(sandbox.keyring / KEYRING_ENVELOPE)\n")
    assert sorted(what for _, what in _readings(module)) == [
        "KEYRING_ENVELOPE", "keyring / ...", "keyring_payload"]


def test_every_allowed_use_is_still_there():
    for module, name in ALLOWED:
        assert name in {what for _, what in _readings(PACKAGE / module)}, (module, name)
