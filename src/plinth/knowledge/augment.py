"""Retrieve and ground: what `/v1/knowledge/{kb}/answer` and the chat endpoints share.

`KnowledgeAccess` finds a key's knowledge base (another team's is a 404, exactly like a missing
one), asks governance whether it may `retrieve` from it, and searches it in a worker thread.
`ground` screens the retrieved passages with the request's guardrails as indirect input (a passage
with a blocking finding, such as an injected instruction, is dropped) and inserts the rest as a
system message of numbered sources; the `Grounding` it returns renders the citations.

The chat endpoints use it when a request names knowledge bases in its `plinth` field:
`{"plinth": {"knowledge_bases": ["handbook"], "top_k": 5}}`. Importing this module loads neither
numpy nor the store: they load on the first knowledge-base request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import orjson

from plinth.gateway.errors import GatewayError
from plinth.gateway.pipeline import EXTENSION
from plinth.knowledge.retrieval import Hit, SearchMode
from plinth.providers.types import ChatRequest, Message, TextPart
from plinth.tenancy import Principal

if TYPE_CHECKING:
    from plinth.gateway.pipeline import Gateway, StreamEncoder
    from plinth.governance.engine import Governance
    from plinth.guardrails.engine import Guard
    from plinth.knowledge.crypto import KeyWrapper
    from plinth.knowledge.ingest_http import IngestApi
    from plinth.knowledge.models import KnowledgeBase
    from plinth.knowledge.store import KnowledgeStore
    from plinth.providers.types import StreamEvent
    from plinth.storage import Database

log = logging.getLogger(__name__)

MAX_BASES = 10
MAX_QUERY_CHARS = 4000  # a long last message is cut to its end for the search
SYSTEM_PROMPT = (
    "Answer the question using only the numbered sources below. Cite the sources you use as [n]. "
    "If the sources do not contain the answer, say that you do not know.\n\n"
)
_SEARCH_FIELDS = {"top_k", "mode", "filters", "score_threshold", "weights"}


ERROR_CODES = {
    404: "knowledge_base_not_found",
    403: "policy_denied",
    409: "conflict",
    413: "request_too_large",
}


def knowledge_error(status: int, message: str, param: str | None = None) -> GatewayError:
    """An error of the knowledge endpoints, with the OpenAI-style `code` for its status."""
    return GatewayError(status, message, param=param, code=ERROR_CODES.get(status, "invalid_request"))


def search_params(body: Any, prefix: str = "", query: str | None = None) -> dict[str, Any]:
    """Validated search arguments from a request body (`query` from the body unless given).
    Errors are 400s naming the field, with `prefix` (`plinth.`) when the fields are nested."""
    if not isinstance(body, dict):
        raise knowledge_error(
            400, f"'{prefix.rstrip('.') or 'body'}' must be a JSON object", prefix.rstrip(".")
        )
    if query is None:
        query = body.get("query")
        if not isinstance(query, str) or not query.strip():
            raise knowledge_error(400, "'query' must be a non-empty string", "query")
    out: dict[str, Any] = {"query": query}
    top_k = body.get("top_k", 5)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= 100:
        raise knowledge_error(400, f"'{prefix}top_k' must be an integer from 1 to 100", f"{prefix}top_k")
    out["top_k"] = top_k
    mode = body.get("mode", "hybrid")
    if mode not in {m.value for m in SearchMode}:
        raise knowledge_error(400, f"'{prefix}mode' must be one of bm25, dense, hybrid", f"{prefix}mode")
    out["mode"] = SearchMode(mode)
    filters = body.get("filters")
    if filters is not None and not isinstance(filters, dict):
        raise knowledge_error(
            400,
            f"'{prefix}filters' must be an object of metadata field -> value or list of values",
            f"{prefix}filters",
        )
    out["filters"] = filters
    threshold = body.get("score_threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int | float)):
        raise knowledge_error(400, f"'{prefix}score_threshold' must be a number", f"{prefix}score_threshold")
    out["score_threshold"] = threshold
    weights = body.get("weights", [1.0, 1.0])
    if (
        not isinstance(weights, list)
        or len(weights) != 2
        or not all(isinstance(w, int | float) and not isinstance(w, bool) and w >= 0 for w in weights)
    ):
        raise knowledge_error(
            400, f"'{prefix}weights' must be [bm25, dense], two non-negative numbers", f"{prefix}weights"
        )
    out["weights"] = (float(weights[0]), float(weights[1]))
    return out


async def follow_jobs(gateway: Gateway) -> None:
    """The app's start hook (a task for the server's life): resume the ingestion jobs a crash or a
    restart interrupted, now and then periodically (ingest_http.IngestApi.follow). Nothing is
    loaded and nothing runs when the app serves no knowledge bases."""
    if gateway.knowledge is not None and gateway.knowledge.ingest is not None:
        await gateway.knowledge.ingest.follow()


class KnowledgeAccess:
    """A key's knowledge bases: team isolation, the `retrieve` policy check, and search.

    One per process, shared by the knowledge endpoints and the chat path, so each base's vector
    matrix is cached once. Stores are built per embedder on first use."""

    def __init__(self, gateway: Gateway, database: Database, governance: Governance | None = None) -> None:
        self.gateway = gateway
        self.database = database
        self.governance = governance
        self._master_key: KeyWrapper | bool | None = False  # read on first use: False = not yet
        self._stores: dict[tuple[str, int], KnowledgeStore] = {}
        self.ingest: IngestApi | None = None  # set by the app's IngestApi (uploads and jobs)

    def master_key(self) -> KeyWrapper | None:
        if self._master_key is False:
            from plinth.knowledge.crypto import CryptoError, master_key_from_env

            try:
                self._master_key = master_key_from_env()
            except CryptoError as exc:
                log.warning("knowledge bases: %s; encrypted bases cannot be read", exc)
                self._master_key = None
        return None if isinstance(self._master_key, bool) else self._master_key

    def store(self, settings: Mapping[str, Any]) -> KnowledgeStore:
        """One store per embedder (numpy, the model and cryptography load on the first query)."""
        from plinth.knowledge.embedders import embedder_for
        from plinth.knowledge.store import KnowledgeStore

        key = (str(settings.get("embedder", "")), int(settings.get("dimensions", 384)))
        store = self._stores.get(key)
        if store is None:
            try:
                embedder = embedder_for(*key)
            except ValueError as exc:
                raise knowledge_error(400, f"this knowledge base cannot be queried here: {exc}") from None
            store = self._stores[key] = KnowledgeStore(self.database, embedder, master_key=self.master_key())
        return store

    def authorize(self, principal: Principal, base: KnowledgeBase, request_id: str | None = None) -> None:
        """The `retrieve` policy decision on the base, recorded in the audit trail (when
        `governance.audit_decisions` is on) like the ingest and model decisions. Raises a 403."""
        if self.governance is None:
            return
        from plinth.governance.config import Level
        from plinth.governance.engine import Resource

        level = Level(principal.data_class)
        decision = self.governance.check(
            principal, "retrieve", Resource("KnowledgeBase", base.id, base.team_id), level
        )
        audit = self.gateway.audit
        if audit is not None and self.governance.settings.audit_decisions:
            audit.record_decision(request_id or "-", principal, decision)
        if not decision.allowed:
            raise knowledge_error(403, decision.message or "retrieval refused by policy")

    async def search(
        self, principal: Principal, ref: str, params: dict[str, Any], request_id: str | None = None
    ) -> tuple[KnowledgeBase, list[Hit]]:
        """The key's base `ref` (id or name), policy-checked, searched. Raises GatewayError.
        `request_id` goes into the audit record of the `retrieve` decision."""
        from plinth.knowledge.embedders import GATEWAY_PREFIX, embed_query
        from plinth.knowledge.store import KnowledgeError

        try:
            if not principal.is_admin and principal.team_id is None:
                raise knowledge_error(
                    404, f"knowledge base {ref!r} not found"
                )  # a key without a team owns none
            team = None if principal.is_admin else principal.team_id
            lookup = self.store({"embedder": "hashing", "dimensions": 1})  # get_base embeds nothing
            base: KnowledgeBase = await asyncio.to_thread(lookup.get_base, ref, team)
            self.authorize(principal, base, request_id)
            store = self.store(base.settings)
            embedder = str(base.settings.get("embedder", ""))
            if embedder.startswith(GATEWAY_PREFIX) and params["mode"] is not SearchMode.BM25:
                # The query is embedded through the gateway too, on the caller's key (metered).
                dims = int(base.settings.get("dimensions", 384))
                vector = await embed_query(self.gateway, principal, embedder, dims, params["query"])
                params = {**params, "query_vector": vector}
            hits = await asyncio.to_thread(store.search, base.id, **params)
        except KnowledgeError as exc:
            raise knowledge_error(exc.status, str(exc)) from None
        return base, hits

    async def retrieve(
        self, principal: Principal, chat: ChatRequest, request_id: str | None = None
    ) -> Retrieval:
        """The chat path: search the bases named in the request's `plinth` field with its last user
        message. The field is removed from the request (it is never sent to a provider)."""
        spec = chat.extra.pop(EXTENSION)
        if not isinstance(spec, dict):
            raise knowledge_error(400, f"'{EXTENSION}' must be a JSON object", EXTENSION)
        unknown = sorted(set(spec) - _SEARCH_FIELDS - {"knowledge_bases"})
        if unknown:
            raise knowledge_error(
                400, f"'{EXTENSION}.{unknown[0]}' is not a known field", f"{EXTENSION}.{unknown[0]}"
            )
        refs = spec.get("knowledge_bases")
        param = f"{EXTENSION}.knowledge_bases"
        if (
            not isinstance(refs, list)
            or not 1 <= len(refs) <= MAX_BASES
            or not all(isinstance(r, str) and r for r in refs)
        ):
            raise knowledge_error(
                400, f"'{param}' must be a list of 1 to {MAX_BASES} knowledge base names or ids", param
            )
        question = next(
            (m.text() for m in reversed(chat.messages) if m.role == "user" and m.text().strip()), ""
        )
        if not question:
            raise knowledge_error(
                400, "knowledge bases need a user message with text to search for", "messages"
            )
        params = search_params(spec, f"{EXTENSION}.", question[-MAX_QUERY_CHARS:])
        found: list[tuple[str, Hit]] = []
        for i, ref in enumerate(dict.fromkeys(refs)):
            try:
                base, hits = await self.search(principal, ref, params, request_id)
            except GatewayError as err:
                err.param = err.param or f"{param}[{i}]"
                raise
            found.extend((base.id, hit) for hit in hits)
        if len(refs) > 1:  # one ranking over all bases (scores of one mode are comparable)
            found = sorted(found, key=lambda pair: -pair[1].score)[: params["top_k"]]
        return Retrieval(found)


@dataclass(slots=True)
class Retrieval:
    """Passages found for a request, not yet screened: `ground` screens and inserts them."""

    passages: list[tuple[str, Hit]]  # (knowledge base id, hit), best first

    async def ground(self, chat: ChatRequest, guard: Guard | None) -> Grounding:
        return await ground(chat, self.passages, guard)


@dataclass(slots=True)
class Grounding:
    """The passages that reached the model (screened, possibly masked) and their citations."""

    passages: list[tuple[str, Hit]]
    dropped: list[tuple[str, Hit]] = field(default_factory=list)

    @property
    def hits(self) -> list[Hit]:
        return [hit for _, hit in self.passages]

    def citations(self) -> list[dict[str, Any]]:
        """`[n]` as in the sources message: the chunk id, document, source and page of each."""
        return [
            {
                "n": n,
                "knowledge_base": kb_id,
                "chunk_id": hit.chunk_id,
                "document_id": hit.document_id,
                "source": hit.meta.get("source"),
                "page": hit.meta.get("page"),
                "score": hit.score,
            }
            for n, (kb_id, hit) in enumerate(self.passages, 1)
        ]

    def extension(self) -> dict[str, Any]:
        """The `plinth` field of a chat answer."""
        return {"citations": self.citations(), "dropped_chunks": len(self.dropped)}

    def stream_encoder(self, encoder: StreamEncoder) -> StreamEncoder:
        """The same citations in a stream: OpenAI gets a last chunk with no choices (like the usage
        chunk) before `[DONE]`; Anthropic gets them in the `message_start` event's message."""
        from plinth.gateway import anthropic_protocol

        if isinstance(encoder, anthropic_protocol.StreamEncoder):
            return _AnthropicCiting(encoder, self.extension())
        return _OpenAICiting(encoder, self.extension())


async def ground(chat: ChatRequest, found: list[tuple[str, Hit]], guard: Guard | None) -> Grounding:
    """Screen the passages as retrieved content (when a guardrail profile applies), then insert the
    survivors as a system message of numbered sources after the request's own system messages.

    The screening runs in a worker thread: the injection classifier takes milliseconds per
    kilobyte, which would otherwise hold up the event loop for every other request."""
    kept, dropped = list(found), []
    if guard is not None and found:
        screened = await asyncio.to_thread(
            guard.screen_retrieved,
            [(f"knowledge[{kb_id}].chunks[{hit.chunk_id}]", hit.text) for kb_id, hit in found],
        )
        kept = []
        for (kb_id, hit), text in zip(found, screened, strict=True):
            if text is None:
                dropped.append((kb_id, hit))
            else:
                kept.append((kb_id, hit if text == hit.text else _with_text(hit, text)))
    sources = "\n\n".join(
        f"[{n}] ({hit.meta.get('source')}) {hit.text}" for n, (_, hit) in enumerate(kept, 1)
    )
    message = Message("system", [TextPart(SYSTEM_PROMPT + (sources or "(no sources found)"))])
    at = next((i for i, m in enumerate(chat.messages) if m.role != "system"), len(chat.messages))
    chat.messages.insert(at, message)
    return Grounding(kept, dropped)


def _with_text(hit: Hit, text: str) -> Hit:
    return replace(hit, text=text)  # keeps what hierarchical hits carry (matched_text, parent_id)


class _OpenAICiting:
    """Wraps an OpenAI chunk encoder: one extra chunk with the citations before `[DONE]`."""

    def __init__(self, inner: Any, extension: dict[str, Any]) -> None:
        self.inner = inner
        self.extension = extension

    def start(self) -> bytes:
        return bytes(self.inner.start())

    def encode(self, event: StreamEvent) -> bytes:
        return bytes(self.inner.encode(event))

    def finish(self) -> bytes:
        head = getattr(self.inner, "_head", {})
        chunk = {**head, "choices": [], EXTENSION: self.extension}
        return b"data: " + orjson.dumps(chunk) + b"\n\n" + bytes(self.inner.finish())

    def error(self, err: GatewayError) -> bytes:
        return bytes(self.inner.error(err))


class _AnthropicCiting(_OpenAICiting):
    """Wraps an Anthropic event encoder: the citations ride in `message_start`'s message."""

    def start(self) -> bytes:
        first, sep, rest = bytes(self.inner.start()).partition(b"\n\n")
        name, _, data = first.partition(b"\ndata: ")
        payload = orjson.loads(data)
        payload["message"][EXTENSION] = self.extension
        return name + b"\ndata: " + orjson.dumps(payload) + sep + rest

    def finish(self) -> bytes:
        return bytes(self.inner.finish())
