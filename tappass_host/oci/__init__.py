"""The OCI bundle: rendering, schema validation and the escalation invariants.

Field paths name a place in an OCI config the same way everywhere (errors,
layer provenance, `inspect`): object keys joined by dots, list items as
`[i]`, e.g. `process.user.uid`, `mounts[3]`, `linux.namespaces[4].path`.

Importing this package stays cheap: `schema` (jsonschema) is imported only
by whoever validates.
"""

from collections.abc import Iterable


def field_path(parts: Iterable[str | int]) -> str:
    path = ""
    for part in parts:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def parent_field(path: str) -> str:
    """`mounts[3]` -> `mounts`, `process.user.uid` -> `process.user`, `root` -> ``."""
    cut = max(path.rfind("."), path.rfind("["))
    return path[:cut] if cut > 0 else ""
