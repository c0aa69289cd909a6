import sys
from pathlib import Path

import pytest

from tappass_host import signing
from tappass_host.paths import HostPaths

sys.path.insert(0, str(Path(__file__).parent))

import keyrings  # noqa: E402

PYTHON = sys.executable


@pytest.fixture
def paths(tmp_path) -> HostPaths:
    return HostPaths.resolve(tmp_path / "state")


@pytest.fixture
def signer():
    return signing.generate()


@pytest.fixture
def sandbox(paths, signer):
    """An enrolled sandbox named 'demo' that trusts `signer`."""
    return keyrings.enroll(paths, "demo", [signer])
