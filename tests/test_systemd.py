"""The shipped systemd units (DESIGN §3, §9, §11): they pass
`systemd-analyze verify`, ship in the wheel, are printed and installed by
the CLI, and what they run behaves as they promise (notify + watchdog,
journald-friendly logs, a foreground sandbox started from its record).

PID 1 here is not systemd: `verify` loads the unit files offline. It checks
that ExecStart is executable, so the units are verified as `systemd install`
renders them, pointing at this installation's tappass-host.
"""

import json
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from devplane_fixture import ENV, PYTHON
from sandbox_fixture import host, python_agent, unique_name  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
UNITS = ("tappass-host.service", "tappass-host@.service")


def tappass_host(*args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "tappass_host", *args], capture_output=True, text=True,
                          timeout=60, env={**ENV, **(env or {})}, **kwargs)


def verify(*units: Path) -> subprocess.CompletedProcess:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing (scripts/setup installs the systemd package)"
    return subprocess.run([analyze, "verify", "--man=no", "--generators=no", *map(str, units)],
                          capture_output=True, text=True, timeout=60,
                          env={**ENV, "SYSTEMD_LOG_COLOR": "0"})


@pytest.fixture
def installed(tmp_path) -> Path:
    result = tappass_host("systemd", "install", "--dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert all((tmp_path / unit).is_file() for unit in UNITS)
    return tmp_path


def test_both_units_pass_systemd_analyze_verify(installed):
    result = verify(installed / "tappass-host.service", installed / "tappass-host@demo-1.service")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stderr


def test_verify_would_catch_a_broken_unit(installed):
    """The check above can fail: a typo or a missing binary shows up."""
    broken = installed / "broken.service"
    text = (installed / "tappass-host.service").read_text()
    broken.write_text(text.replace("NoNewPrivileges=", "NoNewPrivilege="))
    assert "Unknown key" in verify(broken).stderr
    gone = installed / "gone.service"
    gone.write_text(text.replace(f"ExecStart={installed_exec(installed)}",
                                 "ExecStart=/nonexistent/tappass-host"))
    result = verify(gone)
    assert result.returncode != 0 and "not executable" in result.stderr


def installed_exec(directory: Path) -> str:
    line = next(line for line in (directory / "tappass-host.service").read_text().splitlines()
                if line.startswith("ExecStart="))
    return line.split("=", 1)[1].split()[0]


def test_units_run_this_installation_and_print_matches_install(installed):
    executable = Path(installed_exec(installed))
    assert executable.name == "tappass-host" and executable.is_file()
    assert executable.parent == Path(PYTHON).parent  # this venv's, not some other one
    for unit in UNITS:
        printed = tappass_host("systemd", "print", unit)
        assert printed.returncode == 0, printed.stderr
        assert printed.stdout == (installed / unit).read_text()
    shipped = (REPO / "systemd" / "tappass-host@.service").read_text()
    assert "ExecStart=/usr/bin/tappass-host start %i --foreground --rm" in shipped


def _directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


def test_the_daemon_unit_is_notify_watchdog_and_hardened():
    units = {u: _directives((REPO / "systemd" / u).read_text()) for u in UNITS}
    daemon = units["tappass-host.service"]
    assert daemon["Type"] == ["notify"] and daemon["Restart"] == ["on-failure"]
    assert daemon["WatchdogSec"] and daemon["ExecStart"] == ["/usr/bin/tappass-host daemon"]
    for unit in units.values():
        for key, value in {"ProtectSystem": "strict", "NoNewPrivileges": "yes",
                           "PrivateTmp": "yes", "ProtectHome": "yes",
                           "ProtectKernelModules": "yes", "RestrictSUIDSGID": "yes",
                           "LockPersonality": "yes"}.items():
            assert unit[key] == [value], key
        writable = unit["ReadWritePaths"][0].split()
        assert {"/var/lib/tappass-host", "/run/tappass-host"} <= set(writable)
        assert "/etc/tappass-host" not in writable  # config is only read


def test_systemd_errors_are_one_line(tmp_path):
    result = tappass_host("systemd", "print", "nope.service")
    assert result.returncode != 0 and result.stderr.count("\n") == 1
    assert "no unit named 'nope.service'" in result.stderr
    result = tappass_host("systemd", "install", "--dir", str(tmp_path / "missing"))
    assert result.returncode != 0 and result.stderr.count("\n") == 1
    assert not (tmp_path / "missing").exists()


def test_the_units_ship_in_the_wheel(tmp_path):
    build = tmp_path / "src"
    shutil.copytree(REPO, build, symlinks=True,
                    ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info",
                                                  "__pycache__", ".pytest_cache"))
    # build isolation: the build backend pyproject.toml asks for, from the registry
    result = subprocess.run([PYTHON, "-m", "pip", "wheel", "--no-deps", "-q",
                             "-w", str(tmp_path / "dist"), str(build)],
                            capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("tappass_host-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        for unit in UNITS:
            packed = archive.read(f"tappass_host/data/systemd/{unit}").decode()
            assert packed == (REPO / "systemd" / unit).read_text()


# --- what the units run ----------------------------------------------------------------


def test_daemon_logs_without_timestamps_under_systemd_and_pings_the_watchdog(tmp_path):
    address = str(tmp_path / "notify.sock")
    state = tmp_path / "state"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(15)
        proc = subprocess.Popen(
            [PYTHON, "-m", "tappass_host", "--state-dir", str(state), "daemon"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, env={**ENV, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000",
                            "INVOCATION_ID": "0123456789abcdef", "JOURNAL_STREAM": "8:1"})
        try:
            assert sock.recv(64) == b"READY=1"
            assert [sock.recv(64) for _ in range(3)] == [b"WATCHDOG=1"] * 3
        finally:
            proc.terminate()
        assert sock.recv(64) == b"STOPPING=1"
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert err.splitlines()[0] == "daemon: ready, 0 sandbox(es)", err


def test_daemon_logs_carry_timestamps_outside_systemd(tmp_path):
    proc = subprocess.Popen([PYTHON, "-m", "tappass_host", "--state-dir", str(tmp_path), "daemon"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    line = proc.stderr.readline()
    proc.terminate()
    proc.communicate(timeout=10)
    assert line.endswith("daemon: ready, 0 sandbox(es)\n") and line[:4].isdigit(), line


@pytest.mark.parametrize("runtime", ["crun", "runc"])
def test_the_instance_unit_command_starts_the_last_agent_in_the_foreground(host, installed,
                                                                           runtime):
    name = host.enroll(unique_name("unit", runtime))
    agent = python_agent(host.root / "agent", "print('unit run', flush=True)\n")
    never = host.run("start", name, "--foreground", "--rm")
    assert never.returncode != 0 and "give its agent with --agent" in never.stderr
    assert never.stderr.count("\n") == 1

    first = host.start(name, agent, runtime, "--foreground", "--rm")
    assert first.returncode == 0, first.stderr
    record = json.loads(host.paths.sandbox(name).record.read_text())
    assert record["agent"] == str(agent) and record["runtime"] == runtime

    # ExecStart exactly as installed, with %i expanded as systemd would
    line = next(line for line in (installed / "tappass-host@.service").read_text().splitlines()
                if line.startswith("ExecStart="))
    argv = line.split("=", 1)[1].replace("%i", name).split()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                            env={**ENV, "TAPPASS_HOST_STATE_DIR": str(host.state)})
    assert result.returncode == 0, result.stderr
    assert "unit run" in first.stdout and "unit run" in result.stdout  # attached: its stdout
    starts = [json.loads(line) for line in host.paths.audit_log.read_text().splitlines()
              if '"sandbox.started"' in line]
    assert [s["details"]["runtime"] for s in starts] == [runtime, runtime]
    assert not (host.paths.runtime / name).exists()  # --rm
