"""Shared by the daemon's end-to-end tests (test_daemon.py, test_supervision.py):
a real `tappass-host daemon` process, sandboxes started through the real CLI,
and helpers over the real devplane.

    from daemon_fixture import *  # noqa: F403

brings the fixtures `name`, `host` (a host state dir whose config makes sync
fast), `daemons` (start daemon processes, terminated after the test) and
`sandboxes` (start sandboxes, stopped and deleted after the test), plus the
devplane fixtures.
"""

import json
import subprocess
import signal
import time
import uuid
from pathlib import Path

import pytest

import patience
from audit_records import read_audit
from devplane_fixture import *  # noqa: F403
from devplane_fixture import ENV, PYTHON, run_host, wait_for

AGENT = Path(__file__).resolve().parent.parent / "examples" / "hello-agent"
SYNC_CONFIG = """
[sync]
keepalive_timeout_s = 3
backoff_initial_s = 0.1
backoff_max_s = 1.0
"""
POLICY = {"process": {"memory_mb": 256, "pids_max": 128, "cpu_millis": 500},
          "network": {"mode": "none"},
          "secrets": {"DEMO_TOKEN": "tp-secret-never-logged-4242"}}


class DaemonProcess:
    """`tappass-host daemon` in a subprocess, its stderr in a file."""

    def __init__(self, host, log: Path, env: dict | None = None):
        self.log = log
        with open(log, "ab") as err:
            self.proc = subprocess.Popen(
                [PYTHON, "-m", "tappass_host", "--state-dir", str(host.root),
                 "--config", str(host.config), "daemon"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                env={**ENV, **(env or {})})

    def text(self) -> str:
        return self.log.read_text()

    def wait_line(self, fragment: str, count: int = 1, timeout: float = 15.0) -> str:
        def seen():
            assert self.proc.poll() is None, f"the daemon exited early:\n{self.text()}"
            return self.text().count(fragment) >= count
        try:
            wait_for(seen, timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: no {fragment!r} in the daemon's log:\n"
                                 f"{self.text()}") from None
        return self.text()

    def terminate(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(patience.seconds(10))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def name():
    # Unique per test: a container's cgroup path is its id, shared by every
    # state dir on the host.
    return "hello-" + uuid.uuid4().hex[:6]


@pytest.fixture
def host(host_state):
    host_state.config.write_text(SYNC_CONFIG)
    return host_state


@pytest.fixture
def daemons(tmp_path):
    started = []

    def start(host, env=None) -> DaemonProcess:
        daemon = DaemonProcess(host, tmp_path / f"daemon-{len(started)}.log", env)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.terminate()


@pytest.fixture
def sandboxes(host):
    """Start sandboxes through the CLI; every one is stopped and deleted afterwards."""
    started = []

    def start(name: str, runtime: str = "crun", agent: Path = AGENT) -> int:
        started.append((name, runtime))
        result = run_host(host, "--json", "start", name, "--agent", str(agent),
                          "--runtime", runtime)
        assert result.returncode == 0, f"{runtime} could not start the sandbox: {result.stderr}"
        return json.loads(result.stdout)["pid"]

    yield start
    for name, runtime in started:
        run_host(host, "stop", name, "--timeout", "2")
        root = host.paths.runtime / "oci" / runtime
        subprocess.run([runtime, "--root", str(root), "delete", "--force", f"tappass-{name}"],
                       capture_output=True)


def enroll(devplane, host, name: str) -> str:
    result = run_host(host, "init", name, "--enroll-url", devplane.bootstrap(name),
                      "--trust-key", devplane.trust_key)
    assert result.returncode == 0, result.stderr
    return json.loads((host.paths.sandbox(name).record).read_text())["sandbox_id"]


def publish(devplane, tmp_path, policy: dict, name: str) -> int:
    """`tappass-devplane publish NAME FILE`; returns the version it published."""
    path = tmp_path / f"policy-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(policy))
    out = devplane.cli("publish", name, str(path)).stdout
    return int(out.split("policy_version ")[1].split()[0])


def publish_raw(devplane, tmp_path, data: bytes, version: int, name: str) -> None:
    path = tmp_path / f"raw-{time.monotonic_ns()}.json"
    path.write_bytes(data)
    devplane.cli("publish", name, "--raw-envelope", str(path), "--policy-version", str(version))


def agent_log(host, name: str) -> str:
    return run_host(host, "logs", name).stdout


def wait_agent_sees(host, name: str, version: int, timeout: float = 15.0) -> None:
    try:
        wait_for(lambda: f"policy_version={version}" in agent_log(host, name), timeout)
    except AssertionError:
        raise AssertionError(f"the agent never saw v{version}:\n{agent_log(host, name)}") from None


def keyring_version(host, name: str) -> int:
    return json.loads((host.paths.sandbox(name).keyring / "keyring.json").read_bytes()
                      )["policy_version"]


def audit_events(host) -> list[dict]:
    return read_audit(host.paths.audit_log)


def acks(devplane, name: str) -> list[dict]:
    out = devplane.cli("acks", name).stdout
    return [json.loads(line) for line in out.splitlines() if line]


def running_with_v1(devplane, host, tmp_path, sandboxes, daemons, name, runtime="crun"):
    """Enrolled, v1 published, started (pulling v1 itself), daemon streaming."""
    enroll(devplane, host, name)
    assert publish(devplane, tmp_path, POLICY, name) == 1
    pid = sandboxes(name, runtime)
    wait_agent_sees(host, name, 1)
    daemon = daemons(host)
    daemon.wait_line(f"{name}: stream open (policy_version 1)")
    return pid, daemon
