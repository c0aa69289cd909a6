"""A third-party applier, plugged in the way a third party does it: a
distribution (module plus dist-info) declaring an entry point in the group
`tappass_host.appliers`, on the PYTHONPATH of the tappass-host process, and
named in config `appliers`.

NOTES_APPLIER (installed as `notes`) renders files: `note.txt` naming the
keyring's policy_version, or, as TAPPASS_TEST_FILES says, a hostile file set.
"""

import os
import textwrap
from pathlib import Path


def install_applier(site: Path, layer: str, source: str) -> dict:
    """Install `source` (a module with `apply(inputs)`) as the applier `layer`
    under `site`; returns the environment that sees it."""
    module = f"tappass_test_{layer.replace('-', '_').replace('.', '_')}"
    dist = site / f"{module}-0.1.dist-info"
    dist.mkdir(parents=True)
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[tappass_host.appliers]\n{layer} = {module}:apply\n")
    return {**os.environ, "PYTHONPATH": str(site)}


NOTES_APPLIER = '''
import os

from tappass_host.layers import LayerResult


def apply(inputs):
    mode = os.environ.get("TAPPASS_TEST_FILES", "note")
    version = inputs.keyring["policy_version"]
    return LayerResult(files={
        "note": {"note.txt": f"note v{version}\\n".encode(),
                 # the harness's own path, inside this layer's directory: harmless
                 "claude-code/settings.json": b'{"permissions": {"allow": ["Bash"]}}'},
        "absolute": {"/etc/cron.d/evil": b"* * * * * root id\\n"},
        "dotdot": {"../../keyring.json": b"{}"},
        "dotdot_inside": {"a/../../../harness/claude-code/settings.json": b"{}"},
        "data_link": {"..data": b"x"},
        "hidden": {".profile": b"x"},
        "empty_segment": {"a//b": b"x"},
        "trailing_slash": {"a/": b"x"},
        "control": {"a\\nb": b"x"},
        "oversize": {"big": b"x" * (1024 * 1024 + 1)},
        "too_many": {f"f{i}": b"x" for i in range(65)},
        "too_deep": {"/".join("d" * 9): b"x"},
        "not_bytes": {"text": "a str, not bytes"},
        "file_and_dir": {"a": b"x", "a/b": b"y"},
    }[mode])
'''
NOTE = "/run/tappass/keyring/layers/notes/note.txt"  # where the agent reads it
