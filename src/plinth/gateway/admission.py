"""Admission steps: checks that run before the upstream call and settle once the request is over.

Rate limits, concurrency limits and budgets all have the same shape: reserve something when a
request is admitted (a request slot, estimated tokens, estimated cost), then correct or release it
with what really happened. Each is an `Admission` whose `admit` returns a `Hold`; the pipeline
settles every hold exactly once, whatever the outcome (success, upstream error, client gone).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from plinth.providers.types import Usage
from plinth.routing import ModelRoute
from plinth.tenancy import Principal

log = logging.getLogger("plinth.gateway")


@dataclass(slots=True)
class Call:
    """What admission steps know about a request before it goes upstream."""

    request_id: str
    principal: Principal
    route: ModelRoute
    model: str  # the name the client asked for (under a wildcard alias, more than the alias)
    estimated_input_tokens: int
    max_output_tokens: int | None
    stream: bool = False


@dataclass(slots=True)
class Outcome:
    """How a request ended. `usage` is None when no upstream answer was metered."""

    status: int
    usage: Usage | None = None
    deployment: str | None = None
    cache_hit: bool = False


class Hold(Protocol):
    @property
    def headers(self) -> Mapping[str, str]:
        """Response headers the step adds to an admitted request (x-ratelimit-*); often empty."""

    def settle(self, outcome: Outcome) -> None:
        """Called once when the request is over. Must be cheap and must not raise."""


class Admission(Protocol):
    async def admit(self, call: Call) -> Hold:
        """Reserve what the call needs, or raise GatewayError (429, 403…) to refuse it."""


class Admissions:
    """The configured steps, run in order; a refusal releases what earlier steps reserved."""

    def __init__(self, steps: list[Admission]) -> None:
        self.steps = steps

    def __bool__(self) -> bool:
        return bool(self.steps)

    async def admit(self, call: Call) -> list[Hold]:
        holds: list[Hold] = []
        try:
            for step in self.steps:
                holds.append(await step.admit(call))
        except BaseException:
            settle(holds, Outcome(status=429))
            raise
        return holds


def settle(holds: list[Hold], outcome: Outcome) -> None:
    for hold in holds:
        try:
            hold.settle(outcome)
        except Exception:  # one faulty step must not stop the others from releasing
            log.exception("admission hold %r failed to settle", hold)
