"""Host processes: whether one is alive, which boot this is, whether a
namespace is the host's, and waiting for a condition."""

import os
import time


def process_alive(pid: int | None, comm: str | None = None) -> bool:
    """Whether `pid` runs and is no zombie (and, given `comm`, is that program)."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    state = stat[stat.rfind(")") + 2:][:1]
    if state in ("Z", "X"):
        return False
    return comm is None or stat[stat.find("(") + 1:stat.rfind(")")] == comm


def wait_ended(pid: int | None, comm: str | None, timeout: float) -> bool:
    """Wait until `pid` (given `comm`, that program) has ended, a zombie
    included: woken by its pidfd at the moment it does, not by a poll up to
    20 ms late (issue 13); False on timeout. Polls (wait_until) where there
    is no pidfd."""
    if not process_alive(pid, comm):
        return True
    try:
        fd = os.pidfd_open(pid)
    except (OSError, AttributeError):  # gone already, or no pidfd (kernel < 5.3)
        return wait_until(lambda: not process_alive(pid, comm), timeout)
    try:
        if not process_alive(pid, comm):  # gone, or the pid is another process's now
            return True
        import select

        poll = select.poll()
        poll.register(fd, select.POLLIN)
        return bool(poll.poll(timeout * 1000)) or not process_alive(pid, comm)
    finally:
        os.close(fd)


def boot_id() -> str:
    """This boot's id: it changes with every boot, so a pid or a run recorded
    with it is known to be from this boot or an earlier one."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


# The host's network namespace, as init, this process and this thread hold it.
HOST_NETNS = ("/proc/1/ns/net", "/proc/self/ns/net", "/proc/thread-self/ns/net")


def is_host_netns(target: os.stat_result) -> bool:
    """Whether `target` (an fstat of a namespace file) is the host's network namespace."""
    for host in HOST_NETNS:
        try:
            known = os.stat(host)
        except OSError:
            continue
        if (target.st_dev, target.st_ino) == (known.st_dev, known.st_ino):
            return True
    return False


def wait_until(predicate, timeout: float, max_delay: float = 0.02) -> bool:
    """Poll `predicate` with a growing delay (up to `max_delay`) until it is
    true (True) or `timeout` seconds have passed (False). The cap bounds how
    late a wait sees its condition (e.g. `stop`, waiting out the exit hook);
    a poll is a file read, 50 of them a second cost nothing."""
    deadline = time.monotonic() + timeout
    delay = min(0.005, max_delay)
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, max_delay)
    return True
