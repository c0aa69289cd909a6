"""Real sandboxes through the real product path: `tappass-host` in subprocesses.

A `Host` is a private state dir under a short /tmp path (runtimes and conmon
put sockets under it), with its own config file and enrolled sandboxes whose
keyrings are applied through the real update path. Every sandbox a test
starts is stopped and its container deleted by the fixture's finalizer,
whatever the test did. Sandbox names are unique per test (cgroup paths are
per container id, shared by every state dir on the host).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import keyrings
import patience
from tappass_host import signing
from tappass_host.paths import SANDBOX_NAME, HostPaths
from tappass_host.processes import process_alive, wait_ended

PYTHON = sys.executable
RUNTIMES = ("crun", "runc")
REPO = Path(__file__).resolve().parent.parent
HELLO_AGENT = REPO / "examples" / "hello-agent"
PROBES = Path(__file__).resolve().parent / "probes"
FAKE_MACHINE_KEY = "-----BEGIN PRIVATE KEY-----\nnot a real key, a canary\n-----END PRIVATE KEY-----\n"


def unique_name(prefix: str, runtime: str = "") -> str:
    return "-".join(p for p in (prefix, runtime, uuid.uuid4().hex[:6]) if p)


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the real-sandbox tests run as root")


def require_runtime(runtime: str) -> None:
    """Fail (never skip) when the runtime or conmon is missing."""
    for binary in (runtime, "conmon"):
        assert shutil.which(binary), f"{binary} is not installed (apt-get install -y {binary})"


@pytest.fixture(params=RUNTIMES)
def runtime(request) -> str:
    """Each test using it runs once per OCI runtime."""
    require_runtime(request.param)
    return request.param


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The CLI's contract for errors: non-zero exit, one line on stderr, no traceback."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("tappass-host: "), \
        repr(result.stderr)
    return result.stderr.strip()


def wait_for(predicate, timeout: float = 10, interval: float = 0.02, what: str = "condition"):
    """The value of `predicate` once true; `timeout` (like every timeout here) is in the
    reference machine's seconds, scaled by `patience`."""
    timeout = patience.seconds(timeout)
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def write_agent(directory: Path, entrypoint: list[str], *, files: dict[str, str] = (),
                env: dict[str, str] | None = None, name: str = "test-agent",
                manifest: str | None = None) -> Path:
    """An agent package: tappass-agent.toml plus `files`, readable by the agent uid."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    if manifest is None:
        manifest = f'name = "{name}"\nversion = "0.1.0"\nentrypoint = {json.dumps(entrypoint)}\n'
        if env:
            manifest += "[env]\n" + "".join(f'{k} = {json.dumps(v)}\n' for k, v in env.items())
    (directory / "tappass-agent.toml").write_text(manifest)
    for relpath, text in dict(files).items():
        path = directory / relpath
        path.write_text(textwrap.dedent(text))
        path.chmod(0o755)
    return directory


def python_agent(directory: Path, source: str, *args: str) -> Path:
    """An agent whose entrypoint is the host's python3 running `source`."""
    return write_agent(directory, ["python3", "/opt/agent/main.py", *args],
                       files={"main.py": source})


_MODULES_AT_EXIT = """
import atexit, json, runpy, sys
atexit.register(lambda: print("MODULES " + json.dumps(sorted(sys.modules)), file=sys.stderr))
sys.argv = ["tappass-host", *sys.argv[1:]]
runpy.run_module("tappass_host", run_name="__main__", alter_sys=True)
"""


@dataclass
class Host:
    root: Path
    signer: object = field(default_factory=signing.generate)
    started: list[str] = field(default_factory=list)
    versions: dict[str, int] = field(default_factory=dict)
    config_text: str = ""
    command: tuple[str, ...] = (PYTHON, "-m", "tappass_host")  # the CLI to run

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def paths(self) -> HostPaths:
        return HostPaths.resolve(self.state)

    @property
    def config_file(self) -> Path:
        return self.root / "config.toml"

    def configure(self, text: str) -> None:
        self.config_text = text
        self.config_file.write_text(text)

    def argv(self, *args: str) -> list[str]:
        return [*self.command, "--state-dir", str(self.state),
                "--config", str(self.config_file), *args]

    def run(self, *args: str, timeout: float = 30, env: dict | None = None,
            stdin=subprocess.DEVNULL) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(*args), capture_output=True, text=True,
                              timeout=patience.seconds(timeout), env=env, stdin=stdin)

    def popen(self, *args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, text=True, env=env, **kwargs)

    def modules_loaded(self, *args: str, env: dict | None = None) -> set[str]:
        """Every module the real CLI had loaded when it exited (lazy imports too)."""
        argv = self.argv(*args)
        assert argv[1:3] == ["-m", "tappass_host"]
        result = subprocess.run([argv[0], "-c", _MODULES_AT_EXIT, *argv[3:]], capture_output=True,
                                text=True, timeout=patience.seconds(30), env=env,
                                stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stderr[-2000:]
        line = next(line for line in result.stderr.splitlines() if line.startswith("MODULES "))
        return set(json.loads(line[len("MODULES "):]))

    # --- sandboxes -----------------------------------------------------------

    def enroll(self, name: str, *, apply: bool = True, **aspects) -> str:
        keyrings.enroll(self.paths, name, [self.signer])
        if apply:
            self.apply(name, **aspects)
        return name

    def envelope(self, name: str, version: int | None = None, **aspects) -> bytes:
        version = version or self.versions.get(name, 0) + 1
        self.versions[name] = version
        return keyrings.sign(keyrings.policy(version, **aspects), self.signer)

    def apply(self, name: str, version: int | None = None, **aspects) -> int:
        """Apply a new keyring version through the real update path (in process)."""
        from tappass_host.sync.apply import apply_update

        data = self.envelope(name, version, **aspects)
        apply_update(self.paths, name, data)
        return self.versions[name]

    def start(self, name: str, agent: Path | str, runtime: str, *extra: str,
              timeout: float = 30) -> subprocess.CompletedProcess:
        self.started.append(name)
        return self.run("start", name, "--agent", str(agent), "--runtime", runtime, *extra,
                        timeout=timeout)

    def start_ok(self, name: str, agent: Path | str, runtime: str, *extra: str) -> dict:
        result = self.start(name, agent, runtime, *extra)
        assert result.returncode == 0, f"start failed: {result.stderr.strip()}"
        return self.status(name)

    def status(self, name: str) -> dict:
        result = self.run("--json", "status", name)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def logs(self, name: str) -> str:
        result = self.run("logs", name)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def wait_log(self, name: str, text: str, timeout: float = 10, seen: int = 0) -> str:
        """The log once it holds `text` more than `seen` times: the log is kept across
        runs, so a run started again waits for one more than its log held before."""
        return wait_for(lambda: out if (out := self.logs(name)).count(text) > seen else None,
                        timeout, what=f"{text!r} in the log of {name}")

    def wait_exited(self, name: str, timeout: float = 10) -> dict:
        return wait_for(lambda: (s := self.status(name))["state"] == "exited" and s, timeout,
                        what=f"{name} to exit")

    def exit_record(self, name: str) -> dict | None:
        try:
            return json.loads(self.paths.sandbox(name).exit_record.read_text())
        except FileNotFoundError:
            return None

    def runtime_root(self, runtime: str) -> Path:
        return self.paths.runtime / "oci" / runtime

    def container_state(self, runtime: str, name: str) -> dict | None:
        result = subprocess.run([shutil.which(runtime), "--root", str(self.runtime_root(runtime)),
                                 "state", f"tappass-{name}"], capture_output=True, text=True,
                                timeout=patience.seconds(10))
        return json.loads(result.stdout) if result.returncode == 0 else None

    def containers(self, runtime: str) -> list[str]:
        root = self.runtime_root(runtime)
        if not root.is_dir():
            return []
        result = subprocess.run([shutil.which(runtime), "--root", str(root), "list", "-q"],
                                capture_output=True, text=True, timeout=patience.seconds(10))
        return result.stdout.split()

    def make_machine_key(self) -> Path:
        key = self.paths.machine_key
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_text(FAKE_MACHINE_KEY)
        key.chmod(0o600)
        return key

    # --- cleanup -------------------------------------------------------------

    def cleanup(self) -> None:
        """Stop whatever the test started; kill leftovers by their recorded pids."""
        try:
            for name in dict.fromkeys(self.started):
                if SANDBOX_NAME.fullmatch(name):  # a bad name a test tried created nothing
                    self._cleanup_sandbox(name)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def _cleanup_sandbox(self, name: str) -> None:
        sandbox = self.paths.sandbox(name)
        state_path = sandbox.runtime / "state.json"
        try:
            state = json.loads(state_path.read_text())
        except (FileNotFoundError, ValueError):
            state = {}
        if state and not state.get("foreground"):
            try:
                self.run("stop", name, "--timeout", "1", timeout=20)
            except subprocess.TimeoutExpired:
                pass
        for runtime in RUNTIMES:
            if self.runtime_root(runtime).is_dir() and shutil.which(runtime):
                subprocess.run([shutil.which(runtime), "--root", str(self.runtime_root(runtime)),
                                "delete", "--force", f"tappass-{name}"],
                               capture_output=True, timeout=patience.seconds(20))
        pid = state.get("conmon_pid")
        if pid and _is_ours(pid, self.root):
            if not process_alive(state.get("pid")):  # stopped: its exit hook may still run
                wait_ended(pid, "conmon", patience.seconds(10))
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _is_ours(pid: int, root: Path) -> bool:
    """A conmon of this host: its command line names our state dir."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return str(root).encode() in cmdline


def new_host() -> Host:
    require_root()
    root = Path(tempfile.mkdtemp(prefix="tp-", dir="/tmp"))
    root.chmod(0o755)
    host = Host(root=root)
    host.configure("")
    return host


@pytest.fixture
def host():
    h = new_host()
    try:
        yield h
    finally:
        h.cleanup()
