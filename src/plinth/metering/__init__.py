"""Metering: prices, cost per request, usage records and spend reports."""
