"""The import layers of tappass_host (issue 11): no circle among modules, no
import from a lower layer to a higher one. Every import counts, at module
level or inside a function (a lazy import is still a dependency), with
`from . import x` resolved; an import of a package counts as one of its
__init__. Not seen: importlib.import_module of a computed name (the CLI's
table of subcommands, the layers' appliers), each inside its own package.

LAYERS lists the layers from the bottom. A module belongs to the most
specific entry naming it (a module, else its package, else the package's
package); a module no entry covers fails the test, so a new one gets a
layer when it is written."""

import ast
from pathlib import Path

import tappass_host

PACKAGE = "tappass_host"

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # Values and files: on-disk names, state files, time, the error types,
    # configuration, JSON and the records of a sandbox; import nothing above.
    ("values and files", (
        "tappass_host", "paths", "statefile", "clock", "errors", "config", "strictjson",
        "unixaddress", "domains", "responses", "shipped", "signing", "sandbox_record", "ids",
        "libc", "loopdev", "workspace", "agent", "audit", "systemd", "processes", "userns",
        "sandbox_launcher", "libcrypto", "private_cache", "toml_document")),
    # The keyring (envelope, verification, the store), and the TLS contexts
    # pinned to the control plane's CA.
    ("keyring and the pinned TLS", ("keyring", "identity.tls")),
    # The one client of the control plane (DESIGN §5, §7): connections, the
    # mapping of their failures, the SSE reader, every endpoint.
    ("control-plane client", ("controlplane",)),
    # The host's identity: bootstrap, enrollment, certificates and renewal,
    # which call the control plane through its client.
    ("identity", ("identity",)),
    # The local image store: sources, verification, safe unpacking of layers.
    ("images", ("image",)),
    # What a keyring turns into: the policy layers (appliers), the Landlock
    # launcher, and the egress namespace and proxy's client (network.control)
    # that `start` asks for a sandbox's namespace before crun creates it.
    ("policy layers and egress", ("layers", "landlock", "network")),
    # The OCI bundle: render, invariants, rootfs, schema.
    ("oci bundle", ("oci",)),
    # The OCI runtime, conmon and the run state; start, stop, shell.
    ("runtime", ("runtime",)),
    # Receiving an update: apply then ack, the one-time pull, hot reload.
    ("sync", ("sync",)),
    # Long-running host processes: the host daemon (main loop, per-sandbox
    # worker, supervision, renewal, sd_notify), and the egress service, a
    # daemon of its own (python -m tappass_host.network).
    ("daemon", ("daemon", "network.service", "network.__main__")),
    ("cli", ("cli", "__main__")),
    # The development control plane: may import the host's modules, nothing imports it.
    ("devplane", ("devplane",)),
]

# Accepted violations; none today, and the list only shrinks: a violation
# that is gone must leave it too.
# ("up", importer, imported) | ("cycle", *sorted members of one import cycle)
KNOWN_VIOLATIONS: set[tuple[str, ...]] = set()


def _modules() -> dict[str, Path]:
    root = Path(tappass_host.__file__).parent
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> str:
    while name not in modules:
        name = name.rpartition(".")[0]
    return name


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {_resolve(a.name, modules) for a in node.names
                      if a.name.split(".")[0] == PACKAGE}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            if source.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                found.add(submodule if submodule in modules else _resolve(source, modules))
    found.discard(module)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def _short(module: str) -> str:
    return module.removeprefix(PACKAGE + ".")


def layer_of(module: str) -> int:
    short = _short(module)
    candidate = short
    while True:
        for index, (_, members) in enumerate(LAYERS):
            if candidate in members:
                return index
        if "." not in candidate:
            raise AssertionError(f"{module} is in no layer: give it one in LAYERS")
        candidate = candidate.rpartition(".")[0]


def cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """Tarjan's strongly connected components of more than one module."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(tuple(sorted(_short(m) for m in component)))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def violations(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    upward = {("up", _short(source), _short(target))
              for source, targets in graph.items() for target in targets
              if layer_of(target) > layer_of(source)}
    return upward | {("cycle", *members) for members in cycles(graph)}


def _describe(violation: tuple[str, ...]) -> str:
    kind, *modules = violation
    if kind == "up":
        return f"{modules[0]} imports {modules[1]} from a higher layer"
    return "an import circle among " + ", ".join(modules)


def test_every_module_has_a_layer():
    for module in _modules():
        layer_of(module)


def test_no_import_circle_or_upward_import_beyond_the_known_ones():
    found = violations(import_graph())
    new = sorted(found - KNOWN_VIOLATIONS)
    gone = sorted(KNOWN_VIOLATIONS - found)
    assert not new, "imports against the layers in tests/test_architecture.py: " + \
        "; ".join(map(_describe, new))
    assert not gone, "no longer violated, remove from KNOWN_VIOLATIONS: " + \
        "; ".join(map(_describe, gone))


def test_the_check_sees_lazy_relative_and_upward_imports(tmp_path):
    """The walker itself: a function-level relative import from a low
    module to a high one is an upward edge, and a circle is found."""
    modules = {"tappass_host.paths": tmp_path / "paths.py",
               "tappass_host.cli": tmp_path / "cli" / "__init__.py",
               "tappass_host.cli.sandbox": tmp_path / "cli" / "sandbox.py"}
    modules["tappass_host.cli"].parent.mkdir()
    modules["tappass_host.paths"].write_text("def f():\n    from .cli import sandbox\n")
    modules["tappass_host.cli"].write_text("")
    modules["tappass_host.cli.sandbox"].write_text("from .. import paths\n")
    graph = {m: imports_of(m, p, modules) for m, p in modules.items()}
    assert graph["tappass_host.paths"] == {"tappass_host.cli.sandbox"}
    assert graph["tappass_host.cli.sandbox"] == {"tappass_host.paths"}
    assert violations(graph) == {("up", "paths", "cli.sandbox"),
                                 ("cycle", "cli.sandbox", "paths")}


# Who may import httpx: the control-plane client (issue 11 item 4), the
# bounded reader it reads every answer through (it raises httpx's own
# timeout and decoding errors, which the client translates), and the
# development control plane, which is not the host.
HTTPX_IMPORTERS = ("controlplane", "responses", "devplane")


def test_only_the_control_plane_client_speaks_http():
    speakers = set()
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            if any(name.split(".")[0] == "httpx" for name in names):
                speakers.add(_short(module))
    assert speakers, "the walk found no httpx import at all"
    outside = sorted(m for m in speakers if m.split(".")[0] not in HTTPX_IMPORTERS)
    assert not outside, f"httpx imported by {', '.join(outside)}: go through " \
        "tappass_host.controlplane's client"
