"""ISO 8601 durations for ``aggrPeriodDuration``: a calendar part (months) or a fixed length."""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal

from cityward.bank.errors import BadRequestData

FIELD = "aggrPeriodDuration"

# Fixed lengths: in UTC a day is always 86,400 s (the bank ignores leap seconds), so days and
# weeks are fixed; only years and months depend on the calendar.
_UNIT_US = {
    "W": 7 * 86_400_000_000,
    "D": 86_400_000_000,
    "H": 3_600_000_000,
    "TM": 60_000_000,
    "S": 1_000_000,
}
_NUMBER = r"(\d+(?:[.,]\d+)?)"
_DURATION = re.compile(
    rf"P(?:{_NUMBER}Y)?(?:{_NUMBER}M)?(?:{_NUMBER}W)?(?:{_NUMBER}D)?"
    rf"(?:T(?:{_NUMBER}H)?(?:{_NUMBER}M)?(?:{_NUMBER}S)?)?"
)
_UNITS = ("Y", "M", "W", "D", "H", "TM", "S")
# 10,000 years: longer periods are certainly a mistake, and this keeps every bucket edge within
# 64-bit microseconds.
MAX_MONTHS = 12 * 10_000
MAX_US = 10_000 * 366 * 86_400_000_000


@dataclass(frozen=True, slots=True)
class Duration:
    """A period of either ``months`` calendar months or ``micros`` microseconds (never both)."""

    months: int = 0
    micros: int = 0
    text: str = ""

    @property
    def is_zero(self) -> bool:
        return self.months == 0 and self.micros == 0

    @property
    def calendar(self) -> bool:
        return self.months > 0


def _bad(text: str, why: str) -> BadRequestData:
    return BadRequestData(f"{FIELD} {text!r} {why}", field=FIELD)


def parse_duration(text: str) -> Duration:
    """Parse ``PnYnMnWnDTnHnMnS`` (each part optional, a decimal fraction on the last one).

    ``P0D`` (or any all-zero duration) is the zero duration: one period over the whole window.
    Years and months make calendar periods (``P1M`` runs from a day of one month to the same
    day of the next); mixing them with weeks, days or hours is rejected, because a bucket of
    "one month and one day" has no single well-defined SQL expression on both backends.
    """
    m = _DURATION.fullmatch(text)
    if m is None or text in ("P", "") or text.endswith("T"):
        raise _bad(text, "is not an ISO 8601 duration such as PT1H, PT15M, P1D or P1M")
    parts = {unit: m.group(i + 1) for i, unit in enumerate(_UNITS) if m.group(i + 1) is not None}
    units = list(parts)
    for unit, raw in parts.items():
        if ("." in raw or "," in raw) and unit != units[-1]:
            raise _bad(text, "has a fraction on a part that is not the last one")
    values = {unit: Decimal(raw.replace(",", ".")) for unit, raw in parts.items()}
    months_d = values.get("Y", Decimal(0)) * 12 + values.get("M", Decimal(0))
    micros_d = sum((values.get(u, Decimal(0)) * _UNIT_US[u] for u in _UNIT_US), Decimal(0))
    if months_d != months_d.to_integral_value():
        raise _bad(text, "has a fraction of a month or year, which is not a calendar period")
    if micros_d != micros_d.to_integral_value():
        raise _bad(text, "is not a whole number of microseconds")
    months, micros = int(months_d), int(micros_d)
    if months and micros:
        raise _bad(
            text,
            "mixes years or months with weeks, days or hours; use either a calendar period "
            "(such as P1M or P1Y) or a fixed one (such as P30D)",
        )
    if months > MAX_MONTHS or micros > MAX_US:
        raise _bad(text, "is longer than 10,000 years")
    return Duration(months=months, micros=micros, text=text)
