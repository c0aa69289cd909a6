import sys
from pathlib import Path

import pytest
from hypothesis import settings

from tappass_host import signing
from tappass_host.paths import HostPaths

sys.path.insert(0, str(Path(__file__).parent))

import keyrings  # noqa: E402

PYTHON = sys.executable

# Timing limits belong in bench/, not in tests: a loaded CI machine must not fail a property.
settings.register_profile("tappass", deadline=None)
settings.load_profile("tappass")


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
