"""UTC timestamps as integer microseconds since 1970-01-01, and calendar month arithmetic."""

from __future__ import annotations

import calendar
from datetime import UTC, date, datetime, timedelta

US_PER_S = 1_000_000
US_PER_DAY = 86_400 * US_PER_S
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def iso_to_us(text: str) -> int:
    """``YYYY-MM-DDThh:mm:ss[.f]Z`` (already validated) as microseconds since the epoch.

    Parsed by position, not with datetime.fromisoformat: this runs for every history row.
    Fraction digits beyond six are cut, as indexer.normalize_timestamp does.
    """
    days = date(int(text[0:4]), int(text[5:7]), int(text[8:10])).toordinal() - _EPOCH_ORDINAL
    secs = int(text[11:13]) * 3600 + int(text[14:16]) * 60 + int(text[17:19])
    frac = 0
    if len(text) > 21 and text[19] == ".":
        frac = int((text[20:-1] + "000000")[:6])
    return (days * 86_400 + secs) * US_PER_S + frac


# The first and last times the bank holds (DateTimes have four-digit years), in microseconds.
# An aggregation period past either end is cut there (temporal.sql).
FIRST_US = -62_135_596_800 * US_PER_S  # 0001-01-01T00:00:00Z
LAST_US = 253_402_300_800 * US_PER_S - 1  # 9999-12-31T23:59:59.999999Z


def us_to_iso(us: int) -> str:
    """Microseconds since the epoch as the bank's fixed-width ``...ss.ffffffZ`` text."""
    days, rest = divmod(us, US_PER_DAY)
    d = date.fromordinal(days + _EPOCH_ORDINAL)
    secs, frac = divmod(rest, US_PER_S)
    h, secs = divmod(secs, 3600)
    m, s = divmod(secs, 60)
    # formatted by hand: strftime does not zero-pad years before 1000 on every platform
    return f"{d.year:04d}-{d.month:02d}-{d.day:02d}T{h:02d}:{m:02d}:{s:02d}.{frac:06d}Z"


def us_to_datetime(us: int) -> datetime:
    return EPOCH + timedelta(microseconds=us)


def datetime_to_us(dt: datetime) -> int:
    """An aware datetime (any zone) as microseconds since the epoch."""
    return (dt - EPOCH) // timedelta(microseconds=1)


def add_months(us: int, months: int) -> int:
    """``us`` moved by whole calendar months; the day is clamped to the target month's length.

    2024-01-31 + 1 month is 2024-02-29 and + 2 months is 2024-03-31 (always counted from the
    origin, never step by step), the same rule as PostgreSQL's ``timestamp + interval``.
    """
    days, tod = divmod(us, US_PER_DAY)
    d = date.fromordinal(days + _EPOCH_ORDINAL)
    mn = d.year * 12 + d.month - 1 + months
    year, month0 = divmod(mn, 12)
    day = min(d.day, calendar.monthrange(year, month0 + 1)[1])
    return (date(year, month0 + 1, day).toordinal() - _EPOCH_ORDINAL) * US_PER_DAY + tod
