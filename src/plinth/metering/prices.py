"""Prices and the cost of one request.

Built-in prices are a dated snapshot of the public list prices (USD per million tokens) and are
matched by the *upstream* model name, because that is what the provider bills for: an alias
`fast` served by `gpt-4o-mini-2024-07-18` costs what `gpt-4o-mini` costs. Config overrides
(`models[].price`, `deployments[].price`) win over the catalog, for negotiated rates, self-hosted
models and anything newer than this table.

Name matching is exact after normalisation (case, Bedrock region and vendor prefixes, version and
date suffixes), never by loose prefix: an unknown model costs 0 and is logged once, which is visible,
whereas a wrong guess (pricing `gpt-4o-realtime` as `gpt-4o`) would be silently wrong.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from plinth.providers.types import Usage

if TYPE_CHECKING:
    from plinth.config.schema import PriceConfig
    from plinth.routing import Deployment, ModelRoute

log = logging.getLogger("plinth.metering")

PRICES_AS_OF = "2025-09"


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens. `None` for a cached/cache-write price means "same as input"."""

    input_per_mtok: float
    output_per_mtok: float
    cached_input_per_mtok: float | None = None
    cache_write_per_mtok: float | None = None

    def cost(self, usage: Usage) -> float:
        """Uncached input * input + cached * cached + cache writes * write + output * output."""
        cached = usage.cached_input_tokens
        written = usage.cache_creation_input_tokens
        uncached = max(0, usage.input_tokens - cached - written)
        cached_price = (
            self.input_per_mtok if self.cached_input_per_mtok is None else self.cached_input_per_mtok
        )
        write_price = self.input_per_mtok if self.cache_write_per_mtok is None else self.cache_write_per_mtok
        total = (
            uncached * self.input_per_mtok
            + cached * cached_price
            + written * write_price
            + usage.output_tokens * self.output_per_mtok
        )
        return total / 1_000_000

    @classmethod
    def from_config(cls, config: PriceConfig) -> Price:
        return cls(
            config.input_per_mtok,
            config.output_per_mtok,
            config.cached_input_per_mtok,
            config.cache_write_per_mtok,
        )


def _anthropic(input_price: float, output_price: float) -> Price:
    # Anthropic: cache reads cost 10% of input, 5-minute cache writes 125%.
    return Price(input_price, output_price, round(input_price * 0.1, 6), round(input_price * 1.25, 6))


# Public list prices, USD per million tokens (input, output, cached input). Standard tier, short
# context; long-context and batch rates differ: override in config where that matters.
BUILTIN_PRICES: Mapping[str, Price] = {
    # OpenAI
    "gpt-5": Price(1.25, 10.0, 0.125),
    "gpt-5-mini": Price(0.25, 2.0, 0.025),
    "gpt-5-nano": Price(0.05, 0.40, 0.005),
    "gpt-4.1": Price(2.0, 8.0, 0.50),
    "gpt-4.1-mini": Price(0.40, 1.60, 0.10),
    "gpt-4.1-nano": Price(0.10, 0.40, 0.025),
    "gpt-4o": Price(2.50, 10.0, 1.25),
    "gpt-4o-mini": Price(0.15, 0.60, 0.075),
    "gpt-4-turbo": Price(10.0, 30.0),
    "gpt-4": Price(30.0, 60.0),
    "gpt-3.5-turbo": Price(0.50, 1.50),
    "o1": Price(15.0, 60.0, 7.50),
    "o1-mini": Price(1.10, 4.40, 0.55),
    "o3": Price(2.0, 8.0, 0.50),
    "o3-mini": Price(1.10, 4.40, 0.55),
    "o4-mini": Price(1.10, 4.40, 0.275),
    "text-embedding-3-small": Price(0.02, 0.0),
    "text-embedding-3-large": Price(0.13, 0.0),
    "text-embedding-ada-002": Price(0.10, 0.0),
    # Anthropic (the same prices apply on Bedrock and Vertex)
    "claude-opus-4-5": _anthropic(5.0, 25.0),
    "claude-opus-4-1": _anthropic(15.0, 75.0),
    "claude-opus-4": _anthropic(15.0, 75.0),
    "claude-sonnet-4-5": _anthropic(3.0, 15.0),
    "claude-sonnet-4": _anthropic(3.0, 15.0),
    "claude-3-7-sonnet": _anthropic(3.0, 15.0),
    "claude-3-5-sonnet": _anthropic(3.0, 15.0),
    "claude-haiku-4-5": _anthropic(1.0, 5.0),
    "claude-3-5-haiku": _anthropic(0.80, 4.0),
    "claude-3-opus": _anthropic(15.0, 75.0),
    "claude-3-haiku": Price(0.25, 1.25, 0.03, 0.30),
    # Google Gemini (prompts up to 200k tokens)
    "gemini-2.5-pro": Price(1.25, 10.0, 0.125),
    "gemini-2.5-flash": Price(0.30, 2.50, 0.03),
    "gemini-2.5-flash-lite": Price(0.10, 0.40, 0.01),
    "gemini-2.0-flash": Price(0.10, 0.40, 0.025),
    "gemini-2.0-flash-lite": Price(0.075, 0.30),
    "gemini-1.5-pro": Price(1.25, 5.0, 0.3125),
    "gemini-1.5-flash": Price(0.075, 0.30, 0.01875),
    "gemini-embedding-001": Price(0.15, 0.0),
    "text-embedding-004": Price(0.0, 0.0),
    # Amazon Bedrock first-party and partner models (on-demand, us-east-1)
    "amazon.nova-premier": Price(2.50, 12.50, 0.625),
    "amazon.nova-pro": Price(0.80, 3.20, 0.20),
    "amazon.nova-lite": Price(0.06, 0.24, 0.015),
    "amazon.nova-micro": Price(0.035, 0.14, 0.00875),
    "amazon.titan-embed-text": Price(0.02, 0.0),
    "meta.llama3-3-70b-instruct": Price(0.72, 0.72),
    "meta.llama3-1-70b-instruct": Price(0.72, 0.72),
    "meta.llama3-1-8b-instruct": Price(0.22, 0.22),
    "mistral.mistral-large": Price(2.0, 6.0),
    "cohere.embed-english": Price(0.10, 0.0),
    "cohere.embed-multilingual": Price(0.10, 0.0),
}

# Bedrock cross-region inference profiles put a geography before the model id.
_REGION_PREFIX = re.compile(r"^(?:us|eu|apac|jp|au|ca|us-gov|global)\.")
_VENDOR_PREFIX = re.compile(r"^[a-z0-9-]+\.(?=[a-z])")
# Suffixes stripped one at a time, first match first: Bedrock versions ("-v1:0", ":0"), Vertex
# ("@20240620"), snapshot dates ("-2024-07-18", "-20240620", "-0613"), "-latest", Gemini's "-002".
_SUFFIXES = (
    re.compile(r"-v\d+(?::\d+)?$"),
    re.compile(r":\d+$"),
    re.compile(r"@\d{8}$"),
    re.compile(r"-\d{4}-\d{2}-\d{2}$"),
    re.compile(r"-\d{8}$"),
    re.compile(r"-\d{4}$"),
    re.compile(r"-latest$"),
    re.compile(r"-\d{3}$"),
)


def _candidates(model: str) -> Iterator[str]:
    """The names to try for an upstream model id, most specific first."""
    name = model.strip().lower()
    if "/" in name:  # "models/gemini-2.0-flash", "openai/gpt-4o" behind a compatible server
        name = name.rsplit("/", 1)[1]
    name = _REGION_PREFIX.sub("", name)
    bases = [name]
    unvendored = _VENDOR_PREFIX.sub("", name)
    if unvendored != name:
        bases.append(unvendored)  # "anthropic.claude-…" is priced as "claude-…"
    for base in bases:
        yield base
        stripping = True
        while stripping:  # "…-v2@20241022" loses its date, then its version
            stripping = False
            for suffix in _SUFFIXES:
                stripped = suffix.sub("", base)
                if stripped != base:
                    base, stripping = stripped, True
                    yield base
                    break


@lru_cache(maxsize=4096)
def catalog_price(model: str) -> Price | None:
    """The built-in price of an upstream model id, or None when the catalog does not know it."""
    for name in _candidates(model):
        price = BUILTIN_PRICES.get(name)
        if price is not None:
            return price
    return None


@dataclass(frozen=True, slots=True)
class _Target:
    route: ModelRoute
    deployment: Deployment
    override: Price | None


class PriceBook:
    """Prices for the configured catalog: deployment override > model override > built-in table."""

    def __init__(self, routes: Iterable[ModelRoute]) -> None:
        self._targets: dict[tuple[str, str], _Target] = {}
        for route in routes:
            model_price = route.config.price
            for dep in route.deployments:
                chosen = dep.config.price or model_price
                override = Price.from_config(chosen) if chosen is not None else None
                self._targets[(route.name, dep.name)] = _Target(route, dep, override)
        self._warned: set[str] = set()
        self._lock = threading.Lock()  # flushes run in a worker thread

    def price(self, alias: str, deployment: str, requested_model: str) -> tuple[Price | None, str]:
        """The price of one deployment of an alias, and the upstream model it was looked up by."""
        target = self._targets.get((alias, deployment))
        if target is None:
            return None, requested_model
        upstream = target.route.upstream_model(target.deployment, requested_model)
        if target.override is not None:
            return target.override, upstream
        return catalog_price(upstream), upstream

    def cost(self, alias: str, deployment: str | None, requested_model: str, usage: Usage) -> float:
        """Cost in USD of `usage` on a deployment; 0 (logged once per model) when unpriced."""
        if deployment is None or (usage.input_tokens == 0 and usage.output_tokens == 0):
            return 0.0
        price, upstream = self.price(alias, deployment, requested_model)
        if price is None:
            self._warn_unpriced(upstream)
            return 0.0
        return price.cost(usage)

    @property
    def unpriced(self) -> frozenset[str]:
        """Upstream models that were used without a known price (their cost was recorded as 0)."""
        with self._lock:
            return frozenset(self._warned)

    def _warn_unpriced(self, upstream: str) -> None:
        with self._lock:
            if upstream in self._warned:
                return
            self._warned.add(upstream)
        log.warning(
            "no price for upstream model %r: its usage is recorded with cost 0; set `price` on the "
            "model or deployment in the config",
            upstream,
        )
