"""Harness files: the agent framework's own permission file, rendered into
the keyring version directory so it flips with the keyring. Deterministic:
the same keyring gives the same bytes."""

import json

from tappass_host.layers import LayerInputs, LayerResult


def render(keyring: dict) -> tuple[dict[str, bytes], tuple[str, ...]]:
    harness = keyring.get("harness")
    if not harness:
        return {}, ()
    runtime = harness.get("runtime", "generic")
    permissions = harness.get("permissions", {})
    if runtime == "claude-code":
        doc = {"permissions": {"allow": permissions.get("allow", []),
                               "deny": permissions.get("deny", [])}}
        return {"claude-code/settings.json": _encode(doc)}, ()
    return ({f"{runtime}/permissions.json": _encode({"runtime": runtime,
                                                     "permissions": permissions})},
            (f"harness runtime {runtime!r} is unknown; rendered a generic permissions.json",))


def _encode(doc: dict) -> bytes:
    return json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"


def apply(inputs: LayerInputs) -> LayerResult:
    files, warnings = render(inputs.keyring)
    return LayerResult(files=files, hot_reload=frozenset({"harness"}), warnings=warnings)
