"""Metering: prices, cost per request, usage records and spend reports."""

from plinth.metering.prices import BUILTIN_PRICES, Price, PriceBook, catalog_price
from plinth.metering.recorder import UsageRecorder
from plinth.metering.reports import GROUP_BY_CHOICES, SpendRow, csv_columns, spend, to_csv

__all__ = [
    "BUILTIN_PRICES",
    "GROUP_BY_CHOICES",
    "Price",
    "PriceBook",
    "SpendRow",
    "UsageRecorder",
    "catalog_price",
    "csv_columns",
    "spend",
    "to_csv",
]
