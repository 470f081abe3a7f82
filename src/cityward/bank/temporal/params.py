"""The temporal query parameters (time filter, lastN, aggregation), parsed and validated."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, TypeAlias, get_args

from cityward.bank.errors import BadRequestData, OperationNotSupported
from cityward.bank.model import check_datetime, normalize_datetime
from cityward.bank.temporal.duration import Duration, parse_duration
from cityward.bank.temporal.times import iso_to_us

Timerel: TypeAlias = Literal["before", "after", "between"]
TimeProperty: TypeAlias = Literal["observedAt", "createdAt", "modifiedAt"]
AggrMethod: TypeAlias = Literal[
    "totalCount", "distinctCount", "sum", "avg", "min", "max", "stddev", "sumsq"
]
TIMERELS: tuple[Timerel, ...] = get_args(Timerel)
TIME_PROPERTIES: tuple[TimeProperty, ...] = get_args(TimeProperty)
AGGR_METHODS: tuple[AggrMethod, ...] = get_args(AggrMethod)
# the attr_history column each timeproperty filters and orders on
TIME_COLUMNS: dict[TimeProperty, str] = {
    "observedAt": "obs",
    "createdAt": "created",
    "modifiedAt": "modified",
}
_POSITIVE_INT = re.compile(r"[0-9]+")


@dataclass(frozen=True, slots=True)
class TemporalQuery:
    """A validated temporal query. DateTimes are in the bank's fixed-width ``...ffffffZ`` form.

    The time window is ``[lower, upper)``: ``after`` is ``[timeAt, +inf)``, ``before`` is
    ``(-inf, timeAt)``, ``between`` is ``[timeAt, endTimeAt)``, no timerel is everything.
    """

    timerel: Timerel | None = None
    time_at: str | None = None
    end_time_at: str | None = None
    timeproperty: TimeProperty = "observedAt"
    last_n: int | None = None
    aggr_methods: tuple[AggrMethod, ...] = ()
    # None: the whole window is one period (aggrPeriodDuration absent or P0D)
    aggr_period: Duration | None = None

    @property
    def column(self) -> str:
        """The attr_history time column of ``timeproperty``."""
        return TIME_COLUMNS[self.timeproperty]

    @property
    def lower(self) -> str | None:
        """Inclusive lower bound of the window, or None when unbounded."""
        return self.time_at if self.timerel in ("after", "between") else None

    @property
    def upper(self) -> str | None:
        """Exclusive upper bound of the window, or None when unbounded."""
        if self.timerel == "before":
            return self.time_at
        return self.end_time_at if self.timerel == "between" else None


def _text(params: Mapping[str, object], name: str) -> str | None:
    value = params.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequestData(f"{name} must be a string, got {value!r}", field=name)
    return value


def _datetime(params: Mapping[str, object], name: str) -> str | None:
    value = _text(params, name)
    return None if value is None else normalize_datetime(check_datetime(value, name))


def _last_n(value: object) -> int | None:
    if value is None:
        return None
    if type(value) is int:  # a temporalQ body gives a JSON number (bool is refused)
        n = value
    elif isinstance(value, str) and _POSITIVE_INT.fullmatch(value):
        n = int(value)
    else:
        raise BadRequestData(f"lastN must be a positive integer, got {value!r}", field="lastN")
    if n < 1:
        raise BadRequestData(f"lastN must be a positive integer, got {value!r}", field="lastN")
    return n


def _methods(raw: str | None) -> tuple[AggrMethod, ...]:
    if raw is None:
        return ()
    out: list[AggrMethod] = []
    for part in raw.split(","):
        name = part.strip()
        if name not in AGGR_METHODS:
            raise BadRequestData(
                f"unknown aggregation method {name!r} in aggrMethods; known: "
                + ", ".join(AGGR_METHODS),
                field="aggrMethods",
            )
        if name not in out:
            out.append(name)
    return tuple(out)


def parse_temporal_query(
    params: Mapping[str, object], *, aggregated: bool = False
) -> TemporalQuery:
    """Read the temporal parameters from query parameters (or a ``temporalQ`` object).

    Other keys are ignored: the entity query parameters travel in the same mapping.
    ``aggregated`` (``options=aggregatedValues``) makes ``aggrMethods`` mandatory.
    Every problem is a BadRequestData naming the parameter, except ``timeproperty=deletedAt``,
    which is valid NGSI-LD that this bank does not record (OperationNotSupported).
    """
    timerel_raw = _text(params, "timerel")
    time_at = _datetime(params, "timeAt")
    end_time_at = _datetime(params, "endTimeAt")
    timerel: Timerel | None = None
    if timerel_raw is not None:
        if timerel_raw not in TIMERELS:
            raise BadRequestData(
                f"timerel must be before, after or between, got {timerel_raw!r}", field="timerel"
            )
        timerel = timerel_raw
        if time_at is None:
            raise BadRequestData(f"timerel={timerel} needs timeAt", field="timeAt")
    elif time_at is not None or end_time_at is not None:
        raise BadRequestData("timeAt and endTimeAt need timerel", field="timerel")
    if timerel == "between":
        if end_time_at is None:
            raise BadRequestData("timerel=between needs endTimeAt", field="endTimeAt")
        assert time_at is not None
        if iso_to_us(end_time_at) <= iso_to_us(time_at):
            raise BadRequestData("endTimeAt must be later than timeAt", field="endTimeAt")
    elif end_time_at is not None:
        # refused rather than ignored: a client sending it surely meant between
        raise BadRequestData("endTimeAt is only used with timerel=between", field="endTimeAt")

    prop_raw = _text(params, "timeproperty")
    timeproperty: TimeProperty = "observedAt"
    if prop_raw is not None:
        if prop_raw == "deletedAt":
            raise OperationNotSupported(
                "timeproperty=deletedAt is not supported: deletions are not kept in the history",
                field="timeproperty",
            )
        if prop_raw not in TIME_PROPERTIES:
            raise BadRequestData(
                f"timeproperty must be observedAt, createdAt or modifiedAt, got {prop_raw!r}",
                field="timeproperty",
            )
        timeproperty = prop_raw

    methods = _methods(_text(params, "aggrMethods"))
    if aggregated and not methods:
        raise BadRequestData("aggregatedValues needs aggrMethods", field="aggrMethods")
    period_raw = _text(params, "aggrPeriodDuration")
    period = None if period_raw is None else parse_duration(period_raw)
    return TemporalQuery(
        timerel=timerel,
        time_at=time_at,
        end_time_at=end_time_at,
        timeproperty=timeproperty,
        last_n=_last_n(params.get("lastN")),
        aggr_methods=methods,
        aggr_period=None if period is None or period.is_zero else period,
    )
