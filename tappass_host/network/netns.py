"""Network namespaces (pyroute2). A sandbox's, `/run/netns/tappass-<name>`,
holds loopback and one end of a veth pair with the link's sandbox address;
inside there is only the link's /30 — no default route — so the one thing
the agent can reach is the proxy at the other end. That other end lives in
the egress hub, `/run/netns/tappass.egress-<id>`, a namespace of the proxy
service's own holding nothing but these veths and the proxy's listening
sockets: were it the host's namespace, the agent could also reach every host
service listening on a wildcard address.

`Namespaces` runs in the proxy service (which keeps pyroute2 loaded: its
import costs ~140 ms) on one dedicated thread, which enters namespaces with
setns(2) — a thread's own namespace, so nothing forks and the rest of the
process stays in the host's — and always returns to where it started.
"""

import errno
import os
import socket
import threading
from contextlib import contextmanager

from tappass_host import libc
from tappass_host.network.addresses import NETNS_DIR, Link

SANDBOX_IFNAME = "eth0"
CLONE_NEWNET = 0x40000000


def path(nsname: str) -> str:
    return str(NETNS_DIR / nsname)


def exists(nsname: str) -> bool:
    return os.path.exists(path(nsname))


def _pyroute2():
    import pyroute2

    pyroute2.config.disable_mp_signal = True  # pyroute2's forked children: SIGTERM just ends them
    return pyroute2


class Namespaces:
    """Sandbox namespaces and their links to the hub. Use from one thread."""

    def __init__(self, hub: str):
        self.hub = hub
        self._home: int | None = None
        self._thread: int | None = None
        self._hub_rtnl = None

    # --- entering namespaces (this thread only) ------------------------------

    def _check_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.get_ident()
            self._home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        assert self._thread == threading.get_ident(), "Namespaces is used from one thread"

    def _setns(self, fd: int) -> None:
        libc.setns(fd, CLONE_NEWNET)

    @contextmanager
    def _inside(self, nsname: str):
        self._check_thread()
        fd = os.open(path(nsname), os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._setns(fd)
            try:
                yield
            finally:
                self._setns(self._home)
        finally:
            os.close(fd)

    @contextmanager
    def _new(self, nsname: str):
        """Inside a new namespace, bound at /run/netns/<nsname>."""
        self._check_thread()
        pyroute2 = _pyroute2()
        NETNS_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        libc.unshare(CLONE_NEWNET)
        try:
            pyroute2.netns.attach(nsname, f"{os.getpid()}/task/{threading.get_native_id()}")
            yield
        finally:
            self._setns(self._home)

    def _rtnl(self):
        """A netlink socket in the current namespace (its first request opens it)."""
        rtnl = _pyroute2().IPRoute()
        rtnl.link_lookup(ifname="lo")
        return rtnl

    def _hub(self):
        if self._hub_rtnl is None or not exists(self.hub):
            if self._hub_rtnl is not None:
                self._hub_rtnl.close()
            if not exists(self.hub):
                with self._new(self.hub):
                    with self._rtnl() as rtnl:
                        rtnl.link("set", index=rtnl.link_lookup(ifname="lo")[0], state="up")
            with self._inside(self.hub):
                self._hub_rtnl = self._rtnl()
        return self._hub_rtnl

    # --- what the service asks ------------------------------------------------

    def create(self, nsname: str, link: Link) -> None:
        """The sandbox's namespace and its link to the hub; on failure nothing
        is left."""
        self.remove(nsname, link)
        hub = self._hub()
        try:
            with self._new(nsname):
                inside = self._rtnl()
            with inside:
                inside.link("set", index=inside.link_lookup(ifname="lo")[0], state="up")
                self.remove_hub_end(link)  # of an earlier run, if still there
                hub.link("add", ifname=link.host_ifname, kind="veth",
                         peer={"ifname": SANDBOX_IFNAME, "net_ns_fd": nsname})
                index = hub.link_lookup(ifname=link.host_ifname)[0]
                hub.addr("add", index=index, address=link.host_address,
                         prefixlen=link.prefixlen)
                hub.link("set", index=index, state="up")
                index = inside.link_lookup(ifname=SANDBOX_IFNAME)[0]
                inside.addr("add", index=index, address=link.sandbox_address,
                            prefixlen=link.prefixlen)
                inside.link("set", index=index, state="up")
        except BaseException:
            self.remove(nsname, link)
            raise

    def remove(self, nsname: str, link: Link | None) -> None:
        """Remove the sandbox's namespace. The kernel then destroys it, and the
        veth pair with it, once no process is left inside, but lazily: the
        service also deletes the hub's end (remove_hub_end, ~30 ms of RCU
        wait, off the stop's path)."""
        self._check_thread()
        if exists(nsname):
            _pyroute2().netns.remove(nsname)

    def remove_hub_end(self, link: Link) -> None:
        if not exists(self.hub):
            return
        pyroute2 = _pyroute2()
        hub = self._hub()
        for index in hub.link_lookup(ifname=link.host_ifname):
            try:
                hub.link("del", index=index)
            except pyroute2.NetlinkError as exc:
                if exc.code != errno.ENODEV:  # gone meanwhile is fine
                    raise

    def remove_hub(self) -> None:
        self._check_thread()
        if self._hub_rtnl is not None:
            self._hub_rtnl.close()
            self._hub_rtnl = None
        if exists(self.hub):
            _pyroute2().netns.remove(self.hub)

    def listening_socket(self, address: str, port: int) -> socket.socket:
        """A TCP socket listening on `address:port` inside the hub."""
        self._hub()
        with self._inside(self.hub):
            # proto given: asyncio sets TCP_NODELAY only on sockets that say TCP,
            # and an accepted socket says what its listener said.
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address, port))
            sock.listen(1024)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock
