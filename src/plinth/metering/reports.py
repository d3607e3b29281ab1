"""Spend reports: usage records summed by team, key, model, day (or any mix) over a time range.

One `GROUP BY` query that runs unchanged on SQLite and PostgreSQL; only the day bucket differs
(`date()` there, `to_char()` here), and both produce the same `YYYY-MM-DD` text. Times are UTC,
`since` inclusive and `until` exclusive, so consecutive ranges never count a record twice.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from sqlalchemy import ColumnElement, func, literal_column, select

from plinth.metering.models import UsageRecord
from plinth.storage import Database

GroupBy = Literal["team", "key", "model", "day", "org", "project", "deployment", "route", "status"]
GROUP_BY_CHOICES: tuple[str, ...] = get_args(GroupBy)

# The columns each grouping adds to a row, in order. A key is identified by id *and* name:
# keys declared in the config file have no id.
GROUP_COLUMNS: dict[str, tuple[str, ...]] = {
    "team": ("team_id",),
    "key": ("key_id", "key_name"),
    "model": ("model",),
    "day": ("day",),
    "org": ("org_id",),
    "project": ("project_id",),
    "deployment": ("deployment",),
    "route": ("route",),
    "status": ("status",),
}
METRIC_COLUMNS = ("requests", "input_tokens", "output_tokens", "cached_input_tokens", "cost_usd")


@dataclass(frozen=True, slots=True)
class SpendRow:
    """One group: its key columns (`group`) and the sums over its records."""

    group: dict[str, Any]
    requests: int
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    cost_usd: float

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.group,
            "requests": self.requests,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cached_input_tokens": self.cached_input_tokens,
            "cost_usd": self.cost_usd,
        }


def _naive_utc(value: dt.datetime | dt.date) -> dt.datetime:
    """Records store naive UTC; accept dates (midnight UTC) and aware datetimes too."""
    if not isinstance(value, dt.datetime):
        return dt.datetime(value.year, value.month, value.day)
    if value.tzinfo is not None:
        return value.astimezone(dt.UTC).replace(tzinfo=None)
    return value


def _day(db: Database) -> ColumnElement[str]:
    if db.is_sqlite:
        return func.date(UsageRecord.created_at)
    return func.to_char(UsageRecord.created_at, literal_column("'YYYY-MM-DD'"))


def _group_columns(db: Database, group_by: Sequence[str]) -> list[ColumnElement[Any]]:
    columns: list[ColumnElement[Any]] = []
    for name in dict.fromkeys(group_by):  # keep order, drop repeats
        if name not in GROUP_COLUMNS:
            choices = ", ".join(GROUP_BY_CHOICES)
            raise ValueError(f"cannot group usage by {name!r}; choose from {choices}")
        for column in GROUP_COLUMNS[name]:
            expr = _day(db) if column == "day" else getattr(UsageRecord, column)
            columns.append(expr.label(column))
    return columns


def spend(
    db: Database,
    group_by: Sequence[str],
    since: dt.datetime | dt.date,
    until: dt.datetime | dt.date,
    *,
    team_id: str | None = None,
    key_id: str | None = None,
    org_id: str | None = None,
    model: str | None = None,
) -> list[SpendRow]:
    """Sum usage in [since, until) by the given groupings (none: one total row).

    Filters narrow the records first (a team admin sees their team only). Rows come back ordered by
    their group columns, so a `day` report is chronological.
    """
    groups = _group_columns(db, group_by)
    query = select(
        *groups,
        func.count(UsageRecord.id).label("requests"),
        func.coalesce(func.sum(UsageRecord.input_tokens), 0).label("input_tokens"),
        func.coalesce(func.sum(UsageRecord.output_tokens), 0).label("output_tokens"),
        func.coalesce(func.sum(UsageRecord.cached_input_tokens), 0).label("cached_input_tokens"),
        func.coalesce(func.sum(UsageRecord.cost_usd), 0.0).label("cost_usd"),
    ).where(UsageRecord.created_at >= _naive_utc(since), UsageRecord.created_at < _naive_utc(until))
    for column, value in (("team_id", team_id), ("key_id", key_id), ("org_id", org_id), ("model", model)):
        if value is not None:
            query = query.where(getattr(UsageRecord, column) == value)
    if groups:
        # Group and order by position: PostgreSQL wants the expression itself, not its alias, and
        # positions avoid repeating the day expression.
        positions: list[ColumnElement[Any]] = [literal_column(str(i + 1)) for i in range(len(groups))]
        query = query.group_by(*positions).order_by(*positions)
    names = [str(g.key) for g in groups]
    with db.session() as session:
        result = session.execute(query).all()
    rows = []
    for row in result:
        values = tuple(row)
        rows.append(
            SpendRow(
                group=dict(zip(names, values[: len(names)], strict=True)),
                requests=int(values[-5]),
                input_tokens=int(values[-4]),
                output_tokens=int(values[-3]),
                cached_input_tokens=int(values[-2]),
                cost_usd=round(float(values[-1]), 10),
            )
        )
    return rows


def csv_columns(group_by: Sequence[str]) -> list[str]:
    """The CSV header for a grouping: group columns, then the sums."""
    return [c for name in dict.fromkeys(group_by) for c in GROUP_COLUMNS[name]] + list(METRIC_COLUMNS)


def to_csv(rows: Iterable[SpendRow], group_by: Sequence[str]) -> str:
    """Rows as CSV text with a header line (RFC 4180 quoting, `\\r\\n` line ends)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=csv_columns(group_by), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        data = row.as_dict()
        data["cost_usd"] = f"{row.cost_usd:.6f}"
        writer.writerow({k: "" if v is None else v for k, v in data.items()})
    return out.getvalue()
