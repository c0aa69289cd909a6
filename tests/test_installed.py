"""The installed package works without the source tree (DESIGN §3): a wheel
built from this tree, installed in a venv of its own, starts a real sandbox
under crun and runc with the templates, seccomp profiles and Landlock
launcher it carries, and prints the units it ships."""

import json

import pytest

from sandbox_fixture import HELLO_AGENT, host, runtime, unique_name  # noqa: F401  (fixtures)
from wheel_fixture import installed, wheel  # noqa: F401  (fixtures)


@pytest.fixture
def installed_host(host, installed):
    host.command = (str(installed.parent / "tappass-host"),)  # the console script
    return host


def test_the_installed_package_starts_a_confined_sandbox(installed_host, runtime):
    host = installed_host
    name = host.enroll(unique_name("wheel", runtime))
    result = host.run("start", name, "--agent", str(HELLO_AGENT), "--runtime", runtime)
    assert result.returncode == 0, result.stderr
    host.wait_log(name, "policy_version=1")
    config = json.loads(host.run("--json", "inspect", name).stdout)["config"]
    site = str(host.command[0]).rsplit("/bin/", 1)[0]
    launcher = next(m for m in config["mounts"] if m["destination"] == "/run/tappass/launcher")
    assert launcher["source"].startswith(site), launcher  # the wheel's, not the checkout's
    assert config["linux"]["seccomp"]["defaultAction"] == "SCMP_ACT_ERRNO"
    shell = host.run("shell", name, "--", "sh", "-c", "id -u; ls /sys/class/net")
    assert shell.stdout.split()[0] != "0"
    assert "Permission denied" in shell.stderr  # Landlock, applied by the installed launcher
    assert host.run("stop", name, "--timeout", "5").returncode == 0


def test_the_installed_package_prints_its_units(installed_host):
    result = installed_host.run("systemd", "print", "tappass-host.service")
    assert result.returncode == 0, result.stderr
    assert "Type=notify" in result.stdout
