"""The audit records of a run's end (runtime.runstate.write_exit): a run that
`stop` ended gets its `sandbox.stopped` in the same append as its
`sandbox.exited` (one write, one fsync; the stop's own process then signs
nothing), exactly once; a run that ended on its own gets no stop record, even
one a later `stop` marked as stopped by the operator. Real audit log, real
signatures. (The CLI's stops under crun and runc: tests/test_lifecycle.py.)"""

import pytest

from audit_records import read_audit
from tappass_host.audit import AuditLog
from tappass_host.paths import HostPaths
from tappass_host.runtime.runstate import write_exit, write_state

STARTED = "2026-12-02T00:00:00.000001Z"


@pytest.fixture
def paths(tmp_path) -> HostPaths:
    paths = HostPaths.resolve(tmp_path / "state")
    paths.sandbox("web").root.mkdir(parents=True)  # as `init` leaves it
    return paths


def ends(paths: HostPaths) -> list[tuple]:
    assert AuditLog.for_host(paths).verify().ok
    return [(e["event"], e["details"].get("code"), e["details"].get("by"))
            for e in read_audit(paths.audit_log, "web")]


def test_the_exit_of_a_stopped_run_carries_its_stop_once(paths):
    write_state(paths.sandbox("web"), {"started_at": STARTED, "stopped_by": "expiry",
                                       "stop_signalled": True})
    write_exit(paths, "web", 143, False, started_at=STARTED)
    write_exit(paths, "web", 143, False, started_at=STARTED)  # the hook and stop's fallback
    assert ends(paths) == [("sandbox.exited", 143, None), ("sandbox.stopped", 143, "expiry")]


@pytest.mark.parametrize("state", [
    {"started_at": STARTED},                                 # it ended on its own
    {"started_at": STARTED, "stopped_by": "operator"},       # then `stop` found it not running
    {"started_at": "2026-12-01T00:00:00Z", "stopped_by": "operator",
     "stop_signalled": True},                                # an earlier run's stop
])
def test_an_exit_stop_did_not_cause_has_no_stop_record(paths, state):
    write_state(paths.sandbox("web"), state)
    write_exit(paths, "web", 0, False, started_at=STARTED)
    assert ends(paths) == [("sandbox.exited", 0, None)]
