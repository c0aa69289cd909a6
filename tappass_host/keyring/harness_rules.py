"""The rules of the keyring's `harness` aspect beyond its JSON schema: part of
keyring acceptance (tappass_host.keyring.verify). layers/harness renders the
aspect; what it may render is decided here.

For `claude-code`, a rule Claude Code would not understand (it silently
matches nothing, so a mistyped deny rule denies nothing) rejects the keyring
as `invalid`, naming the rule's index, never its value.
"""

import re

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
