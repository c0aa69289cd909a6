"""The egress service: one process per tappass-host runtime dir serving every
proxy-mode sandbox (never a process per sandbox). It owns the sandboxes'
network plumbing too — namespaces, veths, listeners — because it keeps
pyroute2 loaded, which `start` cannot afford to import.

`start` spawns it on demand (so it works without the daemon) and talks to it
over `<runtime>/network/control.sock` (JSON lines, root only):
  {"op": "attach", "name"}  create the sandbox's namespace, link and listener
  {"op": "detach", "name"}  remove them (stop, the exit hook)
  {"op": "reap"}            remove those of sandboxes that are not running
When no sandbox has been attached for IDLE_EXIT_S it exits, unless it runs
as a service of its own (`tappass-host egress --no-idle-exit`, the unit
tappass-host-egress.service: READY=1 once the control socket listens). On
start it re-listens for sandboxes still running and removes what a killed
predecessor left of the others. On SIGTERM it closes every listener; the
hub and the sandboxes' namespaces stay while sandboxes still run, for the
next service to listen again.
"""

import asyncio
import json
import os
import resource
import signal
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tappass_host import network, statefile
from tappass_host.audit import AuditLog
from tappass_host.daemon.notify import sd_notify
from tappass_host.keyring.store import store_of
from tappass_host.network import addresses, netns
from tappass_host.network.addresses import Link
from tappass_host.network.denials import DenialLog
from tappass_host.network.proxy import EgressProxy, HEAD_LIMIT, SandboxPolicy
from tappass_host.network.resolver import Resolver
from tappass_host.network.settings import Settings
from tappass_host.paths import HostPaths
from tappass_host.runtime.runstate import is_running
from tappass_host.unixaddress import short_address

IDLE_EXIT_S = 60.0


@dataclass
class Attached:
    link: Link
    policy: SandboxPolicy
    server: asyncio.AbstractServer | None = None


class EgressService:
    def __init__(self, paths: HostPaths, settings: Settings):
        self.paths = paths
        self.settings = settings
        self.attached: dict[str, Attached] = {}
        self.namespaces = netns.Namespaces(network.hub_name(paths))
        self._by_address: dict[str, SandboxPolicy] = {}
        self._netlink = ThreadPoolExecutor(1, thread_name_prefix="netlink")
        self._audit = ThreadPoolExecutor(1, thread_name_prefix="audit")
        self._idle: asyncio.TimerHandle | None = None
        self._stopped = asyncio.Event()
        self.proxy = EgressProxy(self._by_address.get, Resolver(settings.hosts_file),
                                 DenialLog(self._append_audit), settings.header_timeout,
                                 frozenset(settings.allow_ports))

    # --- the process ---------------------------------------------------------

    async def run(self) -> None:
        directory = network.service_dir(self.paths)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        network.records_dir(self.paths).mkdir(mode=0o700, exist_ok=True)
        await self._recover()
        control = await asyncio.start_unix_server(self._control,
                                                  sock=_bound_control_socket(self.paths))
        statefile.write_atomic(network.pid_file(self.paths), f"{os.getpid()}\n".encode(), 0o644)
        sd_notify("READY=1")
        loop = asyncio.get_running_loop()
        # Not loop.add_signal_handler: its wakeup socket is inherited by any
        # child pyroute2 forks, and a SIGTERM pyroute2 sends such a child
        # would arrive here as ours.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: loop.call_soon_threadsafe(self._stopped.set))
        self._maybe_idle()
        try:
            await self._stopped.wait()
        finally:
            sd_notify("STOPPING=1")
            control.close()
            for attached in self.attached.values():
                if attached.server is not None:
                    attached.server.close()
            if _read_pid(network.pid_file(self.paths)) == os.getpid():
                network.pid_file(self.paths).unlink(missing_ok=True)
                network.control_socket(self.paths).unlink(missing_ok=True)
            if not network.recorded(self.paths):
                await self._in_netlink(self.namespaces.remove_hub)

    def _maybe_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if not self.attached and self.settings.idle_exit:
            self._idle = asyncio.get_running_loop().call_later(IDLE_EXIT_S, self._stopped.set)

    def _append_audit(self, event: str, sandbox: str, details: dict) -> None:
        def append():
            try:
                AuditLog.for_host(self.paths).append(event, sandbox=sandbox, details=details)
            except Exception as exc:  # noqa: BLE001 - a denial still stands unaudited
                print(f"egress: audit of {event} failed: {exc}", file=sys.stderr)

        self._audit.submit(append)

    async def _in_netlink(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._netlink, fn, *args)

    # --- control -------------------------------------------------------------

    async def _control(self, reader, writer) -> None:
        try:
            request = json.loads(await asyncio.wait_for(reader.readline(), 10))
            reply = await self._dispatch(request)
        except Exception as exc:  # noqa: BLE001 - one bad request must not end the service
            reply = {"error": str(exc) or type(exc).__name__}
        try:
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        finally:
            writer.close()

    async def _dispatch(self, request: dict) -> dict:
        op, name = request.get("op"), request.get("name")
        if op == "attach":
            network.check_name(name)
            await self._reap(keep=name)
            return await self._attach(name)
        if op == "detach":
            network.check_name(name)
            await self._detach(name)
            return {"ok": True}
        if op == "reap":
            return {"ok": True, "removed": await self._reap()}
        if op == "ping":
            return {"ok": True, "pid": os.getpid(), "attached": sorted(self.attached)}
        return {"error": f"unknown op {op!r}"}

    async def _attach(self, name: str) -> dict:
        await self._detach(name)
        link = await self._in_netlink(self._create, name)
        try:
            self._write_record(name, link)
            await self._listen(name, link)
        except BaseException:
            await self._detach(name, link)
            raise
        self._maybe_idle()
        return {"ok": True, "proxy_url": f"http://{link.host_address}:{self.settings.port}",
                "netns": netns.path(network.netns_name(name)),
                "address": link.sandbox_address}

    def _create(self, name: str) -> Link:
        with addresses.host_network_lock():
            link = addresses.allocate(self.paths, name, self.settings.pool)
            self.namespaces.create(network.netns_name(name), link)
        return link

    async def _listen(self, name: str, link: Link) -> None:
        policy = SandboxPolicy(name, store_of(self.paths.sandbox(name)))
        sock = await self._in_netlink(self.namespaces.listening_socket, link.host_address,
                                      self.settings.port)
        server = await asyncio.start_server(self.proxy.handle, sock=sock, limit=HEAD_LIMIT)
        self.attached[name] = Attached(link, policy, server)
        self._by_address[link.host_address] = policy

    async def _detach(self, name: str, link: Link | None = None) -> None:
        attached = self.attached.pop(name, None)
        if attached is not None:
            link = attached.link
            self._by_address.pop(link.host_address, None)
            attached.server.close()
            for writer in list(attached.policy.connections):
                writer.close()
        link = link or network.read_link(self.paths, name)
        await self._in_netlink(self.namespaces.remove, network.netns_name(name), link)
        network.record_file(self.paths, name).unlink(missing_ok=True)
        if link is not None:
            self._netlink.submit(self._remove_hub_end, link)  # not awaited: see netns.remove
        self._maybe_idle()

    def _remove_hub_end(self, link: Link) -> None:
        try:
            self.namespaces.remove_hub_end(link)
        except Exception as exc:  # noqa: BLE001 - the kernel removes it anyway
            print(f"egress: removing {link.host_ifname}: {exc}", file=sys.stderr)

    async def _reap(self, keep: str | None = None) -> list[str]:
        removed = []
        for name in sorted(set(self.attached) | set(network.recorded(self.paths))):
            if name != keep and not is_running(self.paths.sandbox(name)):
                await self._detach(name)
                removed.append(name)
        return removed

    async def _recover(self) -> None:
        """After a predecessor died: listen again for sandboxes still running."""
        for name in network.recorded(self.paths):
            link = network.read_link(self.paths, name)
            if link and is_running(self.paths.sandbox(name)) and \
                    netns.exists(network.netns_name(name)) and netns.exists(self.namespaces.hub):
                try:
                    await self._listen(name, link)
                    continue
                except OSError as exc:
                    print(f"egress: cannot listen again for {name}: {exc}", file=sys.stderr)
            await self._detach(name, link)

    def _write_record(self, name: str, link: Link) -> None:
        statefile.write_atomic(network.record_file(self.paths, name),
                               json.dumps({"name": name, **link.to_json()}).encode(), 0o600)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(paths: HostPaths, settings: Settings) -> None:
    _raise_fd_limit()
    asyncio.run(EgressService(paths, settings).run())


def _bound_control_socket(paths: HostPaths) -> socket.socket:
    path = network.control_socket(paths)
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    with short_address(path) as address:
        sock.bind(address)
    os.chmod(path, 0o600)
    return sock
