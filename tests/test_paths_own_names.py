"""tappass_host/paths.py owns every on-disk name (issue 11): no other module
spells a file or directory name of the host's state, runtime or keyring
directories. Found by reading every module's string literals (not docstrings):
a literal that looks like a file name (`state.json`, `start.lock`, ...) or that
is joined onto a path with `/` is a name that belongs in paths.py."""

import ast
import re
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "tappass_host"
OWNER = PACKAGE / "paths.py"

FILE_NAME = re.compile(r"(?:^|/)[\w.+-]*\.(?:json|jsonl|lock|sock|pid|log|img|pem|pub|env|toml|tmp)$")

# Whole packages that are separate programs with their own files.
SEPARATE_PROGRAMS = (
    "devplane/",  # the development control plane: its own state directory, not the host's
)

# (module, literal): names that are not the host's on-disk state, each defined once.
ALLOWED = {
    # In-sandbox paths of the OCI contract, defined once where the layer that mounts them does.
    ("landlock.py", "/run/tappass/agent.env"),
    # Files the harness layer renders into the keyring's harness/ directory for the agent's harness.
    ("layers/harness.py", "settings.json"),
    ("layers/harness.py", "permissions.json"),
    ("layers/harness.py", "/permissions.json"),  # in its warning that it rendered one
    # Package data shipped inside tappass_host (tappass_host.shipped), not state on disk.
    ("keyring/verify.py", "schemas/keyring.v1.json"),
    ("shipped.py", "base.json"),
    ("oci/render.py", "base.json"),
    ("oci/schema.py", "config-schema.json"),
    ("shipped.py", ".json"),
    # The agent package's manifest, inside the package the user gives `--agent`.
    ("agent.py", "tappass-agent.toml"),
    # Kernel and system names, not ours.
    ("runtime/attached.py", "memory.oom_control"),
    ("runtime/attached.py", "memory.events"),
    ("workspace.py", "lost+found"),
    ("systemd.py", "tappass-host"),  # the console script beside the running python
    ("oci/rootfs.py", "tmp"),  # the agent's /tmp inside its rootfs
    # Suffixes, not names: a staging file named after its target, temporary files, a check.
    ("keyring/store.py", ".tmp"),
    ("workspace.py", ".tmp"),
    ("runtime/shell.py", ".json"),
    ("runtime/ociruntime.py", ".json"),
    ("oci/invariants.py", ".sock"),
}


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def _joined_literals(node: ast.AST) -> list[str]:
    """The literal parts of the right side of a `/`."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        return [v.value for v in node.values if isinstance(v, ast.Constant) and v.value]
    return []


def names_outside_paths() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = path.relative_to(PACKAGE).as_posix()
        if path == OWNER or module.startswith(SEPARATE_PROGRAMS):
            continue
        tree = ast.parse(path.read_text(), str(path))
        docstrings = _docstrings(tree)
        literals = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                if FILE_NAME.search(node.value):
                    literals.append((node.lineno, node.value))
            elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
                literals += [(node.lineno, text) for text in _joined_literals(node.right)]
        found += [f"{module}:{line}: {text!r}" for line, text in sorted(set(literals))
                  if (module, text) not in ALLOWED]
    return found


def test_only_paths_spells_on_disk_names():
    assert names_outside_paths() == []


def test_the_check_sees_a_name_spelled_elsewhere(tmp_path, monkeypatch):
    module = tmp_path / "tappass_host" / "runtime" / "stray.py"
    module.parent.mkdir(parents=True)
    module.write_text('"""state.json here is prose."""\n'
                      'def f(sandbox):\n'
                      '    lock = sandbox.runtime / "exit.lock"\n'
                      '    return sandbox.root / f"{lock.stem}-marker", "unacked.json"\n')
    (tmp_path / "tappass_host" / "paths.py").write_text('STATE = "state.json"\n')
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "tappass_host")
    monkeypatch.setattr(sys.modules[__name__], "OWNER", tmp_path / "tappass_host" / "paths.py")
    assert names_outside_paths() == [
        "runtime/stray.py:3: 'exit.lock'",
        "runtime/stray.py:4: '-marker'",
        "runtime/stray.py:4: 'unacked.json'",
    ]
