"""Lazy imports of our own modules stay only where they save start-up time
(issue 11). With no import circles left (tests/test_architecture.py), an
import inside a function is never needed to break one; it is kept only in
the modules below, where it keeps what one branch needs off a hot command's
path. Everywhere else our own modules are imported at the top, where a
reader sees a module's dependencies at once. Lazy imports of heavy
third-party modules (httpx, cryptography, jsonschema, pyroute2) are allowed
anywhere: the standards ask for them only in the commands that need them."""

import ast

from test_architecture import PACKAGE, _modules

# The hot commands (`start`, `status`, `stop`, `logs`: tests/test_import_budget.py
# holds their budget) load these modules; a lazy import there keeps a branch's
# needs (an image, egress, a pull, the schema check, conmon) off the others.
# The CLI's modules are loaded one command group at a time; a lazy import there
# keeps one command's needs off its siblings and off `--help`.
LAZY_ALLOWED = (
    "cli", "runtime", "oci", "layers", "network.control", "network",
    "keyring.store", "sync.start_keyring", "signing", "userns",
    "audit",  # clock (datetime) only where an event is written: not for `stop` (issue 13)
)


def _allowed(module: str) -> bool:
    name = module.removeprefix(PACKAGE + ".")
    return any(name == entry or name.startswith(entry + ".") for entry in LAZY_ALLOWED)


def _lazy_imports_of_ours(path) -> list[int]:
    lines = []
    for function in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] == PACKAGE):
                lines.append(node.lineno)
            elif isinstance(node, ast.Import) and any(a.name.split(".")[0] == PACKAGE for a in node.names):
                lines.append(node.lineno)
    return lines


def test_own_modules_are_imported_lazily_only_where_it_saves_start_up():
    found = [f"{path}:{line}" for module, path in sorted(_modules().items())
             if not _allowed(module) for line in _lazy_imports_of_ours(path)]
    assert not found, ("imports of our own modules inside functions, outside the modules that "
                       "save start-up time with them (LAZY_ALLOWED): move them to the top:\n"
                       + "\n".join(found))


def test_every_allowed_entry_still_names_a_module():
    modules = {m.removeprefix(PACKAGE + ".") for m in _modules()}
    assert all(entry in modules for entry in LAZY_ALLOWED)
