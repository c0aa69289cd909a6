"""The shipped systemd units (DESIGN §3, §9, §11): they pass
`systemd-analyze verify`, ship in the wheel, are printed and installed by
the CLI, and what they run behaves as they promise (notify + watchdog,
journald-friendly logs, a foreground sandbox started from its record, one
egress proxy of its own that serves every sandbox and is left running by
them).

PID 1 here is not systemd: `verify` loads the unit files offline. It checks
that ExecStart is executable, so the units are verified as `systemd install`
renders them, pointing at this installation's tappass-host.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import zipfile
from pathlib import Path

import pytest

import patience
from audit_records import read_audit
import egress_fixture as world
from devplane_fixture import ENV, PYTHON
from rootless_fixture import staged  # noqa: F401  (a fixture)
from sandbox_fixture import RUNTIMES, host, python_agent, unique_name, wait_for  # noqa: F401
from systemd_exec import directives, exec_prefix, is_confined
from wheel_fixture import wheel  # noqa: F401  (a fixture)
from tappass_host.network import control
from test_network import assert_gone, fetch, link_of, net, start_proxy_sandbox, upstream  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
UNITS = ("tappass-host.service", "tappass-host@.service", "tappass-host-egress.service")
SANDBOX_UNITS = ("tappass-host.service", "tappass-host@.service")
EGRESS_UNIT = "tappass-host-egress.service"


def tappass_host(*args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "tappass_host", *args], capture_output=True, text=True,
                          timeout=patience.seconds(60), env={**ENV, **(env or {})}, **kwargs)


def verify(*units: Path) -> subprocess.CompletedProcess:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing (scripts/setup installs the systemd package)"
    return subprocess.run([analyze, "verify", "--man=no", "--generators=no", *map(str, units)],
                          capture_output=True, text=True, timeout=patience.seconds(60),
                          env={**ENV, "SYSTEMD_LOG_COLOR": "0"})


@pytest.fixture
def installed(tmp_path) -> Path:
    result = tappass_host("systemd", "install", "--dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert all((tmp_path / unit).is_file() for unit in UNITS)
    return tmp_path


def test_every_unit_passes_systemd_analyze_verify(installed):
    result = verify(installed / "tappass-host.service", installed / "tappass-host@demo-1.service",
                    installed / EGRESS_UNIT)
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


def test_the_daemon_unit_is_notify_watchdog_and_hardened():
    units = {u: directives((REPO / "systemd" / u).read_text()) for u in UNITS}
    daemon = units["tappass-host.service"]
    assert daemon["Type"] == ["notify"] and daemon["Restart"] == ["on-failure"]
    assert daemon["WatchdogSec"] and daemon["ExecStart"] == ["/usr/bin/tappass-host daemon"]
    for unit in (units[u] for u in SANDBOX_UNITS):
        for key, value in {"ProtectSystem": "strict", "NoNewPrivileges": "yes",
                           "PrivateTmp": "yes", "ProtectHome": "yes",
                           "ProtectKernelModules": "yes", "RestrictSUIDSGID": "yes",
                           "LockPersonality": "yes"}.items():
            assert unit[key] == [value], key
        writable = unit["ReadWritePaths"][0].split()
        assert {"/var/lib/tappass-host", "/run/tappass-host"} <= set(writable)
        assert "/etc/tappass-host" not in writable  # config is only read


def test_every_writable_path_exists_when_systemd_sets_up_the_namespace():
    """systemd sets up a unit's mount namespace before running any of its
    commands (even an ExecStartPre=+), and a ReadWritePaths= entry that does
    not exist then fails the unit with status 226/NAMESPACE: each one is
    created by the unit itself (StateDirectory=, RuntimeDirectory=), exists on
    every boot, or is optional ("-"). /run/netns exists only once something
    made it: a fresh boot has none."""
    always = {"/sys/fs/cgroup"}
    for name in SANDBOX_UNITS:
        unit = directives((REPO / "systemd" / name).read_text())
        created = {f"/var/lib/{d}" for v in unit.get("StateDirectory", []) for d in v.split()}
        created |= {f"/run/{d}" for v in unit.get("RuntimeDirectory", []) for d in v.split()}
        for value in unit.get("ReadWritePaths", []):
            for path in value.split():
                assert path.startswith("-") or path in created | always, (name, path)
        assert "/run/netns" in created, name
        assert unit["RuntimeDirectoryPreserve"] == ["yes"]  # the sandboxes' namespaces stay


def _console_script(directory: Path, python: str) -> Path:
    directory.mkdir(parents=True)
    script = directory / "tappass-host"
    script.write_text(f"#!{python}\nimport sys\n")
    script.chmod(0o755)
    return script


def test_install_warns_when_protect_home_hides_what_the_units_run(tmp_path):
    """ProtectHome=yes hides /root, /home and /run/user from the daemon and
    instance units: an installation there would fail to start (203/EXEC). The
    warning names what is hidden, even behind a symlink."""
    units = tmp_path / "units"
    units.mkdir()
    home_python = tmp_path / "venv" / "python"
    home_python.parent.mkdir()
    home_python.symlink_to("/home/someone/.pyenv/bin/python3")
    cases = {"/root/project/.venv/bin/tappass-host": ["/root/project/.venv/bin/tappass-host"],
             str(_console_script(tmp_path / "linked", str(home_python))):
                 ["/home/someone/.pyenv/bin/python3"],
             str(_console_script(tmp_path / "opt", "/usr/bin/python3")): []}
    for exec_path, hidden in cases.items():
        result = tappass_host("systemd", "install", "--dir", str(units), "--exec", exec_path)
        assert result.returncode == 0, result.stderr
        assert installed_exec(units) == exec_path  # installed all the same
        if hidden:
            assert result.stderr.count("\n") == 1, result.stderr
            assert "warning: tappass-host.service and tappass-host@.service cannot start" \
                in result.stderr and all(h in result.stderr for h in hidden), result.stderr
            assert "python3 -m venv /opt/tappass" in result.stderr
        else:
            assert result.stderr == "", result.stderr
    as_json = tappass_host("--json", "systemd", "install", "--dir", str(units), "--exec",
                           "/home/x/bin/tappass-host")
    assert json.loads(as_json.stdout)["hidden_by_protect_home"] == ["/home/x/bin/tappass-host"]


# `systemd-analyze security` exposure, at most. The egress proxy parses what
# agents send and keeps little; the daemon and the instance unit run OCI
# runtimes, which need root's means to build sandboxes: the directives
# between them and 4.5 are listed, each with its reason, in
# tappass-host.service.
EXPOSURE = {"tappass-host-egress.service": 4.5, "tappass-host.service": 5.2,
            "tappass-host@.service": 5.2}


def security(unit: Path, threshold: float = 10.0) -> subprocess.CompletedProcess:
    return subprocess.run([shutil.which("systemd-analyze"), "security", "--offline=yes",
                           "--no-pager", f"--threshold={round(threshold * 10)}", str(unit)],
                          capture_output=True, text=True, timeout=patience.seconds(60),
                          env={**ENV, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_COLORS": "0"})


def exposure(result: subprocess.CompletedProcess) -> float:
    """From "Overall exposure level for UNIT: 4.3 OK 🙂" (without colours, systemd
    252 writes the face as ":-)", another colon)."""
    line = next(line for line in result.stdout.splitlines() if "Overall exposure level" in line)
    return float(line.split(".service: ", 1)[1].split()[0])


@pytest.mark.parametrize("unit", UNITS)
def test_each_unit_is_hardened_to_its_exposure_score(installed, unit):
    result = security(installed / unit, threshold=EXPOSURE[unit])
    assert result.returncode == 0, result.stdout[-3000:]
    assert exposure(result) <= EXPOSURE[unit]
    # The check can fail: the same unit without its hardening scores worse.
    bare = installed / f"bare-{unit}"
    text = (installed / unit).read_text()
    bare.write_text(text[:text.index("# --- hardening")] + text[text.index("[Install]"):])
    result = security(bare, threshold=EXPOSURE[unit])
    assert result.returncode != 0 and exposure(result) > EXPOSURE[unit]


def _comments(unit: str) -> str:
    text = (REPO / "systemd" / unit).read_text()
    if unit == "tappass-host@.service":  # "the same as tappass-host.service, which says why"
        text += (REPO / "systemd" / "tappass-host.service").read_text()
    return "\n".join(line for line in text.splitlines() if line.startswith("#"))


def _named(check: str) -> list[list[str]]:
    """What a comment must mention for one of analyze's checks: one of its
    directives, and one of the capabilities, address families or call
    groups it is about."""
    setting, _, value = check.partition("=")
    named = [[setting] + [part.rstrip("=") for part in check.split("/")[1:] if part]]
    if value.startswith("~"):
        match = re.fullmatch(r"~(CAP_|AF_|@)?(\w*)(?:\(([^)]*)\))?(\w*)", value)
        prefix, stem, alternatives, suffix = match.groups()
        kept = "" if prefix in (None, "CAP_") else prefix
        named.append([f"{kept}{stem}{a.rstrip('*')}{suffix}"
                      for a in (alternatives.split("|") if alternatives else [""])])
    return named


@pytest.mark.parametrize("unit", UNITS)
def test_every_open_exposure_is_explained_in_the_unit(installed, unit):
    """Each check `systemd-analyze security` still counts against a unit
    (a directive left out, or set with something let through) is named in
    the unit's comments, with what it is about (the capability, the
    address family, the system call group)."""
    comments = _comments(unit)
    result = security(installed / unit)
    missing = []
    for line in result.stdout.splitlines():
        if not line.startswith("✗"):
            continue
        check = line.split()[1]
        for alternatives in _named(check):
            if not any(a in comments for a in alternatives):
                missing.append(f"{check}: {' or '.join(alternatives)}")
    assert not missing, missing


def test_the_instance_unit_is_confined_as_the_daemon_unit():
    """Both run the same runtimes: one set of hardening directives (the
    daemon's confinement test covers the instance unit too)."""
    def hardening(unit: str) -> dict:
        text = (REPO / "systemd" / unit).read_text()
        return directives(text[text.index("# --- hardening"):text.index("[Install]")])

    assert hardening("tappass-host@.service") == hardening("tappass-host.service")


def test_systemd_errors_are_one_line(tmp_path):
    result = tappass_host("systemd", "print", "nope.service")
    assert result.returncode != 0 and result.stderr.count("\n") == 1
    assert "no unit named 'nope.service'" in result.stderr
    result = tappass_host("systemd", "install", "--dir", str(tmp_path / "missing"))
    assert result.returncode != 0 and result.stderr.count("\n") == 1
    assert not (tmp_path / "missing").exists()


def test_the_units_ship_in_the_wheel(wheel):
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
        sock.settimeout(patience.seconds(15))
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
    _, err = proc.communicate(timeout=patience.seconds(10))
    assert proc.returncode == 0
    assert err.splitlines()[0] == "daemon: ready, 0 sandbox(es)", err


def test_daemon_logs_carry_timestamps_outside_systemd(tmp_path):
    proc = subprocess.Popen([PYTHON, "-m", "tappass_host", "--state-dir", str(tmp_path), "daemon"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    line = proc.stderr.readline()
    proc.terminate()
    proc.communicate(timeout=patience.seconds(10))
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

    # ExecStart exactly as installed, with %i expanded, confined as systemd would
    line = next(line for line in (installed / "tappass-host@.service").read_text().splitlines()
                if line.startswith("ExecStart="))
    argv = [*exec_prefix(installed / "tappass-host@.service", PYTHON),
            *line.split("=", 1)[1].replace("%i", name).split()]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=patience.seconds(60),
                            env={**ENV, "TAPPASS_HOST_STATE_DIR": str(host.state)})
    assert result.returncode == 0, result.stderr
    assert "unit run" in first.stdout and "unit run" in result.stdout  # attached: its stdout
    starts = read_audit(host.paths.audit_log, event="sandbox.started")
    assert [s["details"]["runtime"] for s in starts] == [runtime, runtime]
    assert not (host.paths.runtime / name).exists()  # --rm


# --- the egress proxy as a service of its own ---------------------------------------

# Each of these gives a unit a mount namespace of its own, where the proxy's
# binds under /run/netns would stay invisible to the other units and a shell
# (systemd's exec_needs_mount_namespace(), v252 to v259). ProtectHostname= and
# ProtectClock= are not among them: a UTS namespace, a seccomp filter and a
# device rule.
MOUNT_NAMESPACING = ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices",
                     "PrivateMounts", "ReadWritePaths", "ReadOnlyPaths", "InaccessiblePaths",
                     "ExecPaths", "NoExecPaths", "BindPaths", "BindReadOnlyPaths",
                     "TemporaryFileSystem", "MountImages", "ExtensionImages",
                     "ExtensionDirectories", "ProtectKernelTunables", "ProtectKernelModules",
                     "ProtectKernelLogs", "ProtectControlGroups", "ProtectProc", "ProcSubset",
                     "PrivateIPC", "IPCNamespacePath", "PrivatePIDs", "PrivateNetwork",
                     "NetworkNamespacePath", "MountFlags", "RootDirectory", "RootImage",
                     "PrivateUsers", "DynamicUser")


def test_the_egress_unit_has_no_mount_namespace_and_the_others_want_it():
    egress = directives((REPO / "systemd" / EGRESS_UNIT).read_text())
    assert egress["Type"] == ["notify"] and egress["Restart"] == ["on-failure"]
    assert egress["ExecStart"] == ["/usr/bin/tappass-host egress --no-idle-exit"]
    assert egress["KillMode"] == ["mixed"] and egress["RuntimeDirectoryPreserve"] == ["yes"]
    assert not set(MOUNT_NAMESPACING) & set(egress), set(MOUNT_NAMESPACING) & set(egress)
    assert egress["CapabilityBoundingSet"] == ["CAP_SYS_ADMIN CAP_NET_ADMIN"]
    for key in ("NoNewPrivileges", "RestrictSUIDSGID", "LockPersonality", "ProtectHostname",
                "ProtectClock", "MemoryDenyWriteExecute"):
        assert egress[key] == ["yes"], key
    assert egress["RestrictNamespaces"] == ["net"] and egress["UMask"] == ["0077"]
    assert egress["SystemCallFilter"][0] == "@system-service @mount"
    for name in SANDBOX_UNITS:
        unit = directives((REPO / "systemd" / name).read_text())
        assert EGRESS_UNIT in unit["Wants"][0].split() and EGRESS_UNIT in unit["After"][0].split()


# The unit's ExecStart, with the idle time short enough to see the difference
# --no-idle-exit makes.
_SHORT_IDLE = ("import sys\nfrom tappass_host.network import service\n"
               "service.IDLE_EXIT_S = float(sys.argv[1])\n"
               "from tappass_host.cli import main\nmain(sys.argv[2:])\n")
IDLE_S = 0.3


class EgressUnit:
    """The egress unit's command as systemd runs it: its ExecStart arguments,
    under its confinement (systemd_exec: capabilities, no_new_privs, system
    call filter, no writable+executable memory, umask), a notify socket."""

    def __init__(self, host, installed: Path, notify: socket.socket):
        line = next(line for line in (installed / EGRESS_UNIT).read_text().splitlines()
                    if line.startswith("ExecStart="))
        _, *args = line.split("=", 1)[1].split()
        self.argv = [*exec_prefix(installed / EGRESS_UNIT, PYTHON), PYTHON, "-c", _SHORT_IDLE,
                     str(IDLE_S), "--state-dir", str(host.state), "--config",
                     str(host.config_file), *args]
        self.env = {**ENV, "NOTIFY_SOCKET": notify.getsockname(), "INVOCATION_ID": "0" * 32}
        self.notify = notify
        self.proc: subprocess.Popen | None = None

    def start(self) -> subprocess.Popen:
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=self.env)
        assert self.notify.recv(64) == b"READY=1"
        assert is_confined(self.proc.pid)
        return self.proc

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=patience.seconds(20))
        assert self.notify.recv(64) == b"STOPPING=1"
        return self.proc.returncode, err

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=patience.seconds(10))


@pytest.fixture
def notify(tmp_path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify.sock"))
        sock.settimeout(patience.seconds(20))
        yield sock


def control_pid(host) -> int | None:
    try:
        return int((host.paths.runtime / "network" / "proxy.pid").read_text())
    except (OSError, ValueError):
        return None


def proxies_of(host) -> list[int]:
    """Every process serving as the egress proxy of this host's runtime dir."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if entry.isdigit() and str(host.root).encode() in b" ".join(cmdline) and (
                b"tappass_host.network" in cmdline or b"egress" in cmdline):
            found.append(int(entry))
    return found


def hub_is_gone(host) -> bool:
    return world.hub(host) not in world.netns_names()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_the_egress_unit_serves_start_stays_up_idle_and_stops_clean(net, upstream, installed,
                                                                    notify, runtime):
    unit = EgressUnit(net, installed, notify)
    proc = unit.start()
    try:
        assert control_pid(net) == proc.pid and proxies_of(net) == [proc.pid]
        name = start_proxy_sandbox(net, upstream, runtime, "egsvc", "allowed.test")
        link = link_of(net, name)
        assert fetch(net, name, upstream.url("allowed.test")) == "STATUS 200 1024"
        assert "403" in fetch(net, name, upstream.url("denied.test"))
        # `start` asked the unit's proxy: it spawned none of its own.
        assert proxies_of(net) == [proc.pid] and control_pid(net) == proc.pid
        assert world.listening(net, proc.pid, link["host_address"])

        assert net.run("stop", name, "--timeout", "2").returncode == 0
        assert_gone(net, name, link)
        assert not world.listening(net, proc.pid, link["host_address"])
        # Idle for many times the idle time: still up, still answering.
        time.sleep(IDLE_S * 10)
        assert proc.poll() is None
        assert control._ask(net.paths, {"op": "ping"})["pid"] == proc.pid

        code, err = unit.stop()
        assert code == 0, err
        assert "Traceback" not in err, err
        assert hub_is_gone(net) and proxies_of(net) == []
        assert not (net.paths.runtime / "network" / "control.sock").exists()
        assert control_pid(net) is None
    finally:
        unit.kill()


def test_without_no_idle_exit_the_proxy_ends_when_idle(net, installed, notify):
    """The check above can fail: the same command without the option exits."""
    unit = EgressUnit(net, installed, notify)
    unit.argv.remove("--no-idle-exit")
    proc = unit.start()
    try:
        assert proc.wait(timeout=patience.seconds(10)) == 0
        assert notify.recv(64) == b"STOPPING=1"
        assert hub_is_gone(net) and control_pid(net) is None
    finally:
        unit.kill()


def test_the_egress_unit_takes_over_and_a_restart_keeps_sandboxes_served(net, upstream,
                                                                       installed, notify):
    """A proxy `start` spawned before the unit came up hands over to it, and
    `systemctl restart` of the unit (SIGTERM, start again) leaves the running
    sandbox its namespace and, once the next proxy is up, its egress."""
    name = start_proxy_sandbox(net, upstream, "crun", "egtake", "allowed.test")
    spawned = control_pid(net)
    assert spawned and proxies_of(net) == [spawned]
    link = link_of(net, name)

    unit = EgressUnit(net, installed, notify)
    proc = unit.start()
    try:
        wait_for(lambda: proxies_of(net) == [proc.pid], 10, what="the spawned proxy to end")
        assert "took over from the proxy with pid" in proc.stderr.readline()
        assert world.listening(net, proc.pid, link["host_address"])
        assert fetch(net, name, upstream.url("allowed.test")) == "STATUS 200 1024"

        code, err = unit.stop()  # systemctl restart: stop ...
        assert code == 0 and "Traceback" not in err, err
        assert f"tappass-{name}" in world.netns_names() and not hub_is_gone(net)
        assert fetch(net, name, upstream.url("allowed.test")).startswith("ERROR")

        proc = unit.start()  # ... and start
        assert world.listening(net, proc.pid, link["host_address"])
        assert fetch(net, name, upstream.url("allowed.test")) == "STATUS 200 1024"
        assert "403" in fetch(net, name, upstream.url("denied.test"))

        assert net.run("stop", name, "--timeout", "2").returncode == 0
        assert_gone(net, name, link)
        code, err = unit.stop()
        assert code == 0 and "Traceback" not in err, err
        assert hub_is_gone(net) and proxies_of(net) == []
    finally:
        unit.kill()


def _in_mounts_of(pid: int, *argv: str) -> list[str]:
    return ["nsenter", f"--mount=/proc/{pid}/ns/mnt", *argv]


# What systemd does for a unit with ProtectSystem= & co.: a mount namespace
# whose mounts are slaves of the host's, with the ReadWritePaths bound anew.
_SANDBOX_UNIT_MOUNTS = ["unshare", "--mount", "--propagation", "slave", "sh", "-c",
                        'mount --bind /run/netns /run/netns && exec "$@"', "sh"]


def test_sandbox_units_and_a_shell_see_the_namespaces_the_egress_unit_binds(net, upstream,
                                                                         installed, notify):
    """The mount namespaces of systemd, rebuilt under this test's: "the host"
    is a namespace whose mounts are shared (as systemd leaves them) and whose
    /run/netns is a plain directory (a fresh boot); the egress unit runs in it,
    having none of its own; each sandbox unit runs `start` in a slave
    namespace created before its sandbox's network namespace exists. Its
    runtime must find the namespace the proxy binds, and the host's shell
    must see it and remove it with `stop`."""
    unit = EgressUnit(net, installed, notify)
    # private first: nothing done in "the host" may reach this test's mounts
    unit.argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                 'mount --make-rshared / && umount -l /run/netns; mkdir -p /run/netns '
                 '&& exec "$@"', "sh", *unit.argv]
    proc = unit.start()
    host_netns = Path(f"/proc/{proc.pid}/root/run/netns")
    try:
        names = []
        for runtime in RUNTIMES:  # the first binds /run/netns, the second finds it bound
            name = unique_name("egmnt", runtime)
            net.net_names.append(name)
            net.started.append(name)
            net.enroll(name, network=world.proxy_policy(upstream, "allowed.test"))
            agent = python_agent(net.root / f"agent-{name}", "import time\nprint('agent up', "
                                 "flush=True)\ntime.sleep(3600)\n")
            result = subprocess.run(
                _in_mounts_of(proc.pid, *_SANDBOX_UNIT_MOUNTS,
                              *net.argv("start", name, "--agent", str(agent),
                                        "--runtime", runtime)),
                capture_output=True, text=True, timeout=patience.seconds(60))
            assert result.returncode == 0, result.stderr
            net.wait_log(name, "agent up")
            # Through the sandbox: its workspace is a filesystem mounted in the
            # unit's mount namespace, not in this test's.
            world.in_sandbox(net, name, "import sys; open('/workspace/ca.pem', 'w')"
                             ".write(sys.argv[1])", upstream.ca_pem.read_text())
            assert fetch(net, name, upstream.url("allowed.test")) == "STATUS 200 1024"
            assert f"tappass-{name}" in os.listdir(host_netns)  # in the host's namespace
            names.append(name)

        for name in names:  # from the host's shell
            stop = subprocess.run(_in_mounts_of(proc.pid, *net.argv("stop", name, "--timeout",
                                                                    "2")),
                                  capture_output=True, text=True, timeout=patience.seconds(60))
            assert stop.returncode == 0, stop.stderr
            assert f"tappass-{name}" not in os.listdir(host_netns)
        code, err = unit.stop()
        assert code == 0 and "Traceback" not in err, err
    finally:
        unit.kill()


def test_egress_needs_root_in_one_line_and_creates_nothing(tmp_path, staged):
    # nobody runs the staged tappass-host: the checkout may be where only root reads (/root)
    python, _ = staged
    state = tmp_path / "state"
    result = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                             python, "-m", "tappass_host", "--state-dir", str(state), "egress",
                             "--no-idle-exit"],
                            capture_output=True, text=True, timeout=patience.seconds(30), env=ENV, cwd="/")
    assert result.returncode != 0 and result.stderr.count("\n") == 1, result.stderr
    assert "the egress proxy needs root" in result.stderr
    assert not state.exists()


def test_under_the_systemd_driver_the_runtime_talks_to_the_system_manager(monkeypatch):
    """sd-bus picks the user's bus for a process in a login session (root's
    too): crun, run from an operator's shell, made the sandbox's scope under
    user@0.service (the cgroup v2 lane). Every runtime invocation gets
    DBUS_STARTER_BUS_TYPE=system under the driver, and our environment as is
    otherwise."""
    from tappass_host import systemd
    from tappass_host.runtime.ociruntime import OCIRuntime

    runtime = OCIRuntime(name="crun", binary="/usr/bin/crun", root=Path("/nonexistent"))
    monkeypatch.setattr(systemd, "manages_cgroups", lambda: False)
    assert runtime.environ() is None
    monkeypatch.setattr(systemd, "manages_cgroups", lambda: True)
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", "unix:path=/run/user/0/bus")
    environ = runtime.environ()
    assert environ["DBUS_STARTER_BUS_TYPE"] == "system"
    assert environ["PATH"] == os.environ["PATH"]
    assert "--systemd-cgroup" in runtime.argv("state", "x")
