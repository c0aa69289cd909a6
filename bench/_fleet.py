"""Shared plumbing of the daemon benchmarks (not a benchmark itself): a real
`tappass-devplane serve`, a private host state dir with sandboxes enrolled
through the real `init`, running a watcher agent under crun, and the real
`tappass-host daemon` holding their streams.

The watcher agent records, in its workspace, each policy_version it sees
and the wall-clock time it saw it (inotify on the keyring directory, the way
DESIGN §6 tells agents to watch it), so that latency is measured where the
agent is, not where the daemon is.
"""

import json
import subprocess
import time
from pathlib import Path

from _sandboxes import PYTHON, new_host, python_agent  # noqa: F401

from devplane_fixture import ENV, Devplane  # noqa: E402

POLICY = {"process": {"memory_mb": 256, "pids_max": 128, "cpu_millis": 500},
          "network": {"mode": "none"}, "secrets": {"BENCH_TOKEN": "bench"}}

WATCHER = r'''
import ctypes, json, os, time
path = os.environ["TAPPASS_KEYRING_PATH"]
out = open("/workspace/seen.log", "a", buffering=1)
last = None
def check():
    global last
    try:
        with open(path) as f:
            version = json.load(f)["policy_version"]
    except (OSError, ValueError, KeyError):
        return
    if version != last:
        last = version
        out.write(f"{version} {time.time_ns()}\n")
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.inotify_init1(0)
IN_CREATE, IN_MOVED_TO = 0x100, 0x80
if fd < 0 or libc.inotify_add_watch(fd, os.path.dirname(path).encode(), IN_CREATE | IN_MOVED_TO) < 0:
    raise SystemExit("inotify is not available")
check()
while True:
    os.read(fd, 65536)
    check()
'''


class Fleet:
    def __init__(self, count: int, keepalive: float = 15.0):
        self.host = new_host()
        self.host.configure(f"max_sandboxes = {count + 1}\n")
        self.devplane = Devplane(self.host.root / "devplane", keepalive=keepalive).start()
        self.agent = python_agent(self.host.root / "watcher", WATCHER)
        self.names: list[str] = []
        self.daemon: subprocess.Popen | None = None
        self.daemon_log = self.host.root / "daemon.log"

    def enroll(self, name: str) -> str:
        result = self.host.run("init", name, "--enroll-url", self.devplane.bootstrap(name),
                               "--trust-key", self.devplane.trust_key)
        assert result.returncode == 0, result.stderr
        return name

    def start(self, name: str, publish: bool = True) -> None:
        if publish:
            self.devplane.publish(name, POLICY)
        result = self.host.start(name, self.agent, "crun")
        assert result.returncode == 0, result.stderr
        self.names.append(name)

    def start_daemon(self) -> int:
        with open(self.daemon_log, "ab") as err:
            self.daemon = subprocess.Popen(self.host.argv("daemon"), stdin=subprocess.DEVNULL,
                                           stdout=subprocess.DEVNULL, stderr=err, env=ENV)
        deadline = time.monotonic() + 30
        while "daemon: ready" not in self.daemon_log.read_text():
            assert self.daemon.poll() is None and time.monotonic() < deadline, \
                self.daemon_log.read_text()
            time.sleep(0.05)
        return self.daemon.pid

    def seen(self, name: str) -> dict[int, int]:
        """policy_version -> ns wall-clock time the agent first saw it."""
        try:
            text = (self.host.paths.sandbox(name).workspace / "seen.log").read_text()
        except FileNotFoundError:
            return {}
        seen = {}
        for line in text.splitlines():
            version, at = line.split()
            seen.setdefault(int(version), int(at))
        return seen

    def wait_seen(self, name: str, version: int, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while True:
            at = self.seen(name).get(version)
            if at is not None:
                return at
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} never saw v{version}:\n"
                                     f"{self.daemon_log.read_text()[-2000:]}")
            time.sleep(0.001)

    def close(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.terminate()
            self.daemon.wait(15)
        self.devplane.stop()
        self.host.cleanup()


def json_dump(doc: dict) -> None:
    print(json.dumps(doc, indent=2))
