"""Timestamps in the contracts: RFC 3339, UTC."""

from datetime import datetime, timezone


def parse_timestamp(text: str) -> datetime:
    """RFC 3339 -> aware UTC datetime truncated to whole seconds.

    Raises ValueError for anything else, including times that exist only in
    their own offset (`9999-12-31T23:59:59-01:00` is past datetime's range in UTC).
    """
    try:
        value = datetime.fromisoformat(text)
        return value.astimezone(timezone.utc).replace(microsecond=0)
    except OverflowError:
        raise ValueError("time is out of range in UTC") from None


def now() -> datetime:
    return datetime.now(timezone.utc)


def format_timestamp(value: datetime, timespec: str = "seconds") -> str:
    """An aware datetime -> RFC 3339 in UTC ending in `Z`, the one formatter.

    `timespec` as datetime.isoformat's; the contracts use three:
    "seconds" for identity records and certificates' not_after,
    "milliseconds" for the audit log's `ts`,
    "microseconds" for run state, exit records and acks' applied_at.
    """
    return value.astimezone(timezone.utc).isoformat(timespec=timespec).replace("+00:00", "Z")


def now_text(timespec: str = "seconds") -> str:
    return format_timestamp(now(), timespec)
