"""A real `tappass-devplane serve` for tests, and a runner for the real host CLI.

Use it from a test module with

    from devplane_fixture import *  # noqa: F403

which brings the fixtures `devplane` (a devplane serving HTTPS on 127.0.0.1
at a free port, SSE keepalive every 0.5 s, stopped after the test),
`make_devplane(name, keepalive=, cert_ttl=)` for more of them, and
`host_state` (an empty host state dir with an empty config file), plus
`run_host(host, *args)` (the real `tappass-host` CLI in a subprocess),
`new_host_state`, `wait_for` and `Devplane` itself. Every `timeout` here is in the
reference machine's seconds, scaled by `patience`.
"""

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import patience
from tappass_host.devplane import keyrings
from tappass_host.devplane.state import DevplaneState
from tappass_host.paths import HostPaths

PYTHON = sys.executable
ENV = {k: v for k, v in os.environ.items()
       if not k.startswith(("TAPPASS_", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy",
                            "ALL_PROXY", "all_proxy"))}

__all__ = ["Devplane", "HostState", "PYTHON", "b64url", "claims_of", "devplane", "host_state",
           "make_devplane", "new_host_state", "run_host", "wait_for"]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def claims_of(url: str) -> dict:
    token = url.rsplit("/", 1)[1]
    part = token.split(".")[0]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


class Devplane:
    """`tappass-devplane serve` in a subprocess, with its state at `root`."""

    def __init__(self, root: Path, keepalive: float = 0.5, cert_ttl: float = 86400):
        self.root = Path(root)
        self.keepalive = keepalive
        self.cert_ttl = cert_ttl
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.port = 0
        self.state = DevplaneState.open(self.root)

    def start(self, port: int | None = None, timeout: float = 15.0) -> "Devplane":
        listen = f"127.0.0.1:{self.port if port is None else port}"
        log = open(self.root.parent / f"{self.root.name}.log", "ab")
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "tappass_host.devplane", "serve", "--state", str(self.root),
             "--listen", listen, "--keepalive", str(self.keepalive),
             "--cert-ttl", str(self.cert_ttl)],
            stdout=subprocess.PIPE, stderr=log, env=ENV, text=True)
        log.close()
        timer = threading.Timer(patience.seconds(timeout), self.proc.kill)
        timer.start()
        try:
            line = self.proc.stdout.readline()
        finally:
            timer.cancel()
        if "serving on " not in line:
            self.proc.kill()
            raise RuntimeError(f"devplane did not start: {line!r}; see {log.name}")
        self.url = line.split("serving on ", 1)[1].strip()
        self.port = int(self.url.rsplit(":", 1)[1])
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(patience.seconds(10))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            self.proc.stdout.close()
        self.proc = None

    def restart(self) -> "Devplane":
        """Stop and serve again on the same port, from the same state."""
        self.stop()
        return self.start(port=self.port)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def trust_key(self) -> str:
        return self.state.trust_key

    @property
    def ca_pem(self) -> bytes:
        return self.state.ca.pem

    def bootstrap(self, name: str = "demo", ttl: int = 900, **times) -> str:
        """A registered enroll URL; `iat=`/`exp=`/`now=` make odd lifetimes."""
        return self.state.issue_bootstrap(name, ttl, self.url, **times)

    def cli(self, *args: str, check: bool = True, timeout: float = 30):
        result = subprocess.run([PYTHON, "-m", "tappass_host.devplane", *args,
                                 "--state", str(self.root)], capture_output=True, text=True,
                                env=ENV, timeout=patience.seconds(timeout))
        if check and result.returncode != 0:
            raise AssertionError(f"tappass-devplane {args} failed: {result.stderr}")
        return result

    def publish(self, name: str, policy: dict, ttl: int = 3600):
        """Publish in-process and notify the server (what `publish` does)."""
        done = keyrings.publish(self.state, name, policy, ttl=ttl)
        assert keyrings.notify(self.state), "the devplane did not take the rescan"
        return [published for _, published in done]

    def publish_raw(self, name: str, data: bytes, policy_version: int | None = None):
        done = keyrings.publish_raw(self.state, name, data, policy_version)
        assert keyrings.notify(self.state)
        return [published for _, published in done]


@dataclass
class HostState:
    root: Path
    config: Path

    @property
    def paths(self) -> HostPaths:
        return HostPaths.resolve(self.root)


def run_host(host: HostState, *args: str, input: str | None = None, timeout: float = 60,
             config: Path | None = None):
    """The real `tappass-host` CLI, in a subprocess."""
    return subprocess.run(
        [PYTHON, "-m", "tappass_host", "--state-dir", str(host.root),
         "--config", str(config or host.config), *args],
        capture_output=True, text=True, input=input, env=ENV, timeout=patience.seconds(timeout))


def _host_state(base: Path) -> HostState:
    base.mkdir(parents=True, exist_ok=True)
    config = base / "config.toml"
    config.write_text("")
    return HostState(root=base / "state", config=config)


@pytest.fixture
def host_state(tmp_path) -> HostState:
    return _host_state(tmp_path / "host")


def new_host_state(tmp_path: Path, name: str) -> HostState:
    return _host_state(tmp_path / name)


@pytest.fixture
def make_devplane(tmp_path):
    started = []

    def make(name: str = "devplane", keepalive: float = 0.5, cert_ttl: float = 86400) -> Devplane:
        plane = Devplane(tmp_path / name, keepalive=keepalive, cert_ttl=cert_ttl).start()
        started.append(plane)
        return plane

    yield make
    for plane in started:
        plane.stop()


@pytest.fixture
def devplane(make_devplane) -> Devplane:
    return make_devplane()


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02):
    deadline = time.monotonic() + patience.seconds(timeout)
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")
