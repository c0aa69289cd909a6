"""The egress service's settings: the one mapping from config `network.*`,
and the command line of `python -m tappass_host.network` (what `start`
spawns) in both directions, so the two cannot drift apart."""

import argparse
from dataclasses import dataclass
from pathlib import Path

from tappass_host.paths import HostPaths


@dataclass(frozen=True)
class Settings:
    port: int
    pool: str
    hosts_file: str = ""
    header_timeout: float = 10.0
    allow_ports: tuple[int, ...] = (443, 80)
    # Spawned on demand it ends when idle; as a service of its own
    # (`tappass-host egress --no-idle-exit`, the systemd unit) it stays.
    idle_exit: bool = True

    @classmethod
    def from_config(cls, config, idle_exit: bool = True) -> "Settings":
        return cls(port=config["network.proxy_port"], pool=config["network.address_pool"],
                   hosts_file=config["network.hosts_file"],
                   header_timeout=float(config["network.header_timeout_s"]),
                   allow_ports=tuple(config["network.allow_ports"]), idle_exit=idle_exit)

    def argv(self, paths: HostPaths) -> list[str]:
        """The arguments of `python -m tappass_host.network` (see parse)."""
        return ["--state", str(paths.state), "--runtime", str(paths.runtime),
                "--port", str(self.port), "--pool", self.pool, "--hosts-file", self.hosts_file,
                "--header-timeout", str(self.header_timeout),
                "--allow-ports", ",".join(map(str, self.allow_ports)),
                *([] if self.idle_exit else ["--no-idle-exit"])]


def parse(argv: list[str] | None = None) -> tuple[HostPaths, Settings]:
    parser = argparse.ArgumentParser(prog="tappass-host-egress")
    parser.add_argument("--state", required=True)
    parser.add_argument("--runtime", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pool", required=True)
    parser.add_argument("--hosts-file", default="")
    parser.add_argument("--header-timeout", type=float, default=10.0)
    parser.add_argument("--allow-ports", type=_ports, default=(443, 80))
    parser.add_argument("--no-idle-exit", action="store_true")
    args = parser.parse_args(argv)
    return (HostPaths(state=Path(args.state), runtime=Path(args.runtime)),
            Settings(port=args.port, pool=args.pool, hosts_file=args.hosts_file,
                     header_timeout=args.header_timeout, allow_ports=args.allow_ports,
                     idle_exit=not args.no_idle_exit))


def _ports(text: str) -> tuple[int, ...]:
    return tuple(int(port) for port in text.split(",") if port)
