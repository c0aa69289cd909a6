"""Harness files: the agent framework's own permission file, rendered from
the keyring's `harness` aspect into the keyring version directory
(`harness/<runtime>/…`), so it flips with the keyring: one `..data` rename
makes the new keyring.json and the new harness files visible together.
Deterministic: the same keyring gives the same bytes.

An agent that needs keyring.json and a harness file *as a pair* must resolve
`..data` once and read both from that one version directory (open the
directory, then open each file relative to it): two opens through the two
top-level symlinks can straddle a flip.

What the aspect may hold beyond its schema is keyring acceptance:
tappass_host.keyring.harness_rules.
"""

import json

from tappass_host.keyring.harness_rules import CLAUDE_CODE
from tappass_host.layers import LayerInputs, LayerResult

GENERIC = "generic"


def _claude_code(permissions: dict) -> dict[str, dict]:
    settings = {"allow": permissions.get("allow", []), "deny": permissions.get("deny", [])}
    for key in ("ask", "defaultMode", "additionalDirectories", "disableBypassPermissionsMode"):
        if key in permissions:
            settings[key] = permissions[key]
    return {"settings.json": {"permissions": settings}}


def _generic(runtime: str, permissions: dict) -> dict[str, dict]:
    return {"permissions.json": {"runtime": runtime, "permissions": permissions}}


RENDERERS = {CLAUDE_CODE: _claude_code}


def render(keyring: dict) -> tuple[dict[str, bytes], tuple[str, ...]]:
    """(files relative to the version's harness/ directory, warnings)."""
    harness = keyring.get("harness")
    if not harness:
        return {}, ()
    runtime = harness.get("runtime", GENERIC)
    permissions = harness.get("permissions", {})
    renderer = RENDERERS.get(runtime)
    warnings: tuple[str, ...] = ()
    if renderer is None:
        docs = _generic(runtime, permissions)
        if runtime != GENERIC:
            warnings = (f"harness runtime {runtime!r} is unknown (known: "
                        f"{', '.join(sorted(RENDERERS))}); rendered a generic "
                        f"harness/{runtime}/permissions.json",)
    else:
        docs = renderer(permissions)
    return {f"{runtime}/{name}": _encode(doc) for name, doc in docs.items()}, warnings


def _encode(doc: dict) -> bytes:
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=True).encode() + b"\n"


def apply(inputs: LayerInputs) -> LayerResult:
    files, warnings = render(inputs.keyring)
    return LayerResult(files=files, hot_reload=frozenset({"harness"}), warnings=warnings)
