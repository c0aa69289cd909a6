"""The package as users get it: a wheel built from this tree, installed in a
venv of its own (its dependencies come from the test venv, read-only)."""

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import patience
from devplane_fixture import ENV

REPO = Path(__file__).resolve().parent.parent


def build_wheel(directory: Path) -> Path:
    source = directory / "src"
    shutil.copytree(REPO, source, symlinks=True,
                    ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info",
                                                  "__pycache__", ".pytest_cache"))
    # build isolation: the build backend pyproject.toml asks for, from the registry
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                             "-w", str(directory / "dist"), str(source)],
                            capture_output=True, text=True, timeout=patience.seconds(300), env=ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = (directory / "dist").glob("tappass_host-*.whl")
    return wheel


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def install(wheel: Path, venv: Path, base: str = sys.executable) -> Path:
    """A venv at `venv` of the interpreter `base` (of this one's major.minor)
    with `wheel` installed; its python. Its dependencies are the test venv's
    (a path entry whose own .pth files, such as the test venv's editable
    tappass_host, are not processed), so nothing is fetched."""
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    result = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install",
                             "-q", "--no-deps", "--no-index", str(wheel)],
                            capture_output=True, text=True, timeout=patience.seconds(300), env=ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    located = subprocess.run([python, "-c", "import tappass_host; print(tappass_host.__file__)"],
                             check=True, capture_output=True, text=True, cwd="/").stdout
    assert located.startswith(site), located
    return python


@pytest.fixture(scope="session")
def installed(wheel, tmp_path_factory) -> Path:
    """The python of a venv with the wheel installed, outside the source tree."""
    return install(wheel, tmp_path_factory.mktemp("installed") / "venv")
