"""Agent ids: who the agent is, inside the sandbox and as this host sees it
(DESIGN §8).

Root mode: each sandbox's agent gets its own host UID/GID, allocated once
from config `agent_id_range` and recorded in sandbox.json, moved only when
they may no longer be the agent's (_given_up); no user namespace.

Rootless mode: the sandbox gets a user namespace laid out as rootless podman
lays out its own: container id 0 is the user, container ids 1..N are the
user's subordinate ids in order (/etc/subuid, /etc/subgid). The agent runs
as a container id of its own among 1..N, allocated once per sandbox and
recorded like a root-mode id, so it is a distinct subordinate id on the host.
tappass-host runs inside such a namespace (uid 0 there): the command line
enters the user's own (tappass_host.userns, laid out from subordinate_ids()),
as `unshare --map-root-user --map-auto` or `podman unshare` would. Its layout
is read from /proc/self/uid_map and the container's ids are exactly the ids
here. Only its root can give the keyring and workspace to the agent's
subordinate ids, so a plain user with subordinate ids outside it is refused.
Without subordinate ids, the single-id fallback: the agent runs as container
id FALLBACK_AGENT_ID, mapped to the user's own id (the identity layer warns).

Allocation runs under a host-wide lock and reads every record, so two
sandboxes never share an id even when started concurrently.
"""

import os
from collections import namedtuple

from tappass_host import sandbox_record
from tappass_host import statefile
from tappass_host.errors import TappassError
from tappass_host.paths import HostPaths, is_rootless

FALLBACK_AGENT_ID = 1000
SUBORDINATE_IDS = "/etc/sub{kind}id"  # kind: u or g
ROOTLESS_FIRST_AGENT_ID = 1000  # below it, container ids look like the host's system users


class NoFreeIds(TappassError):
    pass


class RootlessUnsupported(TappassError):
    pass


class IdSpace(namedtuple("IdSpace", "own subordinate")):
    """The ids this process can give a sandbox, in this process's numbering:
    its own (int), and its subordinate ranges as (start, count) pairs."""

    __slots__ = ()

    @property
    def size(self) -> int:
        return sum(count for _, count in self.subordinate)

    def mappings(self) -> tuple[dict, ...]:
        """Container 0 -> our own id; container 1..N -> the subordinate ids."""
        out, container = [{"containerID": 0, "hostID": self.own, "size": 1}], 1
        for start, count in self.subordinate:
            out.append({"containerID": container, "hostID": start, "size": count})
            container += count
        return tuple(out)


def _proc_map(kind: str, own: int) -> IdSpace:
    """Inside a user namespace where we are uid 0: every mapped id but ours."""
    with open(f"/proc/self/{kind}_map") as f:
        return parse_id_map(f.read(), own)


def parse_id_map(text: str, own: int) -> IdSpace:
    """/proc/self/uid_map or gid_map -> the ids mapped here, ours apart."""
    ranges = []
    for line in text.splitlines():
        inside, _, count = (int(x) for x in line.split())
        if inside <= own < inside + count:
            ranges += [(inside, own - inside), (own + 1, inside + count - own - 1)]
        else:
            ranges.append((inside, count))
    return IdSpace(own, tuple(sorted(r for r in ranges if r[1] > 0)))


def _subid_file(kind: str, own: int) -> IdSpace:
    """A plain user: our own id and our lines of /etc/sub{u,g}id."""
    import pwd

    try:
        names = {str(os.geteuid()), pwd.getpwuid(os.geteuid()).pw_name}
    except KeyError:
        names = {str(os.geteuid())}
    return IdSpace(own, tuple((start, count) for owner, start, count in _subid_lines(kind)
                              if owner in names))


def _subid_lines(kind: str) -> list[tuple[str, int, int]]:
    """(owner, start, count) of each line of /etc/sub{u,g}id."""
    lines = []
    try:
        # errors="replace": a stray byte spoils only its own line (no name matches it)
        with open(SUBORDINATE_IDS.format(kind=kind[0]), errors="replace") as f:
            for line in f:
                fields = line.strip().split(":")
                if len(fields) == 3 and fields[1].isdecimal() and fields[2].isdecimal():
                    lines.append((fields[0], int(fields[1]), int(fields[2])))
    except FileNotFoundError:
        pass
    return lines


def _delegated() -> dict:
    """Every user's subordinate ranges, by kind (uid, gid)."""
    return {kind: _subid_lines(kind) for kind in ("uid", "gid")}


def _delegation(uid: int, gid: int, ranges: dict) -> str | None:
    """Whose subordinate ids `uid` or `gid` are, said in words (None: no
    one's). A root-mode agent's ids must be no user's subordinate ids: that
    user could map them in a user namespace of its own and be the agent on
    this host (signal it, write its workspace). On a stock Debian, the second
    user given subordinate ids gets 165536-231071, which covers the start of
    the default agent_id_range."""
    for kind, agent_id in (("uid", uid), ("gid", gid)):
        for owner, start, count in ranges[kind]:
            if start <= agent_id < start + count:
                return (f"agent {kind} {agent_id} is one of {owner!r}'s subordinate ids "
                        f"(/etc/sub{kind}: {start}-{start + count - 1})")
    return None


def id_spaces() -> tuple[IdSpace, IdSpace]:
    """(uids, gids) this rootless process can map into a sandbox."""
    if os.geteuid() == 0:
        return _proc_map("uid", 0), _proc_map("gid", os.getegid())
    uids, gids = subordinate_ids()
    if min(uids.size, gids.size) > 0:
        # The keyring and workspace must belong to the agent's subordinate ids,
        # which only root of the user's namespace can chown to.
        raise RootlessUnsupported(
            "with subordinate ids, rootless tappass-host runs inside your user namespace, which "
            "the tappass-host command enters itself; this process is outside it (unset "
            "TAPPASS_IN_CRUN_NAMESPACE if you set it)")
    return uids, gids


def subordinate_ids() -> tuple[IdSpace, IdSpace]:
    """A plain user's (uids, gids): its own and its /etc/subuid, /etc/subgid ranges."""
    return _subid_file("uid", os.geteuid()), _subid_file("gid", os.getegid())


# uid, gid: process.user inside the sandbox; owner_uid, owner_gid: the same ids as this
# process numbers them (for chown); uid_mappings, gid_mappings: rootless only; moved: why
# the sandbox's recorded ids were given up for these (None: they were not)
AgentIds = namedtuple("AgentIds",
                      "uid gid owner_uid owner_gid uid_mappings gid_mappings moved",
                      defaults=((), (), None))


def _to_host(container_id: int, mappings: tuple[dict, ...]) -> int | None:
    for m in mappings:
        if m["containerID"] <= container_id < m["containerID"] + m["size"]:
            return m["hostID"] + container_id - m["containerID"]
    return None


def agent_ids(paths: HostPaths, name: str, id_range: tuple[int, int]) -> AgentIds:
    """The agent ids of sandbox `name`, allocating (and recording) them if needed."""
    if not is_rootless():
        record, moved = _allocate(paths, name, id_range, rootless=False)
        return AgentIds(record.agent_uid, record.agent_gid, record.agent_uid, record.agent_gid,
                        moved=moved)
    uids, gids = id_spaces()
    size = min(uids.size, gids.size)
    if size == 0:
        return _single_id(uids, gids)
    low = ROOTLESS_FIRST_AGENT_ID if size >= ROOTLESS_FIRST_AGENT_ID else 1
    record, moved = _allocate(paths, name, (low, size), rootless=True)
    uid_maps, gid_maps = uids.mappings(), gids.mappings()
    return AgentIds(record.agent_uid, record.agent_gid,
                    _to_host(record.agent_uid, uid_maps), _to_host(record.agent_gid, gid_maps),
                    uid_maps, gid_maps, moved)


def _single_id(uids: IdSpace, gids: IdSpace) -> AgentIds:
    """No subordinate ids: the agent is the user, seen as a non-zero id inside
    (the identity layer warns about it)."""
    return AgentIds(
        FALLBACK_AGENT_ID, FALLBACK_AGENT_ID, uids.own, gids.own,
        ({"containerID": FALLBACK_AGENT_ID, "hostID": uids.own, "size": 1},),
        ({"containerID": FALLBACK_AGENT_ID, "hostID": gids.own, "size": 1},))


def keyring_group(record) -> int | None:
    """The group the sandbox's keyring files belong to: the agent's, as this
    process numbers it (None: leave the group as is)."""
    if record.agent_gid is None or not is_rootless():
        return record.agent_gid
    uids, gids = id_spaces()
    if min(uids.size, gids.size) == 0:
        return gids.own  # the single-id fallback: the agent is us
    return _to_host(record.agent_gid, gids.mappings())


def _allocate(paths: HostPaths, name: str, id_range: tuple[int, int], rootless: bool):
    """(the record of `name`, with agent_uid/agent_gid allocated if absent,
    why its recorded ids were given up or None: _given_up)."""
    low, high = id_range
    paths.state.mkdir(parents=True, exist_ok=True)
    with statefile.locked(paths.agent_ids_lock):
        record = sandbox_record.load(paths, name)
        delegated = {"uid": (), "gid": ()} if rootless else _delegated()
        moved = None
        if record.agent_uid is not None and record.agent_gid is not None:
            moved = _given_up(record.agent_uid, record.agent_gid, id_range, rootless, delegated)
            if moved is None:
                return record, None
        used = set()
        for other in paths.sandbox_names():
            if other != name:
                rec = sandbox_record.load(paths, other)
                used.update(x for x in (rec.agent_uid, rec.agent_gid) if x is not None)
        free = next((i for i in range(low, high + 1)
                     if i not in used and _delegation(i, i, delegated) is None), None)
        if free is None:
            kind = "subordinate ids" if rootless else "agent_id_range"
            unless = "" if rootless else " that is no user's subordinate id (/etc/subuid, /etc/subgid)"
            raise NoFreeIds(f"no free agent id left in {kind} {low}-{high}{unless}")
        record = record._replace(agent_uid=free, agent_gid=free)
        sandbox_record.save(paths.sandbox(name), record)
        return record, moved


def _given_up(uid: int, gid: int, id_range: tuple[int, int], rootless: bool,
              delegated: dict) -> str | None:
    """Why recorded agent ids cannot stay, in words (None: they stay).
    Rootless: ids outside the ids we can map. As root: ids outside the
    configured agent_id_range (an operator who moves the range frees the old
    one, for users say: an agent left there would share their ids), and ids
    that are a user's subordinate ids (_delegation), which a new allocation
    passes over too."""
    low, high = id_range
    if rootless:
        return None if 1 <= min(uid, gid) and max(uid, gid) <= high \
            else f"agent ids {uid}:{gid} cannot be mapped"
    if not (low <= min(uid, gid) and max(uid, gid) <= high):
        return f"agent ids {uid}:{gid} lie outside agent_id_range {low}-{high}"
    return _delegation(uid, gid, delegated)


def check_runtime(agent: AgentIds, runtime: str) -> None:
    """runc refuses a user namespace whose root is unmapped, which the
    single-id fallback must leave so (its one id is the agent's)."""
    if runtime == "runc" and agent.uid_mappings and not any(
            m["containerID"] == 0 for m in agent.uid_mappings):
        raise RootlessUnsupported("runc cannot run a rootless sandbox without a subordinate id range (it "
                        "needs the container's root mapped, and this user's one id must be the "
                        "agent's): use --runtime crun, or add a range to /etc/subuid and "
                        "/etc/subgid")
