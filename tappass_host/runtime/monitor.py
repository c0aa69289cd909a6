"""conmon, the monitor (the one Podman uses): one tiny C process per
sandbox holds the agent's stdio, writes the k8s-file log with size-based
rotation, and records the exit code (and OOM) when the agent ends. No Python
process stays behind per sandbox; when the agent exits, conmon runs our exit
command once, which turns conmon's files into `exit.json` and an audit event.

The handshake: conmon gets a sync pipe (`_OCI_SYNCPIPE`), runs
`<runtime> create`, and writes `{"data": <pid>}` (or a negative value and a
message) to it; the caller then runs `<runtime> start`.
"""

import json
import os
from collections import namedtuple
from pathlib import Path

from tappass_host import paths
from tappass_host.errors import TappassError


class MonitorError(TappassError):
    pass


class MonitorFiles(namedtuple("MonitorFiles", "root")):
    """conmon's files for one sandbox, under `<runtime>/<name>/` (root: Path)."""

    __slots__ = ()

    @property
    def conmon_pid(self) -> Path:
        return self.root / paths.CONMON_PID

    @property
    def container_pid(self) -> Path:
        return self.root / paths.CONTAINER_PID

    @property
    def exits(self) -> Path:
        return self.root / paths.CONMON_EXITS

    @property
    def persist(self) -> Path:
        return self.root / paths.CONMON_PERSIST

    def exit_code(self) -> int | None:
        try:
            return int((self.persist / paths.CONMON_EXIT_CODE).read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    @property
    def oom_baseline(self) -> Path:
        return self.root / paths.OOM_BASELINE

    def oom_killed(self) -> bool:
        """conmon saw an OOM kill, or the counter that outlives the sandbox
        (attached.oom_counter) rose since the start: conmon misses the kill
        when the cgroup is gone before it reads it."""
        if (self.persist / paths.CONMON_OOM).exists():
            return True
        from tappass_host.runtime.attached import oom_kills

        try:
            counter, _, before = self.oom_baseline.read_text().rpartition("\n")
            return bool(counter) and oom_kills(Path(counter)) > int(before)
        except (OSError, ValueError):
            return False

    def note_oom_baseline(self, pid: int) -> None:
        """Keep the OOM-kill counter of the agent `pid`'s sandbox, as it is now."""
        from tappass_host.runtime.attached import oom_counter, oom_kills

        counter = oom_counter(pid)
        if counter is not None:
            self.oom_baseline.write_text(f"{counter}\n{oom_kills(counter)}")


def find_conmon(override: str = "") -> str:
    import shutil

    binary = override or shutil.which("conmon")
    if not binary:
        raise MonitorError("conmon is not installed (apt-get install -y conmon)")
    return binary


def launch(runtime, conmon: str, cid: str, bundle: Path, files: MonitorFiles,
           log_path: Path, log_max_bytes: int, exit_command: list[str]) -> int:
    """Start conmon (which creates the container), return the agent's host pid.
    `runtime`: the sandbox's tappass_host.runtime.ociruntime.OCIRuntime."""
    import shutil
    import subprocess

    from tappass_host import systemd

    for directory in (files.exits, files.persist):
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
    runtime_log = files.root / paths.RUNTIME_LOG
    for stale in (files.conmon_pid, files.container_pid, files.root / paths.CONMON_OOM,
                  files.oom_baseline, runtime_log):
        stale.unlink(missing_ok=True)  # an earlier run's: never mistaken for this one's
    runtime.root.mkdir(parents=True, exist_ok=True)
    argv = [
        conmon, "--api-version", "1", "-c", cid, "-u", cid, "-n", cid,
        "-r", runtime.binary, "-b", str(bundle),
        "-p", str(files.container_pid), "-P", str(files.conmon_pid),
        "-l", f"k8s-file:{log_path}", "--log-size-max", str(log_max_bytes),
        "--exit-dir", str(files.exits), "-0", str(files.persist),
        "--socket-dir-path", str(files.root),
        "--runtime-arg", "--root", "--runtime-arg", str(runtime.root),
        # The runtime's own messages (runc warns under the systemd driver) go to
        # its log, not to the agent's, whose stdio the runtime shares.
        "--runtime-arg", "--log", "--runtime-arg", str(runtime_log),
        *[arg for flag in systemd.cgroup_flags() for arg in ("--runtime-arg", flag)],
        *(["--systemd-cgroup"] if systemd.manages_cgroups() else []),
        "--exit-command", exit_command[0],
    ]
    for arg in exit_command[1:]:
        argv += ["--exit-command-arg", arg]
    read_fd, write_fd = os.pipe()
    env = {**(runtime.environ() or os.environ), "_OCI_SYNCPIPE": str(write_fd)}
    try:
        # cwd: conmon drops an `oom` file in its working directory when the
        # agent is OOM-killed (beside persist/oom); keep it in the sandbox's
        # runtime dir, not wherever the CLI was started from.
        result = subprocess.run(argv, pass_fds=(write_fd,), env=env, check=False, timeout=60,
                                cwd=files.root, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    finally:
        os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        line = pipe.readline()
    try:
        message = json.loads(line)
    except ValueError:
        said = result.stderr.decode(errors="replace").strip().splitlines()
        raise MonitorError(f"conmon did not report the container for {cid} "
                           f"(is {runtime.name} working on this host?)"
                           + (f": {said[-1]}" if said else "")) from None
    pid = message.get("data", -1)
    if not isinstance(pid, int) or pid <= 0:
        from tappass_host.runtime.ociruntime import last_logged

        said = (message.get("message") or "").strip().splitlines()
        detail = said[-1] if said else last_logged(runtime_log)
        raise MonitorError(f"{runtime.name} could not create {cid}: {detail}")
    files.note_oom_baseline(pid)
    return pid
