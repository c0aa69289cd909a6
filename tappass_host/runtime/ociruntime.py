"""The OCI runtime adapter: crun (default) or runc, each with its own
`--root` under tappass-host's runtime directory, driven by its CLI."""

import json
import os
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import NamedTuple

from tappass_host import paths, systemd
from tappass_host.errors import TappassError

RUNTIMES = ("crun", "runc")


class OCIRuntimeFailed(TappassError):
    """The OCI runtime is missing or failed."""


@cache
def _check_runtime_binary(name: str, binary: str) -> None:
    """A configured runtime path (config `runtime_path`) must be `name` itself:
    an executable whose `--version` says `<name> version …`."""
    problem = f"runtime_path {binary!r} is not the OCI runtime {name}"
    if not Path(binary).is_file() or not os.access(binary, os.X_OK):
        raise OCIRuntimeFailed(f"{problem}: not an executable file")
    try:
        result = subprocess.run([binary, "--version"], capture_output=True, timeout=10,
                                stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise OCIRuntimeFailed(f"{problem}: it does not run ({type(exc).__name__})") from None
    first = result.stdout.split(b"\n", 1)[0].decode("ascii", "replace")
    if result.returncode != 0 or not first.startswith(f"{name} version "):
        raise OCIRuntimeFailed(f"{problem}: its --version does not say '{name} version'")


class OCIRuntime(NamedTuple):
    name: str
    binary: str
    root: Path

    @classmethod
    def find(cls, name: str, runtime_dir: Path, path_override: str = "") -> "OCIRuntime":
        if name not in RUNTIMES:
            raise OCIRuntimeFailed(f"unknown runtime {name!r}: use one of {', '.join(RUNTIMES)}")
        binary = path_override or shutil.which(name)
        if path_override:
            _check_runtime_binary(name, path_override)
        elif not binary or not Path(binary).is_file():
            raise OCIRuntimeFailed(f"the OCI runtime {name!r} is not installed "
                                f"(apt-get install -y {name})")
        return cls(name=name, binary=binary, root=runtime_dir / paths.OCI_RUNTIME_STATE / name)

    def argv(self, *args: str) -> list[str]:
        return [self.binary, "--root", str(self.root), *systemd.cgroup_flags(), *args]

    def environ(self) -> dict[str, str] | None:
        """The environment each invocation runs in (None: ours)."""
        return systemd.runtime_environ()

    def _call(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            result = subprocess.run(self.argv(*args), capture_output=True, text=True,
                                    timeout=timeout, env=self.environ())
        except OSError as exc:
            raise OCIRuntimeFailed(f"cannot run {self.name} ({self.binary}): {exc.strerror}") from None
        if check and result.returncode != 0:
            message = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise OCIRuntimeFailed(f"{self.name} {args[0]} failed: {message}")
        return result

    def has_state(self, cid: str) -> bool:
        """Whether the runtime holds state for `cid` (crun and runc both keep
        it in `<root>/<cid>/`): lets callers skip a `delete` subprocess."""
        return (self.root / cid).exists()

    def state(self, cid: str) -> dict | None:
        result = self._call("state", cid, check=False)
        if result.returncode != 0:
            return None
        return json.loads(result.stdout)

    def start(self, cid: str) -> None:
        self._call("start", cid)

    def kill(self, cid: str, signal: str) -> None:
        self._call("kill", cid, signal, check=False)

    def delete(self, cid: str) -> None:
        self._call("delete", "--force", cid, check=False)

    def update(self, cid: str, resources: dict) -> None:
        """Apply new `linux.resources` to a running container."""
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
            json.dump(resources, f)
            f.flush()
            self._call("update", "--resources", f.name, cid)
