"""aggrPeriodDuration: ISO 8601 durations, calendar or fixed."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cityward.bank.errors import BadRequestData
from cityward.bank.temporal.duration import Duration, parse_duration

S = 1_000_000
H = 3600 * S
D = 24 * H


@pytest.mark.parametrize(
    ("text", "months", "micros"),
    [
        ("PT1M", 0, 60 * S),
        ("PT1H", 0, H),
        ("PT15M", 0, 15 * 60 * S),
        ("P1D", 0, D),
        ("P1W", 0, 7 * D),
        ("PT0.5S", 0, S // 2),
        ("PT0,5S", 0, S // 2),
        ("PT0.000001S", 0, 1),
        ("P1DT2H", 0, D + 2 * H),
        ("P2DT3H4M5S", 0, 2 * D + 3 * H + 4 * 60 * S + 5 * S),
        ("PT1.5H", 0, 90 * 60 * S),
        ("P1.5D", 0, 36 * H),
        ("P1W2D", 0, 9 * D),
        ("P1M", 1, 0),
        ("P3M", 3, 0),
        ("P1Y", 12, 0),
        ("P1Y6M", 18, 0),
        ("P1.5Y", 18, 0),
        ("P0D", 0, 0),
        ("PT0S", 0, 0),
        ("P0Y0M", 0, 0),
    ],
)
def test_valid(text: str, months: int, micros: int) -> None:
    d = parse_duration(text)
    assert (d.months, d.micros, d.text) == (months, micros, text)
    assert d.calendar == (months > 0)
    assert d.is_zero == (months == 0 and micros == 0)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "P",
        "PT",
        "P1DT",
        "1H",
        "PT1H30",
        "P1H",
        "PT1D",
        "-PT1H",
        "pt1h",
        "P1M1D",  # calendar and fixed parts mixed
        "P1YT1H",
        "P0.5M",  # a fraction of a month
        "PT0.0000001S",  # below a microsecond
        "P1.5DT1H",  # a fraction on a part that is not the last
        "P20000Y",
        "P99999999999999999999D",
        " PT1H",
        "PT1H ",
        "P1D1W",  # parts out of order
    ],
)
def test_invalid(text: str) -> None:
    with pytest.raises(BadRequestData) as err:
        parse_duration(text)
    assert err.value.field == "aggrPeriodDuration"
    assert text in err.value.detail or text == ""


@given(
    w=st.integers(0, 60),
    d=st.integers(0, 400),
    h=st.integers(0, 48),
    m=st.integers(0, 120),
    s=st.integers(0, 5000),
    frac=st.integers(0, 999_999),
)
def test_fixed_parts_add_up(w: int, d: int, h: int, m: int, s: int, frac: int) -> None:
    text = f"P{w}W{d}DT{h}H{m}M{s}.{frac:06d}S"
    expected = (((w * 7 + d) * 24 + h) * 60 + m) * 60 * S + s * S + frac
    assert parse_duration(text) == Duration(months=0, micros=expected, text=text)


@given(y=st.integers(0, 100), mo=st.integers(0, 1200))
def test_calendar_parts_add_up(y: int, mo: int) -> None:
    assert parse_duration(f"P{y}Y{mo}M").months == 12 * y + mo
