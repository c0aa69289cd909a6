"""The OCI runtime adapter: crun (default) or runc, each with its own
`--root` under tappass-host's runtime directory, driven by its CLI."""

import json
import os
from functools import cache
from pathlib import Path

from tappass_host import paths, systemd
from tappass_host.errors import TappassError
from tappass_host.processes import wait_ended

RUNTIMES = ("crun", "runc")


class OCIRuntimeFailed(TappassError):
    """The OCI runtime is missing or failed."""


@cache
def _check_runtime_binary(name: str, binary: str) -> None:
    """A configured runtime path (config `runtime_path`) must be `name` itself:
    an executable whose `--version` says `<name> version …`."""
    import subprocess

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


def on_path(name: str) -> str | None:
    """shutil.which(name) for a bare name, without shutil's import (with bz2,
    lzma and zlib: 8M instructions of every `stop`, issue 13): the first
    executable file `name` in $PATH's directories (os.defpath without one)."""
    search = os.environ.get("PATH", os.defpath)
    for directory in search.split(os.pathsep) if search else ():
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return candidate
    return None


class OCIRuntime:
    """`name`: crun or runc; `binary` (str): its executable; `root` (Path): its
    --root. A plain class: typing.NamedTuple's import was 12M instructions of
    every `stop`, collections.namedtuple's class 0.4M (issue 13)."""
    __slots__ = ("name", "binary", "root")

    def __init__(self, name: str, binary: str, root: Path):
        self.name, self.binary, self.root = name, binary, root

    @classmethod
    def find(cls, name: str, runtime_dir: Path, path_override: str = "") -> "OCIRuntime":
        if name not in RUNTIMES:
            raise OCIRuntimeFailed(f"unknown runtime {name!r}: use one of {', '.join(RUNTIMES)}")
        binary = path_override or on_path(name)
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

    def _call(self, *args: str, check: bool = True, timeout: float = 30):
        """The runtime's subprocess.CompletedProcess (text)."""
        import subprocess

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

    def start(self, cid: str, log: Path | None = None) -> None:
        """`log`: the runtime's messages go to that file (paths.RUNTIME_LOG),
        and the runtime is spawned, not run by subprocess (issue 13)."""
        if log is None:
            self._call("start", cid)
            return
        if self.spawn("--log", str(log), "start", cid).wait() != 0:
            raise OCIRuntimeFailed(f"{self.name} start failed: {last_logged(log)}")

    def kill(self, cid: str, signal: str) -> None:
        self._run_unread("kill", cid, signal)

    def delete(self, cid: str) -> None:
        self.begin_delete(cid).wait()

    def begin_delete(self, cid: str) -> "Spawned":
        """`delete --force` under way, for a caller with other work to do meanwhile."""
        return self.spawn("delete", "--force", cid)

    def _run_unread(self, *args: str, timeout: float = 30) -> None:
        """Run the runtime where neither its output nor its status is read
        (kill, delete: what they leave is checked by their callers)."""
        self.spawn(*args).wait(timeout)

    def spawn(self, *args: str, output: bool = False) -> "Spawned":
        """The runtime started with `args` through posix_spawn: subprocess's
        import was a tenth of every `stop` (issue 13). Its output is ours with
        `output`, else /dev/null; its stdin /dev/null; SIGPIPE and SIGXFSZ,
        which Python ignores, are the defaults again, as subprocess makes them."""
        from _signal import SIGPIPE, SIGXFSZ

        self.root.mkdir(parents=True, exist_ok=True)
        argv = self.argv(*args)
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        actions = [(os.POSIX_SPAWN_DUP2, null, 0)]
        if not output:
            actions += [(os.POSIX_SPAWN_DUP2, null, 1), (os.POSIX_SPAWN_DUP2, null, 2)]
        try:
            pid = os.posix_spawn(argv[0], argv, self.environ() or os.environ,
                                 file_actions=actions, setsigdef=(SIGPIPE, SIGXFSZ))
        except OSError as exc:
            raise OCIRuntimeFailed(f"cannot run {self.name} ({self.binary}): {exc.strerror}") from None
        finally:
            os.close(null)
        return Spawned(pid, f"{self.name} {args[0]}")

    def update(self, cid: str, resources: dict) -> None:
        """Apply new `linux.resources` to a running container."""
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
            json.dump(resources, f)
            f.flush()
            self._call("update", "--resources", f.name, cid)


class Spawned:
    """A runtime invocation under way (OCIRuntime.spawn)."""
    __slots__ = ("pid", "what", "code")

    def __init__(self, pid: int, what: str):
        self.pid, self.what, self.code = pid, what, None

    def wait(self, timeout: float | None = 30) -> int:
        """Its exit code once it ends; past `timeout` seconds (None: no limit)
        it is killed and OCIRuntimeFailed raised."""
        if self.code is None and timeout is not None and not wait_ended(self.pid, None, timeout):
            from _signal import SIGKILL

            os.kill(self.pid, SIGKILL)
            self._reap()
            raise OCIRuntimeFailed(f"{self.what} did not finish in {timeout:g} s")
        return self._reap()

    def _reap(self) -> int:
        if self.code is None:
            try:
                _, status = os.waitpid(self.pid, 0)
                self.code = os.waitstatus_to_exitcode(status)
            except ChildProcessError:  # reaped already (as subprocess allows for)
                self.code = 0
        return self.code


def last_logged(log: Path) -> str:
    """The last line the runtime logged to its `--log` file (paths.RUNTIME_LOG),
    without runc's `time=… level=…` frame."""
    try:
        lines = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        lines = []
    if not lines:
        return "(no message)"
    line = lines[-1]
    if 'msg="' in line:
        line = line.split('msg="', 1)[1].rsplit('"', 1)[0]
    return line
