"""The audit log as tests read it: its events as dicts, oldest first."""

import json
from pathlib import Path


def read_audit(log: Path, sandbox: str | None = None, event: str | None = None) -> list[dict]:
    """The events in `log` (none if it does not exist yet), only those of
    `sandbox` and of kind `event` when given."""
    try:
        lines = log.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [e for e in map(json.loads, filter(None, lines))
            if (sandbox is None or e["sandbox"] == sandbox)
            and (event is None or e["event"] == event)]
