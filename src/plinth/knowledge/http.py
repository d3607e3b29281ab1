"""Data plane: `POST /v1/knowledge/{kb}/query` with a virtual key, confined to the key's team.

A key sees only its own team's bases; any other base is a 404, the same as one that does not exist.
Platform admin keys see every base. When a Governance object is given, each query is also a
policy decision (`retrieve` on `KnowledgeBase::<id>` with the owning team); a refusal is a 403.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from plinth.gateway import openai_protocol
from plinth.gateway.errors import GatewayError
from plinth.gateway.pipeline import (
    Endpoint,
    Gateway,
    as_gateway_error,
    error_response,
    meter_request,
    new_context,
)
from plinth.knowledge.augment import KnowledgeAccess, ground
from plinth.knowledge.augment import knowledge_error as _error
from plinth.knowledge.augment import search_params as _parse
from plinth.knowledge.ingest_http import IngestApi
from plinth.providers.base import ProviderError
from plinth.storage import Database

if TYPE_CHECKING:
    from plinth.config.schema import KnowledgeConfig
    from plinth.governance.engine import Governance
    from plinth.knowledge.models import KnowledgeBase

log = logging.getLogger(__name__)
KNOWLEDGE = Endpoint("knowledge", openai_protocol.error_body)
ANSWER = Endpoint("knowledge_answer", openai_protocol.error_body)


class KnowledgeApi:
    def __init__(
        self,
        gateway: Gateway,
        database: Database,
        governance: Governance | None = None,
        knowledge: KnowledgeConfig | None = None,
    ) -> None:
        """`knowledge`: the `knowledge:` configuration (URL ingestion rules, upload and fetch limits)."""
        self.gateway = gateway
        self.database = database
        self.governance = governance
        # Uploads, URL ingestion and ingestion jobs (ingest_http.py).
        self.ingest = IngestApi(gateway, database, governance, knowledge)
        # Base lookup, the `retrieve` check and search, shared with the chat path (augment.py).
        self.access = gateway.knowledge or KnowledgeAccess(gateway, database, governance)

    def routes(self) -> list[Route]:
        return [
            Route("/v1/knowledge/{kb}/query", self.query, methods=["POST"]),
            Route("/v1/knowledge/{kb}/answer", self.answer, methods=["POST"]),
            *self.ingest.routes(),  # /documents (upload, URL), /jobs, /jobs/{job_id}, /jobs/{job_id}/resume
        ]

    async def _retrieve(self, request: Request, ctx: Any, body: Any) -> tuple[Any, KnowledgeBase, list[Any]]:
        """Authenticate, find the base within the key's team, check policy, search. Raises GatewayError."""
        principal = ctx.principal = self.gateway.authenticate(request, allow_x_api_key=False)
        if body is None:
            body = await self.gateway.read_json(request)
        base, hits = await self.access.search(
            principal, request.path_params["kb"], _parse(body), ctx.request_id
        )
        return principal, base, hits

    async def query(self, request: Request) -> Response:
        ctx = new_context(request)
        try:
            _principal, base, hits = await self._retrieve(request, ctx, None)
        except GatewayError as err:
            return error_response(err, ctx, KNOWLEDGE)
        payload = {"object": "list", "knowledge_base": base.id, "data": _citations(hits)}
        return Response(orjson.dumps(payload), 200, {"x-request-id": ctx.request_id}, "application/json")

    async def answer(self, request: Request) -> Response:
        """Retrieve, then generate through a catalog model with the gateway's usual steps.

        The model call goes through the same catalog, guardrails, policy, limits, budgets and
        metering as `/v1/chat/completions` (a non-streaming call)."""
        ctx = new_context(request)
        gateway = self.gateway
        try:
            body = await gateway.read_json(request)
            model = body.get("model") if isinstance(body, dict) else None
            if not isinstance(model, str) or not model:
                raise _error(400, "'model' must name a chat model of the catalog", "model")
            principal, base, hits = await self._retrieve(request, ctx, body)
            chat = openai_protocol.decode_chat_request(
                {"model": model, "messages": [{"role": "user", "content": body["query"]}]}
            )
            route = gateway.resolve(model, principal, "chat")
            ctx.model_label = route.name
            ctx.metered_model = model
            guard = gateway.guard_input(request, ctx, principal, chat)
            # Passages screened as indirect input (a blocked one is dropped), then the sources message.
            hits = (await ground(chat, [(base.id, hit) for hit in hits], guard)).hits
            decision = gateway.authorize(request, ctx, principal, route, "invoke", guard)
            allowed = decision.deployments if decision is not None and decision.excluded else None
            await gateway.admit(ctx, principal, route, chat)
            reply = await gateway.router.chat(route, chat, ctx.attempt, allowed)
            if guard is not None:
                reply = guard.check_response(reply)
        except (GatewayError, ProviderError) as exc:
            err = as_gateway_error(exc)
            meter_request(gateway, ctx, ANSWER, err.status, None)
            return error_response(err, ctx, ANSWER)
        meter_request(gateway, ctx, ANSWER, 200, reply.usage)
        text = reply.choices[0].message.text() if reply.choices else ""
        payload = {
            "object": "knowledge.answer",
            "knowledge_base": base.id,
            "model": model,
            "answer": text,
            "citations": [{"n": n, **c} for n, c in enumerate(_citations(hits), 1)],
            "usage": {
                "prompt_tokens": reply.usage.input_tokens,
                "completion_tokens": reply.usage.output_tokens,
            },
        }
        return Response(orjson.dumps(payload), 200, {"x-request-id": ctx.request_id}, "application/json")


def _citations(hits: list[Any]) -> list[dict[str, Any]]:
    return [
        {
            "object": "knowledge.chunk",
            "chunk_id": hit.chunk_id,
            "document_id": hit.document_id,
            "score": hit.score,
            "text": hit.text,
            "source": hit.meta.get("source"),
            "page": hit.meta.get("page"),
            "metadata": hit.meta,
        }
        for hit in hits
    ]
