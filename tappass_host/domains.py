"""Domain patterns of `network.allow_domains`: exact names and `*.` suffixes.

Patterns are compared case-insensitively in their IDNA (punycode) form; an
IP literal is allowed and matches only itself.
"""

import ipaddress
import re

_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


class BadDomainPattern(ValueError):
    pass


def _ascii_name(name: str) -> str:
    try:
        ascii_name = name.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise BadDomainPattern(f"{name!r} is not a valid domain name") from None
    labels = ascii_name.split(".")
    if len(ascii_name) > 253 or len(labels) < 2 and ascii_name != "localhost":
        raise BadDomainPattern(f"{name!r} is not a fully qualified domain name")
    if not all(_LABEL.fullmatch(label) for label in labels):
        raise BadDomainPattern(f"{name!r} is not a valid domain name")
    return ascii_name


def normalize_pattern(pattern: str) -> str:
    """The canonical form of a pattern, or BadDomainPattern saying why not."""
    if not isinstance(pattern, str) or not pattern or pattern != pattern.strip():
        raise BadDomainPattern(f"{pattern!r} is not a domain pattern")
    try:
        return str(ipaddress.ip_address(pattern.strip("[]")))
    except ValueError:
        pass
    if pattern.startswith("*."):
        return "*." + _ascii_name(pattern[2:])
    if "*" in pattern:
        raise BadDomainPattern(f"{pattern!r}: a wildcard is only allowed as a leading '*.'")
    return _ascii_name(pattern)


def matches(pattern: str, host: str) -> bool:
    """Does normalized `pattern` allow `host` (which may be non-ASCII)? A host
    is a name, never a pattern: one with a `*` matches nothing."""
    if "*" in host:
        return False
    try:
        name = normalize_pattern(host)
    except BadDomainPattern:
        return False
    if pattern.startswith("*."):
        return name.endswith(pattern[1:]) and len(name) > len(pattern) - 1
    return name == pattern
