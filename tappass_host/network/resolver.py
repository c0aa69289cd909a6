"""Name resolution for the egress proxy: config `network.hosts_file` (a
hosts-format file, consulted first; re-read when it changes) then the system
resolver. The proxy resolves names itself, so the agent never chooses the
address it is connected to."""

import asyncio
import ipaddress
import os
import socket

from tappass_host.network.policy import Address, ip_literal


class HostsFile:
    def __init__(self, path: str):
        self.path = path
        self._stamp: tuple | None = None
        self._names: dict[str, list[Address]] = {}

    def lookup(self, name: str) -> list[Address]:
        if not self.path:
            return []
        self._refresh()
        return self._names.get(name.lower().rstrip("."), [])

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError:
            self._stamp, self._names = None, {}
            return
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        names: dict[str, list[Address]] = {}
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split("#", 1)[0].split()
                ip = ip_literal(fields[0]) if fields else None
                for name in fields[1:] if ip else ():
                    names.setdefault(name.lower().rstrip("."), []).append(ip)
        self._stamp, self._names = stamp, names


class Resolver:
    def __init__(self, hosts_file: str = "", timeout: float = 5.0):
        self.hosts = HostsFile(hosts_file)
        self.timeout = timeout

    async def resolve(self, name: str, port: int) -> list[Address]:
        """Every address of `name` (IDNA-encoded), hosts file first; [] if none."""
        ip = ip_literal(name)
        if ip is not None:
            return [ip]
        try:
            ascii_name = name.encode("idna").decode("ascii").lower()
        except UnicodeError:
            return []
        found = self.hosts.lookup(ascii_name)
        if found:
            return found
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(ascii_name, port, type=socket.SOCK_STREAM), self.timeout)
        except (OSError, asyncio.TimeoutError):
            return []
        return list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0])
                                  for info in infos))
