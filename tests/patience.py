"""How long the tests' waits may take on this machine: every deadline in tests/ goes through
`seconds(s)`, where `s` is what the wait needs on the machine the tests were written on.

Waits for an event stay event-based; the deadline only bounds a hang, so a slower machine
(software emulation in the cgroup v2 VM lane, a loaded CI runner) gets proportionally longer
deadlines instead of false failures. A window in which something must NOT happen is scaled the
same way, so it still spans what the slower machine needs to do the wrong thing.

The factor is calibrated once per test process from a bare Python start (interpreter, page
faults, exec: what every CLI call and sandbox start in the tests pays), compared with the same
start on the reference machine, and never below 1. TAPPASS_TEST_PATIENCE (a number >= 1) sets a
floor for slow lanes (scripts/test-vm exports one); the calibration can still raise it.
"""

import functools
import os
import subprocess
import sys
import time

ENV_VAR = "TAPPASS_TEST_PATIENCE"
REFERENCE_START_S = 0.03  # `python -c pass`, best of 3, on the 2-core machine these waits were set on
SAMPLES = 3


def _python_start() -> float:
    begun = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    return time.perf_counter() - begun


def _floor() -> float:
    text = os.environ.get(ENV_VAR, "").strip()
    if not text:
        return 1.0
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{ENV_VAR}={text!r}: not a number") from None
    if not value >= 1:
        raise ValueError(f"{ENV_VAR}={text!r}: must be at least 1")
    return value


@functools.cache
def factor() -> float:
    """How many times more patient than on the reference machine (>= 1)."""
    measured = min(_python_start() for _ in range(SAMPLES))
    return max(_floor(), measured / REFERENCE_START_S)


def seconds(reference_s: float) -> float:
    """The deadline (or quiet window) for what takes up to `reference_s` on the reference machine."""
    return reference_s * factor()


if __name__ == "__main__":
    print(f"{factor():.2f}")
