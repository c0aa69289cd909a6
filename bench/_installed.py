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
import subprocess
import sys
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


SYSTEM_PYTHON = "/usr/bin/python3"


def base_python(choice: str = "system") -> str:
    """The interpreter the venv is made of: `system`, the distribution's
    python3, as the README's production install (python3 -m venv /opt/tappass)
    uses it, when it is of the test venv's major.minor (the dependencies are
    the test venv's); else, or with `venv`, the test venv's own."""
    if choice == "system" and shutil.which(SYSTEM_PYTHON):
        version = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"],
                                 capture_output=True, text=True).stdout.strip()
        if version == str(sys.version_info[:2]):
            return SYSTEM_PYTHON
    return sys.executable


def installed_cli(kind: str = "installed", wheel: str | None = None,
                  base: str = sys.executable) -> Installed:
    """`wheel`: install that wheel (e.g. one built from an earlier commit, to
    compare before and after in the same run) instead of building this tree's;
    `base`: the interpreter of its venv (base_python)."""
    if kind == "checkout":
        return Installed(PYTHON, (PYTHON, "-m", "tappass_host"), kind)
    root = Path(tempfile.mkdtemp(prefix="tp-wheel-"))
    root.chmod(0o755)
    python = install(Path(wheel) if wheel else build_wheel(root), root / "venv", base)
    return Installed(str(python), (str(python.parent / "tappass-host"),), kind, root)
