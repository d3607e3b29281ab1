"""The shape of `plinth.yaml`, validated once at start-up.

Secrets are `SecretStr`, so they never print in reprs, logs or validation errors. Every model forbids
unknown keys: a typo in the file is an error that names the key, not a silently ignored setting.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from plinth.governance.config import GovernanceConfig
from plinth.guardrails.config import GuardrailsConfig

ProviderType = Literal["openai", "azure", "openai_compatible", "anthropic", "bedrock", "gemini", "local"]
RoutingStrategy = Literal["priority", "weighted", "latency", "least_busy"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 4000
    workers: Annotated[int, Field(ge=1, le=256)] = 1
    max_body_bytes: Annotated[int, Field(ge=1024)] = 20 * 1024 * 1024
    metrics: bool = True
    # Seconds a graceful shutdown waits for in-flight requests.
    shutdown_timeout_s: Annotated[float, Field(gt=0)] = 30.0


class StorageConfig(_Strict):
    """Where Plinth keeps its state: SQLite by default, PostgreSQL when scaled out."""

    # SQLAlchemy URL: sqlite:///path/plinth.db or postgresql+psycopg://user:pass@host/db
    url: SecretStr = SecretStr("sqlite:///plinth.db")
    # How often each worker polls for changed keys: a revoked key stops working within this time.
    key_refresh_s: Annotated[float, Field(gt=0, le=60)] = 0.5


class PriceConfig(_Strict):
    """USD per million tokens; overrides the built-in catalog (negotiated or self-hosted rates)."""

    input_per_mtok: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    output_per_mtok: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    # Prompt-cache reads and writes; absent: billed like uncached input.
    cached_input_per_mtok: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    cache_write_per_mtok: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None


class RedisConfig(_Strict):
    """Shared fast-changing state (limit counters, budgets in flight, caches) across processes."""

    url: SecretStr | None = None  # redis://host:6379/0; None: in-process state (one process only)

    @field_validator("url")
    @classmethod
    def _empty_is_none(cls, v: SecretStr | None) -> SecretStr | None:
        return v if v is None or v.get_secret_value() else None  # `${REDIS_URL:-}` means "no Redis"


class CacheConfig(_Strict):
    """Response caches (docs/caching.md). Keys or requests opt in; `enabled: false` turns it all off."""

    enabled: bool = True
    ttl_s: Annotated[float, Field(gt=0)] = 3600.0  # when the request names no x-plinth-cache-ttl
    max_ttl_s: Annotated[float, Field(gt=0)] = 7 * 86400.0  # ceiling for x-plinth-cache-ttl
    # Cosine similarity at or above which a semantic lookup counts as the same question.
    semantic_threshold: Annotated[float, Field(gt=0, le=1)] = 0.95
    # "local": the in-process all-MiniLM-L6-v2 (needs plinth[local]); else an embedding model alias.
    embedding_model: str = "local"
    # Longer last messages are cached by exact match only (the local model reads 256 tokens).
    semantic_max_chars: Annotated[int, Field(ge=1)] = 1000
    semantic_scan: Annotated[int, Field(ge=1, le=10_000)] = 256  # candidates compared per lookup
    max_entries: Annotated[int, Field(ge=1)] = 10_000  # in-process answers kept (LRU)


class DeploymentConfig(_Strict):
    """One place a model alias can be served from: a provider, an upstream model and credentials."""

    name: str | None = None  # defaults to "<alias>/<provider>/<index>"
    provider: ProviderType | str
    model: str  # the model name the upstream expects; "*" under a wildcard alias
    base_url: str | None = None
    api_key: SecretStr | None = None
    api_version: str | None = None  # Azure OpenAI (for example "2024-10-21"); None uses the v1 API
    region: str | None = None  # AWS region for Bedrock; informative for others
    aws_access_key_id: SecretStr | None = None
    aws_secret_access_key: SecretStr | None = None
    aws_session_token: SecretStr | None = None
    headers: dict[str, SecretStr] = Field(default_factory=dict)
    priority: Annotated[int, Field(ge=0)] = 0  # lower is tried first ("priority" strategy)
    weight: Annotated[float, Field(gt=0)] = 1.0  # share of traffic ("weighted" strategy)
    timeout_s: Annotated[float, Field(gt=0)] = 600.0  # whole request, non-streaming
    connect_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    # Longest wait for the first byte of a stream and between two stream chunks.
    read_timeout_s: Annotated[float, Field(gt=0)] = 120.0
    # Upstream accepts stream_options.include_usage (true for OpenAI, vLLM, recent Ollama).
    stream_usage: bool = True
    embedding_dimensions: int | None = None
    price: PriceConfig | None = None  # overrides the model's price and the catalog

    @field_validator("api_key", "aws_access_key_id", "aws_secret_access_key", "aws_session_token")
    @classmethod
    def _empty_secret_is_none(cls, v: SecretStr | None) -> SecretStr | None:
        # `${VAR:-}` yields "": treat it as "no credential", not as an empty one to send.
        return v if v is None or v.get_secret_value() else None


class RoutingConfig(_Strict):
    strategy: RoutingStrategy = "priority"
    # Extra attempts after the first, across deployments, on retryable errors only.
    retries: Annotated[int, Field(ge=0, le=10)] = 2
    backoff_base_s: Annotated[float, Field(ge=0)] = 0.05
    backoff_max_s: Annotated[float, Field(ge=0)] = 2.0
    # A deployment that fails `allowed_fails` times in a row rests for `cooldown_s`.
    allowed_fails: Annotated[int, Field(ge=1)] = 3
    cooldown_s: Annotated[float, Field(ge=0)] = 30.0


class LimitsConfig(_Strict):
    """Ceilings for one model alias across every caller (see docs/limits.md); None: unlimited."""

    rpm: Annotated[int, Field(ge=1)] | None = None
    tpm: Annotated[int, Field(ge=1)] | None = None
    max_concurrency: Annotated[int, Field(ge=1)] | None = None
    # Output tokens reserved against tokens/min limits when a request sets no max_tokens.
    default_max_output_tokens: Annotated[int, Field(ge=0)] = 1024


class ModelConfig(_Strict):
    """A catalog entry: the name clients ask for and the deployments that can serve it."""

    name: str
    # What the model serves; a wildcard alias that fronts a whole provider can serve "any".
    type: Literal["chat", "embedding", "any"] = "chat"
    deployments: Annotated[list[DeploymentConfig], Field(min_length=1)]
    routing: RoutingConfig = RoutingConfig()
    owned_by: str = "plinth"
    price: PriceConfig | None = None  # for every deployment without its own price
    limits: LimitsConfig | None = None

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("model name must not be empty")
        if "*" in v[:-1]:
            raise ValueError("'*' is only allowed at the end of a model name, as in 'openai/*'")
        return v


class KeyLimitsConfig(_Strict):
    """Ceilings of one key declared in the file; None: unlimited."""

    rpm: Annotated[int, Field(ge=1)] | None = None
    tpm: Annotated[int, Field(ge=1)] | None = None
    max_concurrency: Annotated[int, Field(ge=1)] | None = None


class StaticKeyConfig(_Strict):
    """An API key declared in the file (the tenancy store adds database keys later)."""

    name: str
    key: SecretStr | None = None
    key_sha256: str | None = None
    models: list[str] | None = None  # None: every model
    cache: Literal["exact", "semantic"] | None = None  # opt this key's requests into caching
    limits: KeyLimitsConfig | None = None  # this key's own ceilings (see docs/limits.md)

    @model_validator(mode="after")
    def _one_of(self) -> StaticKeyConfig:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError("give exactly one of 'key' or 'key_sha256'")
        return self


class KnowledgeConfig(_Strict):
    """Knowledge-base ingestion limits (docs/knowledge.md). URL ingestion refuses every address that
    is not globally routable (private, loopback, link-local, ...) unless allowed here."""

    allow_private_urls: bool = False
    # Host names, IP addresses or CIDRs (e.g. "wiki.internal", "10.1.0.0/16") allowed even if private.
    allowed_url_hosts: list[str] = Field(default_factory=list)
    url_max_bytes: Annotated[int, Field(ge=1)] = 20 * 1024 * 1024
    url_timeout_s: Annotated[float, Field(gt=0)] = 30.0  # the whole fetch, redirects included
    url_max_redirects: Annotated[int, Field(ge=0, le=20)] = 5
    upload_max_bytes: Annotated[int, Field(ge=1)] = 20 * 1024 * 1024  # one upload request


class PlinthConfig(_Strict):
    server: ServerConfig = ServerConfig()
    storage: StorageConfig = StorageConfig()
    redis: RedisConfig = RedisConfig()
    cache: CacheConfig = CacheConfig()
    models: list[ModelConfig] = Field(default_factory=list)
    keys: list[StaticKeyConfig] = Field(default_factory=list)
    # Model hub, provider reviews, policies, audit (docs/governance.md); empty: built-in default policy.
    governance: GovernanceConfig = GovernanceConfig()
    # Input and output scanners in profiles (docs/guardrails.md); no default profile: nothing scanned.
    guardrails: GuardrailsConfig = GuardrailsConfig()
    # Knowledge-base ingestion: URL fetch address rules and size/time limits, upload size.
    knowledge: KnowledgeConfig = KnowledgeConfig()

    @model_validator(mode="after")
    def _unique_names(self) -> PlinthConfig:
        seen: set[str] = set()
        for model in self.models:
            if model.name in seen:
                raise ValueError(f"model '{model.name}' is declared twice")
            seen.add(model.name)
        return self
