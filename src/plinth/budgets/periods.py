"""Budget periods as UTC windows: a calendar day or a calendar month."""

from __future__ import annotations

import calendar
import datetime as dt
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Window:
    """One period instance: [start, end) in Unix seconds, UTC."""

    period: str
    start: int
    end: int

    @property
    def start_dt(self) -> dt.datetime:
        """Naive UTC, as the usage records store their timestamps."""
        return dt.datetime.fromtimestamp(self.start, dt.UTC).replace(tzinfo=None)

    @property
    def end_dt(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.end, dt.UTC).replace(tzinfo=None)

    def contains(self, now: float) -> bool:
        return self.start <= now < self.end


def window(period: str, now: float) -> Window:
    """The window of `period` ("day" or "month") that contains the Unix time `now`."""
    day = dt.datetime.fromtimestamp(now, dt.UTC).date()
    if period == "day":
        start = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
        end = start + dt.timedelta(days=1)
    elif period == "month":
        start = dt.datetime(day.year, day.month, 1, tzinfo=dt.UTC)
        end = start + dt.timedelta(days=calendar.monthrange(day.year, day.month)[1])
    else:
        raise ValueError(f"unknown budget period {period!r}")
    return Window(period, int(start.timestamp()), int(end.timestamp()))
