"""A third-party applier, plugged in the way a third party does it: a
distribution (module plus dist-info) declaring an entry point in the group
`tappass_host.appliers`, on the PYTHONPATH of the tappass-host process, and
named in config `appliers`."""

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
