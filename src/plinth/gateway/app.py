"""Assemble the ASGI application: routes, the two inbound protocols, health, metrics, lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from plinth.admin.api import AdminExtension, admin_routes
from plinth.budgets import create_budgets
from plinth.cache import build_cache
from plinth.config import PlinthConfig, load_config
from plinth.gateway import anthropic_protocol, openai_protocol
from plinth.gateway.admission import Admissions
from plinth.gateway.errors import GatewayError
from plinth.gateway.pipeline import (
    ChatProtocol,
    Endpoint,
    Gateway,
    error_response,
    handle_chat,
    handle_embeddings,
    new_context,
)
from plinth.governance.api import GovernanceAdmin
from plinth.governance.audit import AuditLog
from plinth.governance.engine import Governance
from plinth.guardrails.api import GuardrailsAdmin
from plinth.guardrails.engine import Guardrails
from plinth.guardrails.events import EventRecorder
from plinth.knowledge.admin import KnowledgeAdmin
from plinth.knowledge.augment import KnowledgeAccess, follow_jobs
from plinth.knowledge.http import KnowledgeApi
from plinth.limits import build_limiter
from plinth.metering import PriceBook, UsageRecorder
from plinth.observability import metrics
from plinth.observability.metrics import UPSTREAM_ERRORS
from plinth.providers.base import ChatStream, ProviderError
from plinth.providers.http import HttpClient
from plinth.providers.types import ChatRequest
from plinth.routing import Router
from plinth.storage import Database
from plinth.tenancy import ChainedKeyStore, DatabaseKeyStore, StaticKeyStore
from plinth.tenancy.service import TenancyService

log = logging.getLogger("plinth.gateway")

SWITCH_INTERVAL_S = 0.0005  # see the lifespan

OPENAI_CHAT = ChatProtocol(
    endpoint=Endpoint("chat_completions", openai_protocol.error_body),
    decode=openai_protocol.decode_chat_request,
    encode=lambda response, _model: openai_protocol.encode_chat_response(response),
    stream_encoder=lambda chat, stream: openai_protocol.StreamEncoder(
        stream.id, stream.model or chat.model, n=chat.n, include_usage=chat.include_usage
    ),
)
EMBEDDINGS = Endpoint("embeddings", openai_protocol.error_body)
MODELS = Endpoint("models", openai_protocol.error_body, accepts_x_api_key=True)
OTHER = Endpoint("other", openai_protocol.error_body)
ANTHROPIC_ENDPOINT = Endpoint(
    "messages",
    anthropic_protocol.error_body,
    request_id_headers=("x-request-id", "request-id"),
    accepts_x_api_key=True,
)


def _anthropic_stream_encoder(chat: ChatRequest, stream: ChatStream) -> anthropic_protocol.StreamEncoder:
    message_id = stream.id if stream.id.startswith("msg_") else "msg_" + stream.id.split("-")[-1]
    return anthropic_protocol.StreamEncoder(message_id, chat.model)


ANTHROPIC_MESSAGES = ChatProtocol(
    endpoint=ANTHROPIC_ENDPOINT,
    decode=anthropic_protocol.decode_request,
    encode=anthropic_protocol.encode_response,
    stream_encoder=_anthropic_stream_encoder,
)


def _endpoint_for_path(path: str) -> Endpoint:
    """Which error shape an unrouted or failed request gets: Anthropic's under /v1/messages."""
    return ANTHROPIC_ENDPOINT if path.startswith("/v1/messages") else OTHER


@dataclass(frozen=True, slots=True)
class AppSettings:
    config: PlinthConfig
    admin_key: str | None
    dev: bool = False
    # Apply database migrations at start-up. `plinth serve` does it once before starting workers.
    migrate: bool = True


def _count_upstream_error(deployment: str, exc: ProviderError) -> None:
    UPSTREAM_ERRORS.labels(deployment, exc.kind).inc()
    log.warning("upstream %s failed (%s): %s", deployment, exc.kind, exc.message)


async def _warm_up(router: Router) -> None:
    """Call `warmup()` on every provider that has one, one after another; failures are logged
    (a missing optional dependency must not stop the gateway: the first request will say why)."""
    for route in router.all_routes():
        for deployment in route.deployments:
            warmup = getattr(deployment.provider, "warmup", None)
            if not callable(warmup):
                continue
            started = time.perf_counter()
            try:
                await warmup()
            except Exception as exc:
                message = getattr(exc, "message", None) or repr(exc)
                log.warning("warm-up of deployment %s failed: %s", deployment.name, message)
            else:
                log.info("deployment %s warmed up in %.1fs", deployment.name, time.perf_counter() - started)


def create_app(settings: AppSettings) -> Starlette:
    """Build the application. Providers and sessions are created here; sockets open lazily."""
    config = settings.config
    http = HttpClient()
    router = Router(config, http, on_upstream_error=_count_upstream_error)
    database = Database(config.storage.url.get_secret_value())
    if settings.migrate:
        database.migrate()
    tenancy = TenancyService(database)
    database_keys = DatabaseKeyStore(tenancy)
    database_keys.refresh()
    keys = ChainedKeyStore(StaticKeyStore(settings.admin_key, list(config.keys)), database_keys)
    usage = UsageRecorder(database, PriceBook(router.all_routes()))
    limiter = build_limiter(config)  # Redis when redis.url is set, else in-process
    redis_url = config.redis.url.get_secret_value() if config.redis.url is not None else None
    budgets = create_budgets(database, usage.prices, redis_url)  # same prices as the usage records
    cache = build_cache(config, router)  # None when cache.enabled is false
    audit_log = AuditLog(database)  # policy decisions, written in batches off the hot path
    governance = Governance(config, database)  # catalog, reviews, kill switches, policies in memory
    guardrail_events = EventRecorder(database)
    writers = (usage, audit_log, guardrail_events)  # batch inserts on the low-priority writer thread
    guardrails = Guardrails.from_config(config.guardrails, guardrail_events)  # None: nothing to scan
    gateway = Gateway(
        router,
        keys,
        max_body_bytes=config.server.max_body_bytes,
        usage=usage,
        admissions=Admissions([limiter, budgets]),
        cache=cache,
        guardrails=guardrails,
        governance=governance,
        audit=audit_log,
    )
    # Knowledge bases named in chat requests (`plinth` field); shared with /v1/knowledge/*.
    gateway.knowledge = KnowledgeAccess(gateway, database, governance)
    state = {"ready": False}

    async def chat_completions(request: Request) -> Response:
        return await handle_chat(gateway, request, OPENAI_CHAT)

    async def messages(request: Request) -> Response:
        return await handle_chat(gateway, request, ANTHROPIC_MESSAGES)

    async def embeddings(request: Request) -> Response:
        return await handle_embeddings(gateway, request, EMBEDDINGS)

    model_endpoints = (chat_completions, messages, embeddings)  # dispatched by `GatewayApp`

    async def list_models(request: Request) -> Response:
        ctx = new_context(request)
        try:
            principal = gateway.authenticate(request, allow_x_api_key=True)
        except GatewayError as err:
            return error_response(err, ctx, MODELS)
        created = int(time.time())
        data = [
            {"id": route.name, "object": "model", "created": created, "owned_by": route.config.owned_by}
            for route in governance.visible_models(principal, router.all_routes())
        ]
        body = orjson.dumps({"object": "list", "data": data})
        return Response(body, 200, {"x-request-id": ctx.request_id}, "application/json")

    def request_id(request: Request) -> dict[str, str]:
        return {"x-request-id": new_context(request).request_id}

    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok"}', 200, request_id(request), "application/json")

    async def readyz(request: Request) -> Response:
        if state["ready"]:
            return Response(b'{"status":"ready"}', 200, request_id(request), "application/json")
        return Response(b'{"status":"not ready"}', 503, request_id(request), "application/json")

    async def metrics_endpoint(request: Request) -> Response:
        body, content_type = metrics.render()
        return Response(body, 200, request_id(request), content_type)

    async def http_error(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        if status == 404:
            err = GatewayError(404, f"Unknown path: {request.method} {request.url.path}", code="unknown_url")
        elif status == 405:
            err = GatewayError(
                405,
                f"Method {request.method} is not allowed on {request.url.path}",
                code="method_not_allowed",
            )
        else:
            err = GatewayError(status, "The request could not be handled.")
        return error_response(err, new_context(request), _endpoint_for_path(request.url.path))

    async def server_error(request: Request, exc: Exception) -> Response:
        ctx = new_context(request)
        log.exception("unhandled error in request %s", ctx.request_id, exc_info=exc)
        err = GatewayError(500, f"Internal error; quote request id {ctx.request_id} to the operator.")
        return error_response(err, ctx, _endpoint_for_path(request.url.path))

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        # Providers that load something heavy (the local embedding model) warm up in the
        # background: the gateway is ready at once for every other model.
        warming = asyncio.create_task(_warm_up(router), name="plinth-warmup")
        following = asyncio.create_task(
            database_keys.follow(config.storage.key_refresh_s), name="plinth-key-refresh"
        )
        for writer in writers:
            writer.start()
        governing = asyncio.create_task(governance.follow(), name="plinth-governance-refresh")
        resuming = asyncio.create_task(follow_jobs(gateway), name="plinth-kb-jobs")  # crashed ingests
        budgets.start(config.storage.key_refresh_s)
        # Everything built so far lives as long as the process: keep it out of the cyclic GC's
        # scans, which otherwise grow with every imported library and show up as latency spikes.
        gc.collect()
        gc.freeze()
        # Background threads (the usage-record writer, key and budget refreshes) hold the GIL in
        # bursts of Python work; by default the event loop waits up to 5 ms for it, which showed as
        # the 1-connection p99. With 0.5 ms it waits at most that long (docs/benchmarks.md).
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        state["ready"] = True
        try:
            yield
        finally:
            state["ready"] = False
            for task in (warming, following, governing, resuming):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await router.aclose()
            await http.aclose()
            for writer in writers:  # usage records, decisions, guardrail events: write what is left
                await writer.aclose()
            await limiter.aclose()
            await budgets.aclose()  # settlements in flight and pending budget events
            if cache is not None:
                await cache.aclose()  # finish queued cache writes
            database.dispose()

    # Later parts of the product (governance, knowledge bases, ...) add their admin operations here.
    admin_extensions: list[AdminExtension] = []
    admin_extensions.append(GovernanceAdmin(database, config, governance))  # hub, approvals, kill, audit
    admin_extensions.append(GuardrailsAdmin(guardrails))  # session-risk blocks: list, clear
    admin_extensions.append(KnowledgeAdmin(database, config.knowledge))  # knowledge bases, ingest jobs

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/messages", messages, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/embeddings", embeddings, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/models", list_models, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        *KnowledgeApi(gateway, database, governance, config.knowledge).routes(),  # /v1/knowledge/...
        admin_routes(tenancy, keys, admin_extensions),
    ]
    if config.server.metrics:
        routes.append(Route("/metrics", metrics_endpoint, methods=["GET"]))
    handlers: dict[Any, Any] = {HTTPException: http_error, Exception: server_error}
    # The model endpoints skip Starlette's router and middleware (see `GatewayApp`).
    direct = {r.path: r.endpoint for r in routes if isinstance(r, Route) and r.endpoint in model_endpoints}
    app = GatewayApp(direct, server_error, routes=routes, lifespan=lifespan, exception_handlers=handlers)
    app.state.gateway = gateway
    app.state.usage = usage
    app.state.budgets = budgets
    app.state.cache = cache
    app.state.guardrails = guardrails
    app.state.guardrail_events = guardrail_events
    return app


RequestHandler = Callable[[Request], Awaitable[Response]]
ErrorHandler = Callable[[Request, Exception], Awaitable[Response]]


class GatewayApp(Starlette):
    """Starlette, with the model endpoints called straight from the ASGI entry point.

    Every other path goes through Starlette's middleware, router and exception handlers. For
    `POST` on the model endpoints those only repeat what the endpoints do themselves (they answer
    their own errors in the caller's protocol), and they cost 15 µs a request in a warm loop
    (`Starlette.__call__` 23 µs against 7.7 for the endpoint alone, measured; more in a running
    gateway). An exception that escapes the endpoint before the answer started is answered by
    `on_error`, as Starlette's `ServerErrorMiddleware` would."""

    def __init__(self, direct: dict[str, RequestHandler], on_error: ErrorHandler, **options: Any) -> None:
        super().__init__(**options)
        self._direct = direct
        self._on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self._direct.get(scope["path"]) if scope["type"] == "http" else None
        if endpoint is None or scope["method"] != "POST":
            await super().__call__(scope, receive, send)
            return
        scope["app"] = self
        request = Request(scope, receive, send)
        started = False

        async def send_noting_start(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            response = await endpoint(request)
            await response(scope, receive, send_noting_start)
        except Exception as exc:
            if started:
                raise  # the caller has the status line already: the server closes the connection
            await (await self._on_error(request, exc))(scope, receive, send)


def app_from_environment() -> Starlette:
    """Factory for `uvicorn --factory` worker processes: settings travel in environment variables."""
    config = load_config(os.environ.get("PLINTH_CONFIG") or None)
    return create_app(
        AppSettings(
            config=config,
            admin_key=os.environ.get("PLINTH_ADMIN_KEY"),
            dev=os.environ.get("PLINTH_DEV") == "1",
            migrate=False,  # the `plinth serve` supervisor migrated before starting workers
        )
    )
