"""The `tappass-host` command line itself, through the real CLI in subprocesses:
options after the subcommand, one-line errors where "internal error" used to be, and
`logs` keeping an agent's terminal control sequences away from the operator's terminal."""

import json
import os
import shutil
import subprocess
import textwrap

import pytest

import patience
from sandbox_fixture import (  # noqa: F401  (host and runtime are fixtures)
    host,
    one_line_error,
    python_agent,
    runtime,
    unique_name,
)

# -- common options after the subcommand ------------------------------------------------


def test_common_options_work_after_the_subcommand(host, tmp_path):
    name = host.enroll(unique_name("opts"))
    base = [*host.command]  # no global options: each is given after the subcommand
    state, config = str(host.state), str(host.config_file)
    host.configure("")

    def after(*args):
        return subprocess.run([*base, *args], capture_output=True, text=True, timeout=patience.seconds(60),
                              stdin=subprocess.DEVNULL)

    status = after("status", name, "--json", "--state-dir", state, "--config", config)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["name"] == name
    before = subprocess.run(host.argv("--json", "status", name), capture_output=True,
                            text=True, timeout=patience.seconds(60))
    assert json.loads(before.stdout) == json.loads(status.stdout)

    verify = after("audit", "verify", "--json", "--state-dir", state)
    assert verify.returncode == 0, verify.stderr
    assert json.loads(verify.stdout)["ok"] is True

    tail = after("audit", "tail", "-n", "1", "--state-dir", state, "--json")
    assert json.loads(tail.stdout)[0]["event"] == "keyring.applied"

    logs = after("logs", name, "--json", "--state-dir", state)
    assert logs.returncode == 0, logs.stderr
    assert json.loads(logs.stdout) == []

    inspect = after("inspect", name, "--json", "--state-dir", state)
    assert "No such option" not in inspect.stderr
    assert "has no rendered bundle yet" in one_line_error(inspect)

    # --config after the subcommand is the one read; -v after it shows the traceback.
    (tmp_path / "bad.toml").write_text("no_such_key = 1\n")
    bad = after("start", name, "--state-dir", state, "--config", str(tmp_path / "bad.toml"),
                "--agent", "/nonexistent")
    assert "unknown config key 'no_such_key'" in one_line_error(bad)
    traced = after("status", "nosuch", "--state-dir", state, "-v")
    assert traced.returncode != 0 and "Traceback" in traced.stderr

    # An option given both before and after: the later one wins, like any repeated option.
    both = after("--state-dir", "/nonexistent-state", "status", "--state-dir", state, "--json")
    assert both.returncode == 0 and name in both.stdout


def test_shell_passes_options_after_the_name_to_the_command(runtime, host, tmp_path):
    """`shell NAME CMD --json -v`: those belong to CMD, not to tappass-host."""
    name = host.enroll(unique_name("shopt", runtime))
    agent = python_agent(tmp_path / "agent", "import time\ntime.sleep(600)\n")
    host.start_ok(name, agent, runtime)
    for argv in (["/bin/echo", "--json", "-v"], ["--", "/bin/echo", "--json", "-v"]):
        result = host.run("shell", name, *argv)
        assert result.returncode == 0 and result.stdout == "--json -v\n", result
    assert "no sandbox named 'nosuch'" in one_line_error(host.run("shell", "nosuch", "-v"))


# -- one clear line instead of "internal error" -----------------------------------------


def test_a_config_file_that_is_not_utf8_is_one_line(host, tmp_path):
    name = host.enroll(unique_name("utf8"))
    host.config_file.write_bytes(b'runtime = "crun"\n# caf\xe9 \xff\xfe\n')
    result = host.run("start", name, "--agent", "/nonexistent")
    line = one_line_error(result)
    assert "internal error" not in line
    assert f"config file {host.config_file} is not UTF-8" in line


@pytest.mark.parametrize("how", ["a file", "under a file"])
def test_a_state_dir_that_is_a_file_is_one_line(how, tmp_path):
    from sandbox_fixture import PYTHON

    afile = tmp_path / "state-file"
    afile.write_text("not a directory\n")
    state = afile if how == "a file" else afile / "state"
    for args in (["status"], ["audit", "verify"], ["status", "x"], ["logs", "x"],
                 ["sync", "apply", "x", "-"]):
        result = subprocess.run([PYTHON, "-m", "tappass_host", "--state-dir", str(state),
                                 *args], capture_output=True, text=True, timeout=patience.seconds(60),
                                stdin=subprocess.DEVNULL)
        line = one_line_error(result)
        assert "internal error" not in line and "is not a directory" in line, (args, line)


def _fake_runtime(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


def test_a_runtime_path_that_is_not_a_runtime_is_one_line(host, tmp_path):
    name = host.enroll(unique_name("rtpath"))
    agent = python_agent(tmp_path / "agent", "print('hi')\n")
    not_runtimes = {
        "true": shutil.which("true"),                     # exits 0 and says nothing
        "text file": _fake_runtime(tmp_path, "notes", "just text\n").replace("notes", "notes"),
        "not executable": str(tmp_path / "plain"),
        "a directory": str(tmp_path),
        "missing": str(tmp_path / "missing"),
        "runc for crun": shutil.which("runc"),
        "liar": _fake_runtime(tmp_path, "liar", "#!/bin/sh\necho 'crunch version 1'\n"),
    }
    (tmp_path / "plain").write_text("#!/bin/sh\n")
    os.chmod(tmp_path / "notes", 0o755)
    for what, path in not_runtimes.items():
        host.configure(f'runtime = "crun"\nruntime_path = "{path}"\n')
        result = host.start(name, agent, "crun", "--foreground", "--rm")
        line = one_line_error(result)
        assert "internal error" not in line, (what, line)
        assert f"runtime_path {path!r} is not the OCI runtime crun" in line, (what, line)
    host.configure(f'runtime = "crun"\nruntime_path = "{shutil.which("crun")}"\n')
    good = host.start(name, agent, "crun", "--foreground", "--rm")
    assert good.returncode == 0 and good.stdout.strip() == "hi", good.stderr


def test_systemd_install_into_a_missing_dir_says_it_is_missing(host, tmp_path):
    missing = tmp_path / "no" / "such" / "dir"
    result = host.run("systemd", "install", "--dir", str(missing))
    assert one_line_error(result) == f"tappass-host: error: --dir {missing} does not exist " \
                                     "(create it first)"
    assert not missing.exists()


ENOSPC_SCRIPT = textwrap.dedent("""\
    set -e
    mount -t tmpfs -o size=2m,mode=0755 tappass-enospc "$STATE"
    cp -a "$SEED/." "$STATE/"
    dd if=/dev/zero of="$STATE/filler" bs=64k 2>/dev/null || true
    set +e
    "$@"
    echo "exit=$?" >&2
""")


def test_a_full_state_filesystem_is_one_line(host, tmp_path):
    """ENOSPC for real: the state dir is a 2 MiB tmpfs (in a private mount namespace of
    the command), filled to the last block; then commands that write."""
    name = host.enroll(unique_name("full"))
    applied = (host.paths.sandbox(name).keyring / "keyring.json").read_bytes()
    envelope = tmp_path / "next.dsse.json"
    envelope.write_bytes(host.envelope(name))
    seed = tmp_path / "seed"
    shutil.copytree(host.state, seed, symlinks=True)
    state = tmp_path / "mnt"
    state.mkdir()
    check = tmp_path / "check"
    agent = python_agent(tmp_path / "agent", "print('hi')\n")
    for args in (["sync", "apply", name, str(envelope)],
                 ["start", name, "--agent", str(agent), "--runtime", "crun", "--foreground",
                  "--rm"]):
        argv = [*host.command, "--state-dir", str(state), "--config", str(host.config_file),
                *args]
        script = ENOSPC_SCRIPT + f'cp "$STATE/sandboxes/{name}/keyring/keyring.json" "{check}"\n'
        result = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *argv],
            capture_output=True, text=True, timeout=patience.seconds(120), stdin=subprocess.DEVNULL,
            env={**os.environ, "STATE": str(state), "SEED": str(seed)})
        stderr, _, code = result.stderr.rpartition("exit=")
        assert int(code) != 0, result
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("tappass-host: error: "), stderr
        assert "internal error" not in lines[0] and "Traceback" not in stderr
        assert "no space left on the device" in lines[0], lines[0]
        assert check.read_bytes() == applied  # the last good keyring is intact
    assert not os.path.ismount(state)


# -- logs: the agent's control sequences stay in the log ---------------------------------

HOSTILE = r"""
import sys
out = sys.stdout.buffer
out.write(b"title \x1b]0;pwned\x07 clear \x1b[2J home \x1b[H\n")
out.write(b"osc52 \x1b]52;c;cm0gLXJmIC8=\x07 bell \x07 cr \r overwritten\n")
out.write(b"c1 \xc2\x9b31m del \x7f nul \x00 bad utf8 \xff\xfe\n")
out.write(b"kept:\ttab\n")
out.write(b"DONE\n")
out.flush()
"""


def test_logs_escape_terminal_control_sequences_unless_raw(runtime, host, tmp_path):
    name = host.enroll(unique_name("ansi", runtime))
    agent = python_agent(tmp_path / "agent", HOSTILE)
    started = host.start(name, agent, runtime)
    assert started.returncode == 0, started.stderr
    host.wait_log(name, "DONE")

    shown = host.run("logs", name)
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    for control in ("\x1b", "\x07", "\r", "\x00", "\x7f", "\x9b"):
        assert control not in text, repr(control)
    lines = text.splitlines()
    assert lines[0] == r"title \x1b]0;pwned\x07 clear \x1b[2J home \x1b[H"
    assert lines[1] == r"osc52 \x1b]52;c;cm0gLXJmIC8=\x07 bell \x07 cr \x0d overwritten"
    assert lines[2] == r"c1 \x9b31m del \x7f nul \x00 bad utf8 \xff\xfe"
    assert lines[3] == "kept:\ttab" and lines[4] == "DONE"

    raw = subprocess.run(host.argv("logs", name, "--raw"), capture_output=True, timeout=patience.seconds(60))
    assert raw.returncode == 0, raw.stderr
    assert b"title \x1b]0;pwned\x07 clear \x1b[2J home \x1b[H\n" in raw.stdout
    assert b"c1 \xc2\x9b31m del \x7f nul \x00 bad utf8 \xff\xfe\n" in raw.stdout

    as_json = host.run("logs", name, "--json")
    messages = json.loads(as_json.stdout)
    assert messages[0] == "title \x1b]0;pwned\x07 clear \x1b[2J home \x1b[H"
    assert "\x1b" not in as_json.stdout  # JSON escapes it
