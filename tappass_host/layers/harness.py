"""Harness files: the agent framework's own permission file, rendered from
the keyring's `harness` aspect into the keyring version directory
(`harness/<runtime>/…`), so it flips with the keyring: one `..data` rename
makes the new keyring.json and the new harness files visible together.
Deterministic: the same keyring gives the same bytes.

An agent that needs keyring.json and a harness file *as a pair* must resolve
`..data` once and read both from that one version directory (open the
directory, then open each file relative to it): two opens through the two
top-level symlinks can straddle a flip.

For `claude-code`, `problems` is part of keyring acceptance: a rule Claude
Code would not understand (it silently matches nothing, so a mistyped deny
rule denies nothing) rejects the keyring as `invalid`, naming the rule's
index, never its value.
"""

import json
import re

from tappass_host.layers import LayerInputs, LayerResult

GENERIC = "generic"
CLAUDE_CODE = "claude-code"

# The tool names of the SchemaStore Claude Code settings schema's
# $defs/permissionRule (tests/data/claude-code-settings.schema.json is the judge).
CLAUDE_TOOLS = (
    "Agent", "Bash", "Cd", "Edit", "ExitPlanMode", "Glob", "Grep", "KillShell", "LSP", "Monitor",
    "MultiEdit", "NotebookEdit", "PowerShell", "Read", "Skill", "TaskCreate", "TaskGet",
    "TaskList", "TaskOutput", "TaskStop", "TaskUpdate", "TodoWrite", "ToolSearch", "WebFetch",
    "WebSearch", "Write",
)
# `Tool` or `Tool(specifier)`: a non-empty specifier without ')' or control characters;
# MCP tools as `mcp__server`, `mcp__server__tool` or `mcp__server__*`.
_CLAUDE_RULE = re.compile(
    rf"(?:{'|'.join(CLAUDE_TOOLS)})(?:\([^)\x00-\x1f\x7f]+\))?"
    r"|mcp__[A-Za-z0-9_-]+(?:__\*)?")
CLAUDE_MODES = ("acceptEdits", "auto", "bypassPermissions", "default", "dontAsk", "plan")
RULE_LISTS = ("allow", "deny", "ask")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _claude_code_problems(permissions: dict):
    where = "harness.permissions"
    for key in RULE_LISTS:
        seen = set()
        for i, rule in enumerate(permissions.get(key, [])):
            if not _CLAUDE_RULE.fullmatch(rule):
                yield f"{where}.{key}[{i}] is not a Claude Code tool rule (Tool or Tool(specifier))"
            elif rule in seen:
                yield f"{where}.{key}[{i}] repeats an earlier rule"
            seen.add(rule)
    seen = set()
    for i, directory in enumerate(permissions.get("additionalDirectories", [])):
        if not directory or _CONTROL.search(directory):
            yield f"{where}.additionalDirectories[{i}] is empty or holds control characters"
        elif directory in seen:
            yield f"{where}.additionalDirectories[{i}] repeats an earlier directory"
        seen.add(directory)
    mode = permissions.get("defaultMode")
    if mode is not None and mode not in CLAUDE_MODES:
        yield f"{where}.defaultMode is not one of {', '.join(CLAUDE_MODES)}"
    disable = permissions.get("disableBypassPermissionsMode")
    if disable is not None and disable != "disable":
        yield f"{where}.disableBypassPermissionsMode can only be \"disable\""
    if mode == "bypassPermissions" and disable == "disable":
        yield f"{where}.defaultMode is bypassPermissions, which disableBypassPermissionsMode disables"


def problems(keyring: dict):
    """What makes the keyring's harness aspect unusable by its runtime (schema-valid input)."""
    harness = keyring.get("harness") or {}
    if harness.get("runtime") == CLAUDE_CODE:
        yield from _claude_code_problems(harness.get("permissions", {}))


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
