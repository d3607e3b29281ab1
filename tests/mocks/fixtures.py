"""Fixtures and helpers the provider tests share.

A test module takes the `http` fixture by binding it to a module name (pytest collects fixtures
from module attributes), which keeps the dependency explicit without a conftest:

    from mocks import fixtures

    http = fixtures.http
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from plinth.providers.http import HttpClient
from plinth.providers.types import Message, TextPart, Tool

WEATHER = Tool(
    name="get_weather",
    description="Weather for a city",
    parameters={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)


@pytest.fixture
async def http() -> AsyncIterator[HttpClient]:
    """A Plinth HttpClient for one test, closed after it."""
    client = HttpClient()
    yield client
    await client.aclose()


def user(text: str) -> Message:
    """A user turn of plain text."""
    return Message(role="user", content=[TextPart(text)])
