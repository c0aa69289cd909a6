"""The CLI as users run it (not a benchmark itself): a wheel built from this
tree, installed (not editable) in a venv of its own, its `tappass-host`
console script. An editable install adds an import finder, and the test
venv's .pth files slow even `python -c pass`; neither is what users pay.

`--cli checkout` runs the test venv's `python -m tappass_host` instead (for
quick profiling while editing; its figures are not the ones to report).
Both benchmarks take `--wheel FILE` to measure a wheel built elsewhere
(`pip wheel --no-deps -w DIR .` at another commit).
"""

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from _sandboxes import PYTHON, REPO  # noqa: F401  (puts tests/ on sys.path)

from wheel_fixture import build_wheel, install  # noqa: E402


@dataclass
class Installed:
    python: str         # the venv's interpreter, for `python -c pass` of the same venv
    command: tuple      # how to run tappass-host
    kind: str
    root: Path | None = None

    def cleanup(self) -> None:
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)


def installed_cli(kind: str = "installed", wheel: str | None = None) -> Installed:
    """`wheel`: install that wheel (e.g. one built from an earlier commit, to
    compare before and after in the same run) instead of building this tree's."""
    if kind == "checkout":
        return Installed(PYTHON, (PYTHON, "-m", "tappass_host"), kind)
    root = Path(tempfile.mkdtemp(prefix="tp-wheel-"))
    root.chmod(0o755)
    python = install(Path(wheel) if wheel else build_wheel(root), root / "venv")
    return Installed(str(python), (str(python.parent / "tappass-host"),), kind, root)
