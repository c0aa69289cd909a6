"""`start --agent SPEC` on real crun and runc: a bare name is an installed
distribution only, a directory must be given as a path (it contains '/').

The attack: a directory planted in the operator's current directory under the
name of an agent distribution (or of one not installed) was taken instead of
it, and its path recorded in sandbox.json, so that every later `start NAME`
(the systemd unit) kept running the planted agent.
"""

import json
import os
import subprocess
import textwrap
from pathlib import Path

import patience
from sandbox_fixture import (  # noqa: F401  (fixtures: runtime, host)
    host,
    one_line_error,
    runtime,
    unique_name,
    write_agent,
)

DISTRIBUTION = "tp-test-agent"


def install_agent_distribution(site: Path) -> dict:
    """The agent distribution DISTRIBUTION, as pip would install it under `site`:
    a package holding tappass-agent.toml, plus dist-info declaring the entry
    point; returns the environment of a tappass-host that sees it."""
    package = site / "tp_test_agent"
    write_agent(package, ["/bin/sh", "-c", "echo DISTRIBUTION-RAN"], name=DISTRIBUTION,
                files={"__init__.py": ""})
    dist = site / "tp_test_agent-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DISTRIBUTION}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent(f"""\
        [tappass.agents]
        {DISTRIBUTION} = tp_test_agent
        """))
    for path in (site, dist):
        path.chmod(0o755)
    return {**os.environ, "PYTHONPATH": str(site)}


def plant(cwd: Path, name: str) -> Path:
    return write_agent(cwd / name, ["/bin/sh", "-c", "echo PLANTED-RAN"], name="planted")


def start_in(host, cwd: Path, name: str, *args: str, env=None) -> subprocess.CompletedProcess:
    host.started.append(name)
    return subprocess.run(host.argv("start", name, *args), capture_output=True, text=True,
                          timeout=patience.seconds(30), cwd=cwd, env=env, stdin=subprocess.DEVNULL)


def recorded_agent(host, name: str) -> str | None:
    return json.loads(host.paths.sandbox(name).record.read_text()).get("agent")


def test_a_bare_name_is_the_installed_distribution_never_a_planted_directory(runtime, host):
    env = install_agent_distribution(host.root / "site")
    cwd = host.root / "cwd"
    plant(cwd, DISTRIBUTION)
    name = host.enroll(unique_name("pkgdist", runtime))
    started = start_in(host, cwd, name, "--agent", DISTRIBUTION, "--runtime", runtime, env=env)
    assert started.returncode == 0, started.stderr
    host.wait_exited(name)
    assert "DISTRIBUTION-RAN" in host.logs(name) and "PLANTED-RAN" not in host.logs(name)
    assert recorded_agent(host, name) == str((host.root / "site" / "tp_test_agent").resolve())

    # The next `start NAME`, from the same directory, runs what was recorded.
    again = start_in(host, cwd, name, env=env)
    assert again.returncode == 0, again.stderr
    host.wait_exited(name)
    assert "PLANTED-RAN" not in host.logs(name)
    assert host.logs(name).count("DISTRIBUTION-RAN") == 2


def test_a_bare_name_that_is_no_distribution_is_refused_despite_a_planted_directory(runtime, host):
    cwd = host.root / "cwd"
    plant(cwd, "evil-agent")
    name = host.enroll(unique_name("pkgplant", runtime))
    error = one_line_error(start_in(host, cwd, name, "--agent", "evil-agent",
                                    "--runtime", runtime))
    assert "'evil-agent' is not an installed distribution" in error
    assert "./evil-agent" in error  # the hint: how to mean the directory
    assert recorded_agent(host, name) is None
    assert not host.paths.sandbox(name).runtime.exists()
    # `start NAME` has nothing recorded to fall back on.
    assert "has never been started" in one_line_error(start_in(host, cwd, name))


def test_a_directory_given_as_a_path_is_recorded_and_kept(runtime, host):
    """Meant explicitly (with a '/'), the directory is used, recorded by its
    absolute path, and later `start NAME` runs it from any directory."""
    cwd = host.root / "cwd"
    planted = plant(cwd, "my-agent")
    name = host.enroll(unique_name("pkgpath", runtime))
    started = start_in(host, cwd, name, "--agent", "./my-agent", "--runtime", runtime)
    assert started.returncode == 0, started.stderr
    host.wait_exited(name)
    assert recorded_agent(host, name) == str(planted.resolve())
    again = start_in(host, Path("/"), name)
    assert again.returncode == 0, again.stderr
    host.wait_exited(name)
    assert host.logs(name).count("PLANTED-RAN") == 2
    missing = one_line_error(start_in(host, cwd, name, "--agent", "./nowhere"))
    assert "'./nowhere' is not a directory" in missing
