"""Routing: pick a deployment for a model alias, retry what can be retried, remember who is failing.

All state is in-process per worker (in-flight counts, latency averages, cooldowns): it is advisory,
so a little disagreement between workers costs nothing, and no lock or round trip is needed.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Container
from dataclasses import dataclass, field, replace
from typing import TypeVar

from plinth.config.loader import ConfigError
from plinth.config.schema import DeploymentConfig, ModelConfig, PlinthConfig, RoutingConfig
from plinth.gateway.errors import GatewayError
from plinth.providers.base import ChatStream, Provider, ProviderError
from plinth.providers.http import HttpClient
from plinth.providers.registry import UnknownProvider, provider_class
from plinth.providers.types import (
    ChatRequest,
    ChatResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    StreamEvent,
    Usage,
    UsageEvent,
)

T = TypeVar("T")
LATENCY_SMOOTHING = 0.2  # weight of the newest sample in the moving average

UpstreamErrorHook = Callable[[str, ProviderError], None]


class NoDeploymentAvailable(Exception):
    pass


class UnknownModel(LookupError):
    pass


@dataclass(slots=True)
class Deployment:
    """A deployment and what this worker has learned about it."""

    name: str
    config: DeploymentConfig
    provider: Provider
    in_flight: int = 0
    latency_ewma_s: float = 0.0
    consecutive_failures: int = 0
    cooldown_until: float = 0.0

    def available(self, now: float) -> bool:
        return now >= self.cooldown_until

    def record_success(self, latency_s: float) -> None:
        self.consecutive_failures = 0
        if self.latency_ewma_s == 0.0:
            self.latency_ewma_s = latency_s
        else:
            self.latency_ewma_s += LATENCY_SMOOTHING * (latency_s - self.latency_ewma_s)

    def record_failure(self, routing: RoutingConfig) -> None:
        self.consecutive_failures += 1
        if self.consecutive_failures >= routing.allowed_fails:
            self.cooldown_until = time.monotonic() + routing.cooldown_s
            self.consecutive_failures = 0


@dataclass(slots=True)
class ModelRoute:
    """A catalog entry at run time: the alias, its deployments and how to choose among them."""

    config: ModelConfig
    deployments: list[Deployment]
    routing: RoutingConfig
    wildcard_prefix: str | None = None  # "openai/" for the alias "openai/*"
    _rr: int = field(default=0)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def deployment_names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.deployments)

    def upstream_model(self, deployment: Deployment, requested: str) -> str:
        if deployment.config.model == "*" and self.wildcard_prefix is not None:
            return requested[len(self.wildcard_prefix) :]
        return deployment.config.model

    def order(self) -> list[Deployment]:
        """Deployments in the order to try them: available ones by strategy, cooling ones last."""
        now = time.monotonic()
        ready = [d for d in self.deployments if d.available(now)]
        resting = sorted(
            (d for d in self.deployments if not d.available(now)), key=lambda d: d.cooldown_until
        )
        if len(ready) > 1:
            ready = _STRATEGIES[self.routing.strategy](ready)
        return ready + resting


def _by_priority(deps: list[Deployment]) -> list[Deployment]:
    # Equal priorities share the load at random rather than piling onto the first one listed.
    return sorted(deps, key=lambda d: (d.config.priority, random.random()))


def _weighted(deps: list[Deployment]) -> list[Deployment]:
    # Weighted random order without replacement (Efraimidis-Spirakis keys).
    return sorted(deps, key=lambda d: random.random() ** (1.0 / d.config.weight), reverse=True)


def _lowest_latency(deps: list[Deployment]) -> list[Deployment]:
    # Unmeasured deployments (0.0) come first so every deployment gets measured.
    return sorted(deps, key=lambda d: (d.latency_ewma_s, random.random()))


def _least_busy(deps: list[Deployment]) -> list[Deployment]:
    return sorted(deps, key=lambda d: (d.in_flight, random.random()))


_STRATEGIES: dict[str, Callable[[list[Deployment]], list[Deployment]]] = {
    "priority": _by_priority,
    "weighted": _weighted,
    "latency": _lowest_latency,
    "least_busy": _least_busy,
}


def backoff_delay(attempt: int, routing: RoutingConfig, retry_after: float | None) -> float:
    """Exponential backoff with full jitter; an upstream's retry-after wins when it is longer."""
    cap = min(routing.backoff_max_s, routing.backoff_base_s * (2**attempt))
    delay = random.uniform(0, cap)
    if retry_after is not None:
        delay = max(delay, min(retry_after, routing.backoff_max_s))
    return delay


@dataclass(slots=True)
class Attempt:
    """What the router did for one request, for headers, metrics and usage records."""

    deployment: str | None = None
    attempts: int = 0
    upstream_s: float = 0.0


class Router:
    def __init__(
        self, config: PlinthConfig, http: HttpClient, on_upstream_error: UpstreamErrorHook | None = None
    ):
        self.http = http
        self._on_upstream_error = on_upstream_error
        self.routes: dict[str, ModelRoute] = {}
        self._wildcards: list[ModelRoute] = []
        for index, model in enumerate(config.models):
            route = self._build_route(model, index)
            if route.wildcard_prefix is not None:
                self._wildcards.append(route)
            else:
                self.routes[model.name] = route
        # Longest prefix first, so "openai/gpt-4o/*" beats "openai/*".
        self._wildcards.sort(key=lambda r: len(r.wildcard_prefix or ""), reverse=True)

    def _build_route(self, model: ModelConfig, index: int) -> ModelRoute:
        deployments = []
        for i, dep in enumerate(model.deployments):
            name = dep.name or f"{model.name}/{dep.provider}/{i}"
            try:
                provider = provider_class(dep.provider)(dep, self.http, name=name)
            except (UnknownProvider, ValueError) as exc:
                # Caught at start-up, reported like any other configuration mistake.
                raise ConfigError(f"models[{index}].deployments[{i}]: {exc}") from None
            deployments.append(Deployment(name=name, config=dep, provider=provider))
        prefix = model.name[:-1] if model.name.endswith("*") else None
        return ModelRoute(
            config=model, deployments=deployments, routing=model.routing, wildcard_prefix=prefix
        )

    def resolve(self, model: str) -> ModelRoute:
        route = self.routes.get(model)
        if route is not None:
            return route
        for wild in self._wildcards:
            if model.startswith(wild.wildcard_prefix or "") and len(model) > len(wild.wildcard_prefix or ""):
                return wild
        raise UnknownModel(model)

    def all_routes(self) -> list[ModelRoute]:
        return [*self.routes.values(), *self._wildcards]

    async def aclose(self) -> None:
        for route in self.all_routes():
            for dep in route.deployments:
                await dep.provider.aclose()

    # --- the retry loop ------------------------------------------------------------------------

    async def _run(
        self,
        route: ModelRoute,
        attempt_info: Attempt,
        call: Callable[[Deployment], Awaitable[T]],
        allowed: Container[str] | None = None,
    ) -> T:
        order = route.order()
        if allowed is not None:  # governance: only the deployments that may receive this request
            order = [d for d in order if d.name in allowed]
            if not order:
                raise GatewayError(
                    403, f"No deployment of '{route.name}' may receive this request.", code="policy_denied"
                )
        attempts_left = route.routing.retries + 1
        broken: list[Deployment] = []  # cannot serve this request at all: skip, do not retry
        position = 0
        last_error: ProviderError | None = None
        while attempts_left > 0:
            usable = [d for d in order if d not in broken]
            if not usable:
                break
            deployment = usable[position % len(usable)]
            if position >= len(usable) and last_error is not None:
                # Every deployment has had a go: wait before asking one of them again. The wait
                # counts as upstream time: it is the upstream's failure, not Plinth's overhead.
                delay = backoff_delay(position - len(usable), route.routing, last_error.retry_after)
                await asyncio.sleep(delay)
                attempt_info.upstream_s += delay
            position += 1
            attempt_info.attempts += 1
            attempt_info.deployment = deployment.name
            started = time.perf_counter()
            deployment.in_flight += 1
            try:
                result = await call(deployment)
            except ProviderError as exc:
                exc.deployment = deployment.name
                attempt_info.upstream_s += time.perf_counter() - started
                if self._on_upstream_error is not None:
                    self._on_upstream_error(deployment.name, exc)
                if not exc.fallback:
                    raise
                deployment.record_failure(route.routing)
                last_error = exc
                if exc.retryable:
                    attempts_left -= 1
                else:
                    broken.append(deployment)
                    position -= 1  # the next usable deployment now sits at this position
                continue
            finally:
                deployment.in_flight -= 1
            elapsed = time.perf_counter() - started
            attempt_info.upstream_s += elapsed
            deployment.record_success(elapsed)
            return result
        assert last_error is not None
        raise last_error

    # --- operations ----------------------------------------------------------------------------

    async def chat(
        self, route: ModelRoute, request: ChatRequest, attempt: Attempt, allowed: Container[str] | None = None
    ) -> ChatResponse:
        async def call(dep: Deployment) -> ChatResponse:
            upstream = route.upstream_model(dep, request.model)
            if request.n > 1 and not dep.provider.supports_n:
                return await _fan_out_chat(dep.provider, request, upstream)
            return await dep.provider.chat(request, upstream)

        return await self._run(route, attempt, call, allowed)

    async def stream_chat(
        self, route: ModelRoute, request: ChatRequest, attempt: Attempt, allowed: Container[str] | None = None
    ) -> tuple[ChatStream, StreamEvent]:
        """Open a stream and read its first event; fall back to another deployment until then."""

        async def call(dep: Deployment) -> tuple[ChatStream, StreamEvent]:
            upstream = route.upstream_model(dep, request.model)
            if request.n > 1 and not dep.provider.supports_n:
                stream = await _fan_out_stream(dep.provider, request, upstream)
            else:
                stream = await dep.provider.stream_chat(request, upstream)
            stream.events = _counted_in_flight(stream.events, dep)
            try:
                first = await anext(aiter(stream.events))
            except StopAsyncIteration:
                raise ProviderError("upstream closed the stream without data", retryable=True) from None
            except BaseException:
                await stream.aclose()
                raise
            return stream, first

        return await self._run(route, attempt, call, allowed)

    async def embed(
        self,
        route: ModelRoute,
        request: EmbeddingRequest,
        attempt: Attempt,
        allowed: Container[str] | None = None,
    ) -> EmbeddingResponse:
        async def call(dep: Deployment) -> EmbeddingResponse:
            return await dep.provider.embed(request, route.upstream_model(dep, request.model))

        return await self._run(route, attempt, call, allowed)


async def _counted_in_flight(
    events: AsyncIterator[StreamEvent], dep: Deployment
) -> AsyncIterator[StreamEvent]:
    """Keep a streaming request counted as in flight until its last event (least_busy needs it)."""
    dep.in_flight += 1
    try:
        async for event in events:
            yield event
    finally:
        dep.in_flight -= 1
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()


# --- n > 1 for upstreams without it ----------------------------------------------------------


def _single(request: ChatRequest) -> ChatRequest:
    return replace(request, n=1)


async def _fan_out_chat(provider: Provider, request: ChatRequest, upstream_model: str) -> ChatResponse:
    single = _single(request)
    responses = await asyncio.gather(*(provider.chat(single, upstream_model) for _ in range(request.n)))
    first = responses[0]
    usage = Usage()
    choices = []
    for i, resp in enumerate(responses):
        usage.add(resp.usage)
        choice = resp.choices[0]
        choice.index = i
        choices.append(choice)
    # Each call billed the prompt again: that is what the upstream charges, so keep it.
    return ChatResponse(id=first.id, model=first.model, created=first.created, choices=choices, usage=usage)


async def _fan_out_stream(provider: Provider, request: ChatRequest, upstream_model: str) -> ChatStream:
    single = _single(request)
    streams = await asyncio.gather(
        *(provider.stream_chat(single, upstream_model) for _ in range(request.n)), return_exceptions=True
    )
    opened = [s for s in streams if isinstance(s, ChatStream)]
    failure = next((s for s in streams if isinstance(s, BaseException)), None)
    if failure is not None:
        for s in opened:
            await s.aclose()
        raise failure
    return ChatStream(events=_merge(opened), id=opened[0].id, model=opened[0].model)


async def _merge(streams: list[ChatStream]) -> AsyncIterator[StreamEvent]:
    """Interleave n single-choice streams, renumbering choices and summing usage into one event."""
    queue: asyncio.Queue[tuple[int, StreamEvent | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: ChatStream) -> None:
        try:
            async for event in stream.events:
                await queue.put((index, event))
        except BaseException as exc:
            await queue.put((index, exc))
            return
        await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    usage = Usage()
    remaining = len(streams)
    try:
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            elif isinstance(item, UsageEvent):
                usage.add(item.usage)
            else:
                item.index = index
                yield item
        yield UsageEvent(usage)
    finally:
        for task in tasks:
            task.cancel()
        for s in streams:
            await s.aclose()
