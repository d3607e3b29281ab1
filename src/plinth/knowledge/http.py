"""Data plane: `POST /v1/knowledge/{kb}/query` with a virtual key, confined to the key's team.

A key sees only its own team's bases; any other base is a 404, the same as one that does not exist.
Platform admin keys see every base. When a Governance object is given, each query is also a
policy decision (`retrieve` on `KnowledgeBase::<id>` with the owning team); a refusal is a 403.
"""

from __future__ import annotations

import asyncio
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
from plinth.knowledge.retrieval import SearchMode
from plinth.providers.base import ProviderError
from plinth.storage import Database

if TYPE_CHECKING:
    from plinth.governance.engine import Governance
    from plinth.knowledge.models import KnowledgeBase
    from plinth.knowledge.store import KnowledgeStore

log = logging.getLogger(__name__)
KNOWLEDGE = Endpoint("knowledge", openai_protocol.error_body)
ANSWER = Endpoint("knowledge_answer", openai_protocol.error_body)
SYSTEM_PROMPT = (
    "Answer the question using only the numbered sources below. Cite the sources you use as [n]. "
    "If the sources do not contain the answer, say that you do not know.\n\n"
)


def _error(status: int, message: str, param: str | None = None) -> GatewayError:
    code = {404: "knowledge_base_not_found", 403: "policy_denied"}.get(status, "invalid_request")
    return GatewayError(status, message, param=param, code=code)


class KnowledgeApi:
    def __init__(self, gateway: Gateway, database: Database, governance: Governance | None = None) -> None:
        self.gateway = gateway
        self.database = database
        self.governance = governance
        self._master_key: bytes | bool | None = False  # read on first use: False = not yet
        self._stores: dict[tuple[str, int], KnowledgeStore] = {}

    def routes(self) -> list[Route]:
        return [
            Route("/v1/knowledge/{kb}/query", self.query, methods=["POST"]),
            Route("/v1/knowledge/{kb}/answer", self.answer, methods=["POST"]),
        ]

    def _key(self) -> bytes | None:
        if self._master_key is False:
            from plinth.knowledge.crypto import CryptoError, master_key_from_env

            try:
                self._master_key = master_key_from_env()
            except CryptoError as exc:
                log.warning("knowledge bases: %s; encrypted bases cannot be read", exc)
                self._master_key = None
        return self._master_key if isinstance(self._master_key, bytes) else None

    def _store(self, settings: dict[str, Any]) -> KnowledgeStore:
        """One store per embedder (numpy, the model and cryptography load on the first query)."""
        from plinth.knowledge.embedders import embedder_for
        from plinth.knowledge.store import KnowledgeStore

        key = (str(settings.get("embedder", "")), int(settings.get("dimensions", 384)))
        store = self._stores.get(key)
        if store is None:
            try:
                embedder = embedder_for(*key)
            except ValueError as exc:
                raise _error(400, f"this knowledge base cannot be queried here: {exc}") from None
            store = self._stores[key] = KnowledgeStore(self.database, embedder, master_key=self._key())
        return store

    async def _retrieve(self, request: Request, ctx: Any, body: Any) -> tuple[Any, KnowledgeBase, list[Any]]:
        """Authenticate, find the base within the key's team, check policy, search. Raises GatewayError."""
        from plinth.knowledge.store import KnowledgeError

        try:
            principal = ctx.principal = self.gateway.authenticate(request, allow_x_api_key=False)
            if body is None:
                body = await self.gateway.read_json(request)
            params = _parse(body)
            ref = request.path_params["kb"]
            if not principal.is_admin and principal.team_id is None:
                raise _error(404, f"knowledge base {ref!r} not found")  # a key without a team owns none
            team = None if principal.is_admin else principal.team_id
            lookup = self._store({"embedder": "hashing", "dimensions": 1})  # get_base embeds nothing
            base: KnowledgeBase = await asyncio.to_thread(lookup.get_base, ref, team)
            self._authorize(principal, base)
            store = self._store(base.settings)
            hits = await asyncio.to_thread(store.search, base.id, **params)
        except KnowledgeError as exc:
            raise _error(exc.status, str(exc)) from None
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
            sources = "\n\n".join(f"[{n}] ({h.meta.get('source')}) {h.text}" for n, h in enumerate(hits, 1))
            chat = openai_protocol.decode_chat_request(
                {
                    "model": model,
                    "messages": [
                        {"role": "system", "content": SYSTEM_PROMPT + (sources or "(no sources found)")},
                        {"role": "user", "content": body["query"]},
                    ],
                }
            )
            route = gateway.resolve(model, principal, "chat")
            ctx.model_label = route.name
            ctx.metered_model = model
            guard = gateway.guard_input(request, ctx, principal, chat)
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

    def _authorize(self, principal: Any, base: KnowledgeBase) -> None:
        if self.governance is None:
            return
        from plinth.governance.config import Level
        from plinth.governance.engine import Resource

        level = Level(principal.data_class)
        decision = self.governance.check(
            principal, "retrieve", Resource("KnowledgeBase", base.id, base.team_id), level
        )
        if not decision.allowed:
            raise _error(403, decision.message or "retrieval refused by policy")


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


def _parse(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _error(400, "the body must be a JSON object")
    query = body.get("query")
    if not isinstance(query, str) or not query.strip():
        raise _error(400, "'query' must be a non-empty string", "query")
    out: dict[str, Any] = {"query": query}
    top_k = body.get("top_k", 5)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= 100:
        raise _error(400, "'top_k' must be an integer from 1 to 100", "top_k")
    out["top_k"] = top_k
    mode = body.get("mode", "hybrid")
    if mode not in {m.value for m in SearchMode}:
        raise _error(400, "'mode' must be one of bm25, dense, hybrid", "mode")
    out["mode"] = SearchMode(mode)
    filters = body.get("filters")
    if filters is not None and not isinstance(filters, dict):
        raise _error(
            400, "'filters' must be an object of metadata field -> value or list of values", "filters"
        )
    out["filters"] = filters
    threshold = body.get("score_threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int | float)):
        raise _error(400, "'score_threshold' must be a number", "score_threshold")
    out["score_threshold"] = threshold
    weights = body.get("weights", [1.0, 1.0])
    if (
        not isinstance(weights, list)
        or len(weights) != 2
        or not all(isinstance(w, int | float) and not isinstance(w, bool) and w >= 0 for w in weights)
    ):
        raise _error(400, "'weights' must be [bm25, dense], two non-negative numbers", "weights")
    out["weights"] = (float(weights[0]), float(weights[1]))
    return out
