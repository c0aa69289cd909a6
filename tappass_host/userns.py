"""The user's own user namespace, where rootless tappass-host does its work
(DESIGN §8), entered by every command that touches the state.

It is laid out as rootless podman lays out its own: uid 0 there is the user,
1..N are the user's subordinate ids from /etc/subuid and /etc/subgid, mapped
by `newuidmap`/`newgidmap`; without a range, only the user's own id (the
single-id fallback of tappass_host.ids). A pause process (`sleep infinity`,
shown as tappass-host-pause, with an empty environment) holds the namespace
and its mount namespace between commands, so that `status`, `logs` and `stop`
from any shell of the user see the sandboxes `start` made. Its pid file
(HostPaths.pause_pid) names it with its start time, the boot and the inodes
of both namespaces; a file that no longer names a live pause process (it
was killed, the host rebooted) is stale. Then a process still inside the
recorded namespaces (a sandbox's conmon, the daemon) is looked for: a new
pause process joins it, so running sandboxes stay reachable; without one, a
new namespace is made.

A command joins the namespaces in its own process (setns), before any thread
starts: nothing is executed again, so argv and the environment stay as they
were given, and a command that needs no state (`--help`, `--version`,
`systemd print`) never pays for it. Root of the initial namespace, a process
already inside one (uid 0 there), and a process whose TAPPASS_IN_CRUN_NAMESPACE
is set (scripts/in-crun-namespace put it inside) are left as they are.

On a host whose cgroups are in hybrid mode (a cgroup2 mount at
/sys/fs/cgroup/unified beside the v1 hierarchies), crun refuses to run
(DESIGN §12); the namespace's mount namespace covers that mount with an empty
read-only tmpfs. No cgroup is delegated to a user there anyway (cgroup v1),
so nothing is lost. On pure cgroup v1 or v2 hosts this does nothing.
"""

import os

from tappass_host import libc
from tappass_host.errors import TappassError
from tappass_host.processes import boot_id

INSIDE_ENV = "TAPPASS_IN_CRUN_NAMESPACE"  # the mark scripts/in-crun-namespace sets
PAUSE_NAME = "tappass-host-pause"
SLEEP = ("/usr/bin/sleep", "/bin/sleep")
HYBRID_CGROUP2 = "/sys/fs/cgroup/unified"
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWUSER = 0x00020000, 0x04000000, 0x10000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
SYSCTLS = {
    "apparmor": "/proc/sys/kernel/apparmor_restrict_unprivileged_userns",
    "debian": "/proc/sys/kernel/unprivileged_userns_clone",
    "max": "/proc/sys/user/max_user_namespaces",
}


class UserNamespaceUnavailable(TappassError):
    """The user's namespace cannot be made or entered; says what an
    administrator must do."""


def needed() -> bool:
    return os.geteuid() != 0 and not os.environ.get(INSIDE_ENV)


def enter(paths) -> None:
    """Join the user's namespace (making it if needed) for this process;
    `paths`: the command's HostPaths, whose runtime dir holds the pid file."""
    if not needed():
        return
    try:
        cwd = os.getcwd()
    except FileNotFoundError:
        cwd = None
    paths.runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
    namespaces = _recorded(paths.pause_pid)
    if not isinstance(namespaces, tuple):
        from tappass_host import statefile

        with statefile.locked(paths.pause_lock):
            namespaces = _recorded(paths.pause_pid)
            if not isinstance(namespaces, tuple):
                namespaces = _new_pause(paths, namespaces)
    _join(*namespaces)
    os.environ[INSIDE_ENV] = "1"
    if cwd is not None:
        try:
            os.chdir(cwd)
        except OSError:
            os.chdir("/")


# --- the pid file ---------------------------------------------------------------------


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _start_time(pid: int) -> str:
    stat = _read(f"/proc/{pid}/stat")
    return stat[stat.rfind(")") + 2:].split()[19]


def _open_namespaces(pid: int, user_ino: int, mnt_ino: int) -> tuple[int, int] | None:
    """Open fds of `pid`'s user and mount namespaces if they are those inodes."""
    opened = []
    try:
        for kind, ino in (("user", user_ino), ("mnt", mnt_ino)):
            opened.append(os.open(f"/proc/{pid}/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC))
            if os.fstat(opened[-1]).st_ino != ino:
                break
        else:
            return opened[0], opened[1]
    except OSError:
        pass
    for fd in opened:
        os.close(fd)
    return None


def _recorded(pid_file) -> tuple[int, int] | tuple[int, int, None] | None:
    """The (user, mnt) namespace fds of the live pause process the pid file
    names; else, stale, a list [user inode, mnt inode] of what it recorded
    (None: no file, or one from another boot)."""
    try:
        pid, start, boot, user_ino, mnt_ino = pid_file.read_text().split()
        pid, user_ino, mnt_ino = int(pid), int(user_ino), int(mnt_ino)
    except (FileNotFoundError, ValueError):
        return None
    if boot != boot_id() or user_ino == os.stat("/proc/self/ns/user").st_ino:
        return None  # another boot's, or names our own (initial) namespace
    try:
        alive = _start_time(pid) == start
    except (OSError, IndexError):
        alive = False
    if alive:
        fds = _open_namespaces(pid, user_ino, mnt_ino)
        if fds is not None:
            return fds
    return [user_ino, mnt_ino]


def _survivor(user_ino: int, mnt_ino: int) -> int | None:
    """A process of ours still inside the recorded namespaces."""
    own = os.geteuid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if (entry.stat(follow_symlinks=False).st_uid == own
                    and os.stat(f"/proc/{entry.name}/ns/user").st_ino == user_ino
                    and os.stat(f"/proc/{entry.name}/ns/mnt").st_ino == mnt_ino):
                return int(entry.name)
        except OSError:
            continue
    return None


# --- the pause process ----------------------------------------------------------------


def _new_pause(paths, stale: list | None) -> tuple[int, int]:
    """Start a pause process (in the namespaces a survivor of the stale
    record holds, else in new ones), record it, and open its namespaces."""
    from tappass_host import statefile

    join = None
    if stale is not None:
        survivor = _survivor(*stale)
        join = survivor and _open_namespaces(survivor, *stale)
    try:
        pid = _spawn(join)
    finally:
        for fd in join or ():
            os.close(fd)
    user_ino = os.stat(f"/proc/{pid}/ns/user").st_ino
    mnt_ino = os.stat(f"/proc/{pid}/ns/mnt").st_ino
    record = f"{pid} {_start_time(pid)} {boot_id()} {user_ino} {mnt_ino}\n"
    statefile.write_runtime_file(paths.pause_pid, record.encode(), 0o600)
    fds = _open_namespaces(pid, user_ino, mnt_ino)
    if fds is None:
        raise UserNamespaceUnavailable("the pause process of your user namespace exited as it "
                                       "started")
    return fds


def _spawn(join: tuple[int, int] | None) -> int:
    """Fork the pause process (through a middle child, so that it belongs to
    no command) and, for a new namespace, write its id maps. Returns its pid.
    The pause process reports on `report`: 'U' once unshared, 'E<why>' if it
    fails; the pipe closes at its exec."""
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    middle = os.fork()
    if middle == 0:
        try:
            os.close(report_r)
            os.close(go_w)
            os.setsid()
            pause = os.fork()
            if pause == 0:
                _pause(report_w, go_r, join)
            os.write(report_w, f"P{pause}\n".encode())
        finally:
            os._exit(0)
    os.close(report_w)
    os.close(go_r)
    pid, unshared = None, False
    try:
        os.waitpid(middle, 0)
        with open(report_r, "rb", closefd=False) as report:
            for line in iter(report.readline, b""):
                kind, text = line[:1], line[1:].decode(errors="replace").strip()
                if kind == b"P":
                    pid = int(text)
                unshared = unshared or kind == b"U"
                if unshared and pid is not None:
                    unshared = False
                    _map_ids(pid)
                    os.write(go_w, b"g")
                if kind == b"E":
                    raise UserNamespaceUnavailable(f"cannot make your user namespace: {text}: "
                                                   f"{_advice()}")
        if pid is None:
            raise UserNamespaceUnavailable("cannot start the pause process of your user "
                                           "namespace")
        return pid
    except BaseException:
        if pid is not None:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        raise
    finally:
        os.close(report_r)
        os.close(go_w)


def _pause(report: int, go: int, join: tuple[int, int] | None) -> None:
    """The pause process, before it becomes `sleep infinity`. Never returns."""
    try:
        if join is not None:
            _call(libc.setns, join[0], CLONE_NEWUSER, what="setns(user)")
            _call(libc.setns, join[1], CLONE_NEWNS, what="setns(mnt)")
        else:
            _call(libc.unshare, CLONE_NEWUSER | CLONE_NEWNS, what="unshare(user, mount)")
            os.write(report, b"U\n")
            if os.read(go, 1) != b"g":
                os._exit(1)
            # root here must have its capabilities (AppArmor's restriction
            # denies them): prove it on a namespace of the pause's own
            _call(libc.unshare, CLONE_NEWUTS, what="a capability in the new namespace")
            if _hybrid_cgroups():
                _call(libc.mount, "none", HYBRID_CGROUP2, "tmpfs",
                      MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0555",
                      what=f"covering {HYBRID_CGROUP2}")
        os.chdir("/")
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.closerange(3, report)
        os.closerange(report + 1, 65536)
        for sleep in SLEEP:
            if os.access(sleep, os.X_OK):
                os.execve(sleep, [PAUSE_NAME, "infinity"], {})
        os.close(report)
        import signal

        while True:
            signal.pause()
    except BaseException as exc:  # noqa: BLE001 - reported to the command that waits
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else repr(exc)
        try:
            os.write(report, f"E{why}".replace("\n", " ").encode()[:500] + b"\n")
        except OSError:
            pass
    finally:
        os._exit(1)


def _hybrid_cgroups() -> bool:
    return (not os.path.exists("/sys/fs/cgroup/cgroup.controllers")
            and os.path.ismount(HYBRID_CGROUP2))


def _map_ids(pid: int) -> None:
    """Container 0 -> the user, 1..N -> its subordinate ids (tappass_host.ids
    lays them out), through newuidmap/newgidmap; without a range, the user's
    own id only, written directly as a user may."""
    from tappass_host import ids

    uids, gids = ids.subordinate_ids()
    if min(uids.size, gids.size) == 0:
        for kind, own in (("uid", uids.own), ("gid", gids.own)):
            if kind == "gid":
                _write(f"/proc/{pid}/setgroups", "deny")
            _write(f"/proc/{pid}/{kind}_map", f"0 {own} 1\n")
        return
    import shutil
    import subprocess

    for tool, space in (("newuidmap", uids), ("newgidmap", gids)):
        found = shutil.which(tool)
        if found is None:
            raise UserNamespaceUnavailable(
                f"{tool} is not installed: an administrator must install it (Debian, Ubuntu: "
                "apt-get install uidmap; Fedora, RHEL: dnf install shadow-utils)")
        args = [str(v) for m in space.mappings()
                for v in (m["containerID"], m["hostID"], m["size"])]
        done = subprocess.run([found, str(pid), *args], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=30)
        if done.returncode != 0:
            why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            raise UserNamespaceUnavailable(f"{tool} failed ({why}): {_advice(tool)}")


def _write(path: str, text: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as exc:
        raise UserNamespaceUnavailable(f"cannot write {path}: {exc.strerror}: {_advice()}") \
            from None


def _sysctl(name: str) -> str | None:
    try:
        return _read(SYSCTLS[name]).strip()
    except OSError:
        return None


def _advice(tool: str | None = None) -> str:
    """What an administrator must do, as this host's settings tell."""
    if _sysctl("apparmor") == "1":
        return ("AppArmor restricts unprivileged user namespaces here "
                "(kernel.apparmor_restrict_unprivileged_userns=1): an administrator must give "
                "tappass-host an AppArmor profile that allows `userns,` (as Ubuntu ships for "
                "podman) or set kernel.apparmor_restrict_unprivileged_userns=0")
    if _sysctl("debian") == "0":
        return ("unprivileged user namespaces are disabled: an administrator must set "
                "kernel.unprivileged_userns_clone=1")
    if _sysctl("max") == "0":
        return ("user namespaces are disabled: an administrator must set "
                "user.max_user_namespaces to a positive number")
    if tool is not None:
        return (f"an administrator must make {tool} setuid root (or give it "
                f"cap_set{tool[3:6]}=ep) and give this user a range in /etc/sub{tool[3:6]}")
    return "an administrator must allow unprivileged user namespaces on this host"


# --- joining ---------------------------------------------------------------------------


def _call(function, *args, what: str) -> None:
    try:
        function(*args)
    except OSError as exc:
        raise OSError(exc.errno, f"{what}: {exc.strerror}") from None


def _join(user_fd: int, mnt_fd: int) -> None:
    """setns into the user, then the mount namespace (which moves the root
    and the working directory to its own; the caller goes back)."""
    try:
        try:
            _call(libc.setns, user_fd, CLONE_NEWUSER, what="setns(user)")
            _call(libc.setns, mnt_fd, CLONE_NEWNS, what="setns(mnt)")
        except OSError as exc:
            if exc.errno == 22 and _threads() > 1:
                raise UserNamespaceUnavailable(
                    "cannot enter your user namespace from a process that runs threads") from None
            raise UserNamespaceUnavailable(f"cannot enter your user namespace: {exc.strerror}: "
                                           f"{_advice()}") from None
    finally:
        os.close(user_fd)
        os.close(mnt_fd)


def _threads() -> int:
    for line in _read("/proc/self/status").splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 1
