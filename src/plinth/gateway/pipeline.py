"""The hot path, top to bottom: request in → identity → policy → guardrails → route → provider → out.

Both inbound protocols run through `handle_chat`; only their codecs differ. Later parts of the
product plug in at the marked steps (policy, guardrails, limits, usage records) without changing the
shape of this function.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from plinth.cache import CachePlan, ResponseCache, canonical
from plinth.gateway import openai_protocol
from plinth.gateway.admission import Admissions, Call, Hold, Outcome, settle
from plinth.gateway.errors import GatewayError
from plinth.governance.audit import AuditLog
from plinth.governance.engine import DATA_CLASS_HEADER, REGION_HEADER, Decision, Governance
from plinth.guardrails.engine import Guard, Guardrails
from plinth.metering.recorder import UsageRecorder
from plinth.observability import metrics
from plinth.providers.base import ChatStream, ProviderError
from plinth.providers.tokens import estimate_prompt_tokens
from plinth.providers.types import (
    ChatRequest,
    ChatResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    StreamEvent,
    Usage,
    UsageEvent,
)
from plinth.routing import Attempt, ModelRoute, Router, UnknownModel
from plinth.tenancy import KeyStore, Principal

if TYPE_CHECKING:
    from plinth.knowledge.augment import Grounding, KnowledgeAccess, Retrieval

log = logging.getLogger("plinth.gateway")

_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
# The request body field of Plinth's own extensions (knowledge bases: docs/knowledge.md).
EXTENSION = "plinth"


# --- protocol codecs -------------------------------------------------------------------------


class StreamEncoder(Protocol):
    def start(self) -> bytes: ...
    def encode(self, event: StreamEvent) -> bytes: ...
    def finish(self) -> bytes: ...
    def error(self, err: GatewayError) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Endpoint:
    """How one front door answers: its metrics label, error shape, request-id headers and auth."""

    route: str  # metrics label
    error_body: Callable[[GatewayError], dict[str, Any]]
    # Response header names carrying the request id (Anthropic's SDK reads `request-id`).
    request_id_headers: tuple[str, ...] = ("x-request-id",)
    accepts_x_api_key: bool = False


@dataclass(frozen=True, slots=True)
class ChatProtocol:
    """What differs between the OpenAI and Anthropic chat front doors: their codecs."""

    endpoint: Endpoint
    decode: Callable[[Any], ChatRequest]
    encode: Callable[[ChatResponse, str], dict[str, Any]]
    stream_encoder: Callable[[ChatRequest, ChatStream], StreamEncoder]


# --- per-request context ---------------------------------------------------------------------


@dataclass(slots=True)
class RequestContext:
    request_id: str
    started: float = field(default_factory=time.perf_counter)
    attempt: Attempt = field(default_factory=Attempt)
    model_label: str = "unknown"
    principal: Principal | None = None
    # The model the client asked for, set once the catalog resolved it: from then on the request
    # gets a usage record, whatever its outcome.
    metered_model: str | None = None
    # What admission steps reserved for this request; settled once with the outcome.
    holds: list[Hold] = field(default_factory=list)
    # Headers admission steps add to the answer (x-ratelimit-*), kept after the holds are settled.
    admission_headers: dict[str, str] | None = None

    def overhead_ms(self) -> float:
        return max(0.0, (time.perf_counter() - self.started - self.attempt.upstream_s) * 1000)


def headers_of(request: Request) -> dict[str, str]:
    """The request's headers by lower-case name (the first of repeated ones), built once per request.

    The hot path asks for seven names, most of them absent; Starlette's `Headers.get` scans the raw
    list for each and raises and catches KeyError for a missing one (10.6 against 3.2 microseconds
    for the seven, measured)."""
    scope = request.scope
    headers: dict[str, str] | None = scope.get(_HEADERS_KEY)
    if headers is None:
        headers = scope[_HEADERS_KEY] = {
            name.decode("latin-1").lower(): value.decode("latin-1")
            for name, value in reversed(scope["headers"])
        }
    return headers


_HEADERS_KEY = "plinth.headers"


def new_context(request: Request) -> RequestContext:
    incoming = headers_of(request).get("x-request-id")
    if incoming and len(incoming) <= 128 and incoming.isprintable():
        return RequestContext(request_id=incoming)
    return RequestContext(request_id=new_request_id())


def new_request_id() -> str:
    """`req_` + 12 hex digits of Unix milliseconds + 20 random: unique, and time-ordered (like a
    UUIDv7) so the request-id indexes of usage and audit records grow at their end instead of
    rewriting pages all over the tree on every batch (migration 0009)."""
    return f"req_{time.time_ns() // 1_000_000:012x}{os.urandom(10).hex()}"


def response_headers(ctx: RequestContext, endpoint: Endpoint) -> dict[str, str]:
    headers = {name: ctx.request_id for name in endpoint.request_id_headers}
    headers["x-plinth-overhead-ms"] = f"{ctx.overhead_ms():.3f}"
    if ctx.attempt.deployment is not None:
        headers["x-plinth-deployment"] = ctx.attempt.deployment
    if ctx.admission_headers:
        headers.update(ctx.admission_headers)
    return headers


def as_gateway_error(exc: GatewayError | ProviderError) -> GatewayError:
    return exc if isinstance(exc, GatewayError) else GatewayError.from_provider(exc)


def error_response(err: GatewayError, ctx: RequestContext, endpoint: Endpoint) -> Response:
    headers = response_headers(ctx, endpoint)
    headers.update(err.headers)
    if err.retry_after is not None:
        headers["retry-after"] = str(max(1, round(err.retry_after)))
    elif err.status == 429:
        headers["retry-after"] = "1"
    metrics.requests_counter(endpoint.route, ctx.model_label, err.status).inc()
    return Response(orjson.dumps(endpoint.error_body(err)), err.status, headers, "application/json")


# --- shared steps ----------------------------------------------------------------------------


class Gateway:
    """Everything the hot path needs, built once at start-up."""

    def __init__(
        self,
        router: Router,
        keys: KeyStore,
        *,
        max_body_bytes: int,
        usage: UsageRecorder | None = None,
        admissions: Admissions | None = None,
        cache: ResponseCache | None = None,
        guardrails: Guardrails | None = None,
        governance: Governance | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self.router = router
        self.keys = keys
        self.max_body_bytes = max_body_bytes
        self.usage = usage
        self.admissions = admissions or Admissions([])
        self.cache = cache  # None: caching disabled in the config
        self.guardrails = guardrails  # None: no guardrail profile can apply (nothing scanned)
        self.governance = governance  # None: no policy step (library use without a configuration)
        self.audit = audit  # where decisions are recorded (governance.audit_decisions)
        self.knowledge: KnowledgeAccess | None = None  # set by the app that serves knowledge bases

    async def admit(
        self, ctx: RequestContext, principal: Principal, route: ModelRoute, chat: ChatRequest | None
    ) -> list[Hold]:
        """Run the admission steps (limits, budgets); nothing at all when none is configured."""
        if not self.admissions or ctx.metered_model is None:
            return []
        call = Call(
            request_id=ctx.request_id,
            principal=principal,
            route=route,
            model=ctx.metered_model,
            estimated_input_tokens=estimate_prompt_tokens(chat) if chat is not None else 0,
            max_output_tokens=chat.max_tokens if chat is not None else None,
            stream=chat.stream if chat is not None else False,
        )
        ctx.holds = await self.admissions.admit(call)
        for hold in ctx.holds:
            if hold.headers:
                ctx.admission_headers = {**(ctx.admission_headers or {}), **hold.headers}
        return ctx.holds

    async def retrieve(
        self, principal: Principal, chat: ChatRequest, request_id: str | None = None
    ) -> Retrieval:
        """Search the knowledge bases the request names in its `plinth` field (removed from it)."""
        if self.knowledge is None:
            raise GatewayError(400, "Knowledge bases are not served here.", param=EXTENSION)
        return await self.knowledge.retrieve(principal, chat, request_id)

    def guard_input(
        self, request: Request, ctx: RequestContext, principal: Principal, chat: ChatRequest
    ) -> Guard | None:
        """Guardrails on the input (step 4); None when no profile applies (no cost beyond this call)."""
        if self.guardrails is None:
            return None
        session = headers_of(request).get("x-plinth-session-id")
        return self.guardrails.check_input(chat, principal, ctx.model_label, ctx.request_id, session)

    def authorize(
        self,
        request: Request,
        ctx: RequestContext,
        principal: Principal,
        route: ModelRoute,
        action: str,
        guard: Guard | None = None,
    ) -> Decision | None:
        """Policy (step 4): the request's classification (key, header, guardrail findings) and the
        caller's region decide which deployments may receive it; a refusal is a 403 naming the rule.
        In memory: decisions are memoised per key and request shape until something changes."""
        governance = self.governance
        if governance is None:
            return None
        findings = guard.input if guard is not None else None
        level = governance.request_class(
            principal,
            headers_of(request).get(DATA_CLASS_HEADER),
            findings.data_class if findings is not None else None,
        )
        region = governance.caller_region(headers_of(request).get(REGION_HEADER))
        types = findings.entity_types if findings is not None else frozenset()
        decision = governance.decide(
            principal, action, route.name, route.deployment_names, level, region, types, ctx.metered_model
        )
        if self.audit is not None and governance.settings.audit_decisions:
            self.audit.record_decision(
                ctx.request_id, principal, decision, caller_region=region, entity_types=sorted(types)
            )
        if not decision.allowed:
            raise decision.error()
        return decision

    def authenticate(self, request: Request, *, allow_x_api_key: bool) -> Principal:
        presented: str | None = None
        headers = headers_of(request)
        auth = headers.get("authorization")
        if auth:
            scheme, _, value = auth.partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                presented = value.strip()
        if presented is None:
            presented = headers.get("x-api-key") if allow_x_api_key else None
            presented = presented or headers.get("api-key")
        if not presented:
            hint = "an 'x-api-key' header or " if allow_x_api_key else ""
            raise GatewayError(
                401,
                f"Missing API key: send {hint}an 'Authorization: Bearer <key>' header.",
                code="missing_api_key",
            )
        principal = self.keys.authenticate(presented)
        if principal is None:
            # Never echo any part of the presented key: it may be a real secret sent to the wrong place.
            raise GatewayError(401, "Invalid API key.", code="invalid_api_key")
        return principal

    async def read_json(self, request: Request) -> Any:
        declared = headers_of(request).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise self._too_large()
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self._too_large()
            chunks.append(chunk)
        body = b"".join(chunks)
        if not body:
            raise GatewayError(400, "The request body is empty; send a JSON object.", code="invalid_json")
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise GatewayError(
                400, f"The request body is not valid JSON: {exc}.", code="invalid_json"
            ) from None

    def _too_large(self) -> GatewayError:
        return GatewayError(
            413,
            f"The request body is larger than the limit of {self.max_body_bytes} bytes.",
            code="request_too_large",
        )

    def resolve(self, model: str, principal: Principal, kind: str) -> ModelRoute:
        try:
            route = self.router.resolve(model)
        except UnknownModel:
            raise GatewayError(
                404, f"The model '{model}' does not exist or you do not have access to it.",
                param="model", code="model_not_found",
            ) from None  # fmt: skip
        if not principal.may_use(route.name):
            raise GatewayError(
                403, f"API key '{principal.name}' is not allowed to use model '{model}'.",
                param="model", code="model_not_allowed",
            )  # fmt: skip
        if route.config.type not in (kind, "any"):
            where = "/v1/embeddings" if route.config.type == "embedding" else "a chat endpoint"
            raise GatewayError(
                400, f"The model '{model}' is a {route.config.type} model; call it through {where}.",
                param="model", code="wrong_model_type",
            )  # fmt: skip
        return route


def meter_request(
    gateway: Gateway,
    ctx: RequestContext,
    endpoint: Endpoint,
    status: int,
    usage: Usage | None,
    *,
    cache_hit: bool = False,
) -> None:
    """Count the tokens, settle the admission holds and queue the usage record: the one place a
    request's outcome is accounted for, called once per request that reached routing.

    O(1) on the hot path: counters and holds settle in memory and the recorder only appends."""
    if usage is not None:
        meters = metrics.request_meters(endpoint.route, ctx.model_label)
        meters.input_tokens.inc(usage.input_tokens)
        meters.output_tokens.inc(usage.output_tokens)
        if usage.cached_input_tokens:
            meters.cached_input_tokens.inc(usage.cached_input_tokens)
    if ctx.holds:
        holds, ctx.holds = ctx.holds, []
        settle(holds, Outcome(status, usage, ctx.attempt.deployment, cache_hit))
    if gateway.usage is None or ctx.metered_model is None:
        return
    gateway.usage.record(
        ctx.request_id, ctx.principal, endpoint.route, ctx.model_label, ctx.metered_model,
        ctx.attempt.deployment, status, usage, (time.perf_counter() - ctx.started) * 1000, cache_hit,
    )  # fmt: skip


class _StreamMeter:
    """Records a stream's usage exactly once: when it ends, fails, or is abandoned by the client."""

    __slots__ = ("ctx", "done", "endpoint", "gateway", "usage")

    def __init__(self, gateway: Gateway, ctx: RequestContext, endpoint: Endpoint) -> None:
        self.gateway = gateway
        self.ctx = ctx
        self.endpoint = endpoint
        self.usage: Usage | None = None
        self.done = False

    def add(self, usage: Usage) -> None:
        if self.usage is None:
            self.usage = Usage()
        self.usage.add(usage)

    def finish(self, status: int) -> None:
        if not self.done:
            self.done = True
            meter_request(self.gateway, self.ctx, self.endpoint, status, self.usage)


def _finish_metrics(ctx: RequestContext, endpoint: Endpoint, status: int) -> None:
    metrics.requests_counter(endpoint.route, ctx.model_label, status).inc()
    meters = metrics.request_meters(endpoint.route, ctx.model_label)
    meters.latency.observe(time.perf_counter() - ctx.started)
    meters.overhead.observe(ctx.overhead_ms() / 1000)
    if ctx.attempt.deployment is not None:
        metrics.upstream_latency(ctx.attempt.deployment).observe(ctx.attempt.upstream_s)


# --- the hot path ----------------------------------------------------------------------------


async def handle_chat(gateway: Gateway, request: Request, protocol: ChatProtocol) -> Response:
    endpoint = protocol.endpoint
    ctx = new_context(request)
    try:
        # 1. Identity.
        principal = ctx.principal = gateway.authenticate(request, allow_x_api_key=endpoint.accepts_x_api_key)
        # 2. Parse and validate in the caller's protocol.
        chat = protocol.decode(await gateway.read_json(request))
        # 3. Catalog: which model alias, and may this caller use it.
        route = gateway.resolve(chat.model, principal, "chat")
        ctx.model_label = route.name
        ctx.metered_model = chat.model
        # 3b. Knowledge bases named in the `plinth` field: searched with the last user message,
        #     within the key's team and the `retrieve` policy (docs/knowledge.md). Else no cost.
        found = await gateway.retrieve(principal, chat, ctx.request_id) if EXTENSION in chat.extra else None
        # 4. Guardrails scan the input and rewrite `chat` (masks, pseudonyms) or refuse it naming
        #    the rule (docs/guardrails.md). Retrieved passages are screened as indirect input (a
        #    blocked one is dropped) and added as sources. Then policy: may this data go to this
        #    model, and through which deployments (docs/governance.md)? Findings raise the
        #    request's classification.
        guard = gateway.guard_input(request, ctx, principal, chat)
        grounding = await found.ground(chat, guard) if found is not None else None
        decision = gateway.authorize(request, ctx, principal, route, "invoke", guard)
        allowed = decision.deployments if decision is not None and decision.excluded else None
        # 4b. Response cache, only when the key or request opted in (docs/caching.md). Before
        #     admission: a hit reserves no limits or budgets and never reaches the upstream.
        plan = gateway.cache.plan(headers_of(request), principal, chat) if gateway.cache is not None else None
        if plan is not None and gateway.cache is not None:
            cached = await gateway.cache.lookup(plan)
            if cached is not None:
                return _cached_answer(gateway, chat, cached, ctx, protocol, grounding)
        # 5. Limits and budgets: reserve now; settled with the outcome by meter_request.
        await gateway.admit(ctx, principal, route, chat)
        # 6. Route to a deployment and call the provider, with retries and fallback.
        if chat.stream:
            return await _stream(gateway, chat, route, ctx, protocol, plan, guard, allowed, grounding)
        answer = await gateway.router.chat(route, chat, ctx.attempt, allowed)
        if guard is not None:
            answer = guard.check_response(answer)  # output checks, then pseudonyms restored
    except (GatewayError, ProviderError) as exc:
        err = as_gateway_error(exc)
        meter_request(gateway, ctx, endpoint, err.status, None)
        return error_response(err, ctx, endpoint)
    # 7. Meter, settle and answer.
    meter_request(gateway, ctx, endpoint, 200, answer.usage)
    body = orjson.dumps(_encode(protocol, answer, chat.model, grounding))
    headers = response_headers(ctx, endpoint)
    if plan is not None and gateway.cache is not None:
        headers["x-plinth-cache"] = plan.header
        gateway.cache.store(plan, answer)  # written in the background
    _finish_metrics(ctx, endpoint, 200)
    return Response(body, 200, headers, "application/json")


def _encode(
    protocol: ChatProtocol, answer: ChatResponse, model: str, grounding: Grounding | None
) -> dict[str, Any]:
    body = protocol.encode(answer, model)
    if grounding is not None:
        body[EXTENSION] = grounding.extension()  # citations of the knowledge-base sources
    return body


def _cached_answer(
    gateway: Gateway,
    chat: ChatRequest,
    answer: ChatResponse,
    ctx: RequestContext,
    protocol: ChatProtocol,
    grounding: Grounding | None = None,
) -> Response:
    """Serve a cache hit in the caller's protocol (a stream is replayed in one write); cost 0."""
    endpoint = protocol.endpoint
    meter_request(gateway, ctx, endpoint, 200, answer.usage, cache_hit=True)
    headers = response_headers(ctx, endpoint)
    headers["x-plinth-cache"] = "hit"
    _finish_metrics(ctx, endpoint, 200)
    if not chat.stream:
        body = orjson.dumps(_encode(protocol, answer, chat.model, grounding))
        return Response(body, 200, headers, "application/json")
    encoder = protocol.stream_encoder(chat, canonical.replay_stream(answer))
    if grounding is not None:
        encoder = grounding.stream_encoder(encoder)
    events = b"".join(encoder.encode(event) for event in canonical.replay_events(answer))
    body = encoder.start() + events + encoder.finish()
    return Response(body, 200, {**headers, **_SSE_HEADERS}, "text/event-stream")


async def _stream(
    gateway: Gateway,
    chat: ChatRequest,
    route: ModelRoute,
    ctx: RequestContext,
    protocol: ChatProtocol,
    plan: CachePlan | None = None,
    guard: Guard | None = None,
    allowed: tuple[str, ...] | None = None,
    grounding: Grounding | None = None,
) -> Response:
    # Fallback is possible until the first event: the router returns only once it has one.
    stream, first = await gateway.router.stream_chat(route, chat, ctx.attempt, allowed)
    if guard is not None:
        first = guard.stream_guard().wrap(stream, first)  # scanned in windows, bounded hold-back
    encoder = protocol.stream_encoder(chat, stream)
    if grounding is not None:
        encoder = grounding.stream_encoder(encoder)  # the citations ride in the stream
    headers = response_headers(ctx, protocol.endpoint)
    if plan is not None and gateway.cache is not None:
        headers["x-plinth-cache"] = plan.header
        stream.events = gateway.cache.record(plan, stream, first)  # stored once the stream completed
    _finish_metrics(ctx, protocol.endpoint, 200)
    meter = _StreamMeter(gateway, ctx, protocol.endpoint)
    body = _relay(stream, first, encoder, ctx, meter)
    # A body the server never iterates (client gone before the first byte) never runs its
    # `finally`; recording on collection keeps "one record per answered request" true even then.
    weakref.finalize(body, meter.finish, 499).atexit = False
    return StreamingResponse(
        body,
        200,
        {**headers, **_SSE_HEADERS},
        media_type="text/event-stream",
    )


async def _relay(
    stream: ChatStream,
    first: StreamEvent,
    encoder: StreamEncoder,
    ctx: RequestContext,
    meter: _StreamMeter,
) -> AsyncIterator[bytes]:
    """Relay upstream events in the caller's protocol; errors after the first byte go in-band.

    The usage record is written when the stream ends: 200 when complete, the in-band error's status
    after an upstream failure, 499 when the client went away; with whatever usage was metered."""
    status = 499  # until the upstream finished or failed: only a client disconnect leaves it so
    try:
        yield encoder.start() + encoder.encode(first)
        if isinstance(first, UsageEvent):
            meter.add(first.usage)
        async for event in stream.events:
            if isinstance(event, UsageEvent):
                meter.add(event.usage)
            chunk = encoder.encode(event)
            if chunk:
                yield chunk
        status = 200
        yield encoder.finish()
    except ProviderError as exc:
        exc.deployment = exc.deployment or ctx.attempt.deployment
        log.warning("stream %s failed mid-way: %s", ctx.request_id, exc.message)
        metrics.UPSTREAM_ERRORS.labels(ctx.attempt.deployment or "unknown", exc.kind).inc()
        err = GatewayError.from_provider(exc)
        status = err.status
        yield encoder.error(err)
    except Exception:
        status = 500
        raise
    finally:
        meter.finish(status)
        await stream.aclose()


async def handle_embeddings(gateway: Gateway, request: Request, endpoint: Endpoint) -> Response:
    ctx = new_context(request)
    try:
        principal = ctx.principal = gateway.authenticate(request, allow_x_api_key=endpoint.accepts_x_api_key)
        embed = openai_protocol.decode_embedding_request(await gateway.read_json(request))
        answer = await _embed(gateway, request, ctx, principal, embed)
    except (GatewayError, ProviderError) as exc:
        err = as_gateway_error(exc)
        meter_request(gateway, ctx, endpoint, err.status, None)
        return error_response(err, ctx, endpoint)
    meter_request(gateway, ctx, endpoint, 200, answer.usage)
    body = orjson.dumps(openai_protocol.encode_embedding_response(answer, embed.encoding_format))
    headers = response_headers(ctx, endpoint)
    _finish_metrics(ctx, endpoint, 200)
    return Response(body, 200, headers, "application/json")


async def _embed(
    gateway: Gateway, request: Request, ctx: RequestContext, principal: Principal, embed: EmbeddingRequest
) -> EmbeddingResponse:
    route = gateway.resolve(embed.model, principal, "embedding")
    ctx.model_label = route.name
    ctx.metered_model = embed.model
    # Policy, limits and budgets apply here too: embeddings are model calls like any other.
    decision = gateway.authorize(request, ctx, principal, route, "embed")
    allowed = decision.deployments if decision is not None and decision.excluded else None
    await gateway.admit(ctx, principal, route, None)
    return await gateway.router.embed(route, embed, ctx.attempt, allowed)


async def embed_in_process(
    gateway: Gateway, principal: Principal, embed: EmbeddingRequest, endpoint: Endpoint
) -> EmbeddingResponse:
    """`/v1/embeddings` for callers inside the server (knowledge-base ingestion and queries): the
    same catalog, policy, limits, budgets and usage records, on `principal`, without HTTP (no
    headers: the key's own classification and the default region apply). Raises GatewayError."""
    request = Request({"type": "http", "method": "POST", "path": "/v1/embeddings", "headers": []})
    ctx = new_context(request)
    ctx.principal = principal
    try:
        answer = await _embed(gateway, request, ctx, principal, embed)
    except (GatewayError, ProviderError) as exc:
        err = as_gateway_error(exc)
        meter_request(gateway, ctx, endpoint, err.status, None)
        raise err from None
    meter_request(gateway, ctx, endpoint, 200, answer.usage)
    return answer
