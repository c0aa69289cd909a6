"""Timestamps in the contracts: RFC 3339, UTC."""

from datetime import datetime, timezone


def parse_timestamp(text: str) -> datetime:
    """RFC 3339 -> aware UTC datetime truncated to whole seconds."""
    value = datetime.fromisoformat(text)
    return value.astimezone(timezone.utc).replace(microsecond=0)


def now() -> datetime:
    return datetime.now(timezone.utc)
