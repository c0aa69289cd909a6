"""The egress decision (DESIGN §6, `network.allow_domains`), as pure functions.

A name is allowed when a pattern of the sandbox's current keyring matches it
(exact or `*.` suffix, case-insensitive, IDNA: tappass_host.domains). Where it
may then connect is decided on the resolved addresses: a destination that is
not globally routable (loopback, private, link-local, multicast, reserved,
unspecified…) is refused unless the policy lists that very address — so a
public-looking name cannot be pointed at the host or its LAN through DNS. An
IP literal as the target is allowed only when listed. Only the ports of config
`network.allow_ports` are reached at all, so an allowed name's SSH or SMTP is not.
"""

import ipaddress
from dataclasses import dataclass

from tappass_host import domains

# Reasons, as audited in `network.denied`.
NOT_ALLOWED = "not_allowed"
PRIVATE_ADDRESS = "private_address"
IP_NOT_LISTED = "ip_not_listed"
PROXY_OFF = "proxy_off"
SNI_NOT_ALLOWED = "sni_not_allowed"
TLS_MALFORMED = "tls_malformed"
PORT_NOT_ALLOWED = "port_not_allowed"

DEFAULT_PORTS = frozenset({443, 80})
# IPv6 ranges Python's ipaddress counts as global that lead elsewhere: to an
# IPv4 address of a translator's choosing (NAT64 64:ff9b::/96 RFC 6052,
# local-use 64:ff9b:1::/48 RFC 8215; SIIT ::ffff:0:0:0/96 RFC 2765; 6to4
# 2002::/16 RFC 3056; IPv4-compatible ::/96, deprecated) or nowhere routable
# (site-local fec0::/10, deprecated by RFC 3879). An IPv4-mapped address is
# judged as the IPv4 address it is.
_NOT_GLOBAL_V6 = tuple(ipaddress.IPv6Network(n) for n in (
    "64:ff9b::/96", "64:ff9b:1::/48", "::ffff:0:0:0/96", "2002::/16", "::/96", "fec0::/10"))

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Policy:
    patterns: tuple[str, ...]        # normalized domain patterns
    addresses: frozenset[Address]    # IP literals the policy lists
    enabled: bool = True             # network.mode == "proxy"


def from_keyring(keyring: dict) -> Policy:
    """The policy of a verified keyring; a pattern that does not normalize
    (it passed verification, so only a newer domains module would say so) is
    dropped rather than widened."""
    network = keyring.get("network") or {}
    patterns, addresses = [], set()
    for raw in network.get("allow_domains") or ():
        try:
            pattern = domains.normalize_pattern(raw)
        except domains.BadDomainPattern:
            continue
        ip = ip_literal(pattern)
        if ip is not None:
            addresses.add(ip)
        else:
            patterns.append(pattern)
    return Policy(tuple(patterns), frozenset(addresses), network.get("mode") == "proxy")


def ip_literal(host: str) -> Address | None:
    try:
        return _unmapped(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None


def _unmapped(ip: Address) -> Address:
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped if mapped is not None else ip


def check_name(policy: Policy, host: str) -> str | None:
    """None if `host` (a name or an IP literal) may be asked for, else the reason."""
    if not policy.enabled:
        return PROXY_OFF
    ip = ip_literal(host)
    if ip is not None:
        return None if ip in policy.addresses else IP_NOT_LISTED
    if any(domains.matches(p, host) for p in policy.patterns):
        return None
    return NOT_ALLOWED


def check_server_name(policy: Policy, host: str, server_name: str | None) -> str | None:
    """None if a ClientHello sent through a tunnel to `host` may ask for
    `server_name` (its SNI): none at all, the tunnel's own host, or another
    name the policy allows; else the reason."""
    if server_name is None or check_name(policy, server_name) is None:
        return None
    try:
        if "*" not in server_name and \
                domains.normalize_pattern(server_name) == domains.normalize_pattern(host):
            return None
    except domains.BadDomainPattern:
        pass
    return SNI_NOT_ALLOWED


def check_port(allowed: frozenset[int], port: int) -> str | None:
    """None if `port` may be reached (config network.allow_ports), else the reason."""
    return None if port in allowed else PORT_NOT_ALLOWED


def is_public(ip: Address) -> bool:
    ip = _unmapped(ip)
    if ip.version == 6 and any(ip in net for net in _NOT_GLOBAL_V6):
        return False
    return ip.is_global and not ip.is_multicast


def pick_destination(policy: Policy, addresses: list[Address]) -> Address | str:
    """The first resolved address the policy lets us connect to, or the reason
    none qualifies."""
    for ip in addresses:
        ip = _unmapped(ip)
        if ip in policy.addresses or is_public(ip):
            return ip
    return PRIVATE_ADDRESS
