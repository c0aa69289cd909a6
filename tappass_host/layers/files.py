"""Files the appliers render into the keyring version directory (DESIGN §6, §8).

Every applier's `LayerResult.files` reaches the version directory and flips
with it. Each layer writes under a directory of its own, so no layer can
replace another's file (nor keyring.json):

    harness/…           the harness layer (`harness/<runtime>/…`, DESIGN §6)
    layers/<layer>/…    every other layer

Paths and contents come from layers, third-party ones included, so they are
hostile until checked: a path is relative, made of plain names (no `.`, `..`,
empty or hidden segments), not too deep or long; a file is bytes, within a
size limit; a layer's files are few and not too large in total. Files are
only ever created fresh in a staging directory (never through a symlink).
A file set that breaks a rule is refused whole, naming the layer.

When files are rendered: at start, with the start's own inputs (and the
version directory is completed if they differ from what it holds); on a flip
by the daemon or `sync apply`, with the inputs of the sandbox's last start,
recorded in its bundle directory (`layer-inputs.json`). A sandbox never
started has no agent to render for: its flips carry the harness files only
(they depend on the keyring alone), and its first start completes the set.
"""

import json
import re
from dataclasses import asdict, replace
from pathlib import Path

from tappass_host.errors import TappassError
from tappass_host.layers import Host, LayerInputs, LayerResult
from tappass_host.paths import KEYRING_HARNESS_DIR as HARNESS_DIR
from tappass_host.paths import KEYRING_LAYERS_DIR as LAYERS_DIR

HARNESS_LAYER = "harness"

MAX_FILE_BYTES = 1024 * 1024
MAX_LAYER_BYTES = 4 * 1024 * 1024
MAX_LAYER_FILES = 64
MAX_DEPTH = 8
MAX_PATH_CHARS = 512
_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=@,-]{0,127}")
_LAYER_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")



class LayerFilesRejected(TappassError):
    """A layer's files cannot go into the keyring version directory."""

    def __init__(self, layer: str, problem: str):
        self.layer = layer
        self.problem = problem
        super().__init__(f"layer {layer!r} files refused: {problem}")


def directory_of(layer: str) -> str:
    """The version-directory subdirectory that holds `layer`'s files."""
    if layer == HARNESS_LAYER:
        return HARNESS_DIR
    if not isinstance(layer, str) or not _LAYER_NAME.fullmatch(layer):
        raise LayerFilesRejected(str(layer)[:64], "its name cannot be a directory name "
                                 "(1-63 of a-z 0-9 _ . -, starting with a letter or digit)")
    return f"{LAYERS_DIR}/{layer}"


def _check_path(layer: str, path: object) -> str:
    if not isinstance(path, str):
        raise LayerFilesRejected(layer, "a file path is not a string")
    shown = repr(path[:80])
    if len(path) > MAX_PATH_CHARS:
        raise LayerFilesRejected(layer, f"file path {shown} is longer than {MAX_PATH_CHARS} characters")
    segments = path.split("/")
    if path.startswith("/"):
        raise LayerFilesRejected(layer, f"file path {shown} is absolute")
    if ".." in segments:
        raise LayerFilesRejected(layer, f"file path {shown} has a '..' segment")
    if len(segments) > MAX_DEPTH:
        raise LayerFilesRejected(layer, f"file path {shown} is deeper than {MAX_DEPTH}")
    if not all(_SEGMENT.fullmatch(s) for s in segments):
        raise LayerFilesRejected(layer, f"file path {shown} is not made of plain names "
                                 "(letters, digits, _ . + = @ , -; none empty, '.' or hidden)")
    return path


def layer_files(layer: str, files: object) -> dict[str, bytes]:
    """`layer`'s files, checked, keyed by their path in the version directory."""
    if not isinstance(files, dict):
        raise LayerFilesRejected(layer, "files must be a mapping of relative paths to bytes")
    if len(files) > MAX_LAYER_FILES:
        raise LayerFilesRejected(layer, f"more than {MAX_LAYER_FILES} files")
    if not files:
        return {}
    base = directory_of(layer)
    out: dict[str, bytes] = {}
    total = 0
    for path, data in files.items():
        path = _check_path(layer, path)
        if not isinstance(data, bytes):
            raise LayerFilesRejected(layer, f"file {path!r} is not bytes")
        if len(data) > MAX_FILE_BYTES:
            raise LayerFilesRejected(layer, f"file {path!r} is larger than {MAX_FILE_BYTES} bytes")
        total += len(data)
        out[f"{base}/{path}"] = data
    if total > MAX_LAYER_BYTES:
        raise LayerFilesRejected(layer, f"its files hold more than {MAX_LAYER_BYTES} bytes")
    for path in out:  # `a` and `a/b`: a file where a directory must be
        parent = path.rsplit("/", 1)[0]
        while parent != base:
            if parent in out:
                raise LayerFilesRejected(layer, f"file {parent[len(base) + 1:]!r} is also a directory")
            parent = parent.rsplit("/", 1)[0]
    return out


def version_files(results: list[tuple[str, LayerResult]]) -> dict[str, bytes]:
    """Every layer's files, keyed by their path in the version directory."""
    out: dict[str, bytes] = {}
    for layer, result in results:
        files = layer_files(layer, result.files)
        if set(files) & set(out):  # the same layer named twice in config `appliers`
            raise LayerFilesRejected(layer, "writes a file another run of it wrote")
        out.update(files)
    return out


def harness_only(keyring: dict) -> dict[str, bytes]:
    """The files of a sandbox with no recorded start: the harness layer's,
    which depend on the keyring alone."""
    from tappass_host.layers import harness

    return layer_files(HARNESS_LAYER, harness.render(keyring)[0])


# --- the inputs of a sandbox's last start, for flips --------------------------------


def record_inputs(inputs: LayerInputs, appliers: list[str]) -> bytes:
    """What a flip needs to render files as this start did (the keyring aside)."""
    return json.dumps({
        "appliers": list(appliers),
        "agent": str(inputs.manifest.directory),
        "host": asdict(inputs.host),
        "config": inputs.config.values,
        "config_source": str(inputs.config.source) if inputs.config.source else None,
    }, indent=2, sort_keys=True).encode()


def files_for_flip(paths, name: str, keyring: dict) -> dict[str, bytes]:
    """The files of every applier for `keyring`, with the inputs of the
    sandbox's last start; the harness files alone if it has none (or its agent
    package is gone: nothing can start it until it is back, and a start renders
    again). Raises LayerFilesRejected."""
    from tappass_host import agent
    from tappass_host import sandbox_record
    from tappass_host.config import Config
    from tappass_host.layers import run

    sandbox = paths.sandbox(name)
    try:
        recorded = json.loads(sandbox.layer_inputs.read_bytes())
        host = recorded["host"]
        host = Host(**{**host, "uid_mappings": tuple(host["uid_mappings"]),
                       "gid_mappings": tuple(host["gid_mappings"])})
        source = recorded["config_source"]
        config = Config(values=recorded["config"], source=Path(source) if source else None)
        appliers = list(recorded["appliers"])
        manifest = agent.load(recorded["agent"])
    except (OSError, ValueError, KeyError, TypeError, TappassError):
        return harness_only(keyring)
    inputs = LayerInputs(
        name=name, record=sandbox_record.load(paths, name), keyring=keyring, manifest=manifest,
        host=host, keyring_dir=sandbox.keyring, workspace_dir=sandbox.workspace,
        rootfs_dir=sandbox.rootfs, config=config)
    return version_files(run(inputs, appliers))


def files_for_start(inputs: LayerInputs, appliers: list[str], rendered: dict[str, bytes],
                    keyring: dict) -> dict[str, bytes]:
    """The files for the keyring in place at start: the rendered ones if it is
    the keyring the start rendered, else (a flip landed since) rendered anew."""
    from tappass_host.layers import run

    if keyring == inputs.keyring:
        return rendered
    return version_files(run(replace(inputs, keyring=keyring), appliers))


def complete_at_start(paths, inputs: LayerInputs, appliers: list[str],
                      rendered: dict[str, bytes]) -> None:
    """Make the sandbox's current keyring version hold the files this start
    rendered (the version directory is rewritten only if they differ)."""
    from tappass_host.keyring.store import store_for

    store = store_for(paths, inputs.record)
    with store.transaction():
        keyring = store.read_current()
        if keyring is not None:
            store.complete(files_for_start(inputs, appliers, rendered, keyring))
