"""Shared plumbing of the sandbox benchmarks (not a benchmark itself).

Sets up private tappass-host state dirs through the test helpers (real
enrollment records, real signed keyrings), makes sure crun can run on this
host (DESIGN §12: re-exec under scripts/in-crun-namespace when the cgroup2
mount of hybrid mode is there), and precompiles tappass_host's bytecode so
that the figures are those of an installed package (pip compiles on install;
an editable checkout under PYTHONDONTWRITEBYTECODE=1 would otherwise
recompile every module on every CLI run).
"""

import compileall
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from sandbox_fixture import PYTHON, Host, new_host, python_agent, unique_name, write_agent  # noqa: E402,F401


def ensure_crun_works() -> None:
    """Re-exec this script where crun can run (no-op on hosts that need nothing)."""
    if (os.geteuid() == 0 and os.path.ismount("/sys/fs/cgroup/unified")
            and not os.environ.get("TAPPASS_IN_CRUN_NAMESPACE")):
        wrapper = REPO / "scripts" / "in-crun-namespace"
        os.execv(str(wrapper), [str(wrapper), sys.executable, *sys.argv])


def precompile() -> None:
    compileall.compile_dir(str(REPO / "tappass_host"), quiet=2)


def ms(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {"median_ms": round(statistics.median(samples) * 1e3, 2),
            "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))] * 1e3, 2),
            "min_ms": round(ordered[0] * 1e3, 2)}


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, timeout=120, **kwargs)
