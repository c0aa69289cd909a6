"""The error hierarchy at the top of tappass_host/errors.py lists every
TappassError subclass, under its parent and with the module that defines it."""

import ast
import re
from pathlib import Path

import tappass_host.errors

PACKAGE = Path(tappass_host.errors.__file__).parent


def defined_errors() -> set[tuple[str, str, str]]:
    """(class, parent, module) for every class that derives from TappassError."""
    classes = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                classes |= {(node.name, ast.unparse(base).rsplit(".", 1)[-1],
                             path.relative_to(PACKAGE).as_posix()) for base in node.bases}
    errors = {"TappassError"}
    while True:
        found = {c for c in classes if c[1] in errors}
        if {name for name, _, _ in found} <= errors:
            return found
        errors |= {name for name, _, _ in found}


def documented_errors() -> set[tuple[str, str, str]]:
    found, parents = set(), {}
    for line in tappass_host.errors.__doc__.splitlines():
        m = re.fullmatch(r"( +)(\w+) +(\S+\.py)\b.*", line)
        if not m:
            continue
        depth = len(m[1])
        parents[depth] = m[2]
        if depth - 4 in parents:
            found.add((m[2], parents[depth - 4], m[3]))
    return found


def test_the_tree_lists_every_error_under_its_parent():
    assert documented_errors() == defined_errors()
