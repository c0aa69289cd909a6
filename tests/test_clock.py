"""tappass_host.clock.format_timestamp writes what the contracts read: the
same bytes each caller wrote with its own strftime/isoformat before issue 11."""

from datetime import datetime, timedelta, timezone

import pytest

from tappass_host.clock import format_timestamp, parse_timestamp

TIMES = [
    datetime(2026, 12, 1, 17, 5, 9, 123456, tzinfo=timezone.utc),
    datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc),  # no fraction: still printed when asked
    datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc),
]


@pytest.mark.parametrize("value", TIMES)
def test_each_precision_is_the_format_its_callers_wrote(value):
    assert format_timestamp(value) == value.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert format_timestamp(value, "microseconds") == value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert format_timestamp(value, "milliseconds") == \
        value.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def test_an_offset_is_written_in_utc_and_reads_back():
    value = datetime(2026, 6, 1, 2, 30, tzinfo=timezone(timedelta(hours=5)))
    assert format_timestamp(value) == "2026-05-31T21:30:00Z"
    assert parse_timestamp(format_timestamp(value)) == value
