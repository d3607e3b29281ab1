"""The limits admission step: requests/min, tokens/min and concurrency per key, team and model.

A request is charged to every scope that has a limit (its key, its key's team, the model alias it
asked for) and is admitted only if it fits in all of them; the backend checks and counts all scopes
in one atomic step, so a refusal by one scope leaves the others untouched. Requests to which no
limit applies return at once, without touching the backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import secrets
import weakref
from collections.abc import Mapping, Sequence
from types import MappingProxyType

from plinth.config.schema import LimitsConfig
from plinth.gateway.admission import Call, Hold, Outcome
from plinth.gateway.errors import GatewayError
from plinth.limits.base import LEASE_S, Backend, Grant, Refusal, Scope
from plinth.tenancy import Principal

log = logging.getLogger("plinth.limits")

DEFAULT_MAX_OUTPUT_TOKENS = 1024  # reserved when neither the request nor the model config says


_NO_HEADERS: Mapping[str, str] = MappingProxyType({})


class _NoHold:
    """The hold of a request no limit applies to: nothing to settle."""

    __slots__ = ()

    headers = _NO_HEADERS

    def settle(self, outcome: Outcome) -> None:
        return None


NO_HOLD = _NoHold()


class CountedHold:
    """A request counted against requests/min only: nothing to give back, headers to show."""

    __slots__ = ("headers",)

    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = headers

    def settle(self, outcome: Outcome) -> None:
        return None


class LimitHold:
    """What one admitted request holds: a token reservation and/or concurrency slots."""

    __slots__ = ("__weakref__", "done", "headers", "lease", "limiter", "scopes", "second", "tokens")

    def __init__(
        self,
        limiter: RateLimiter,
        lease: str,
        scopes: Sequence[Scope],
        tokens: int,
        second: int,
        headers: dict[str, str],
    ) -> None:
        self.limiter = limiter
        self.lease = lease
        self.scopes = scopes
        self.tokens = tokens
        self.second = second
        self.headers = headers
        self.done = False

    def settle(self, outcome: Outcome) -> None:
        if self.done:
            return
        self.done = True
        used = 0
        if outcome.usage is not None and not outcome.cache_hit:  # a cache hit spends no upstream tokens
            used = outcome.usage.total_tokens
        try:
            self.limiter.leased.discard(self)
            self.limiter.backend.release(self.lease, self.scopes, self.tokens, self.second, used)
        except Exception:  # must never raise; what was held expires by itself
            log.exception("limits: releasing %s failed", self.lease)


class RateLimiter:
    """An `Admission` step enforcing the configured limits through one backend."""

    def __init__(self, backend: Backend, *, lease_s: float = LEASE_S) -> None:
        self.backend = backend
        self.lease_s = lease_s
        # Holds with concurrency slots, renewed while alive; a hold dropped without `settle` stops
        # being renewed and its slots expire, like those of a crashed process.
        self.leased: weakref.WeakSet[LimitHold] = weakref.WeakSet()
        self._prefix = secrets.token_hex(6) + ":"  # lease ids unique across processes
        self._seq = itertools.count()
        self._model_scopes: dict[str, Scope | None] = {}
        self._principal_scopes: dict[int, tuple[Principal, tuple[Scope, ...]]] = {}
        self._renewer: asyncio.Task[None] | None = None

    async def admit(self, call: Call) -> Hold:
        principal = call.principal
        model_limits = call.route.config.limits
        if principal.limits is None and principal.team_limits is None and model_limits is None:
            return NO_HOLD  # the common case: no limits, no I/O
        scopes = self._scopes(call, model_limits)
        if not scopes:
            return NO_HOLD
        tokens = self._reservation(call, model_limits) if any(s.tpm is not None for s in scopes) else 0
        lease = self._prefix + str(next(self._seq))
        grant = await self.backend.acquire(lease, scopes, tokens)
        if isinstance(grant, Refusal):
            raise rate_limit_error(grant, scopes[grant.index], tokens)
        headers = success_headers(grant, scopes)
        if not any(s.tpm is not None or s.max_concurrency is not None for s in scopes):
            return CountedHold(headers)  # requests/min only: nothing to give back
        hold = LimitHold(self, lease, scopes, tokens, grant.second, headers)
        if any(s.max_concurrency is not None for s in scopes):
            self.leased.add(hold)
            if self._renewer is None or self._renewer.done():
                self._renewer = asyncio.get_running_loop().create_task(
                    self._renew(), name="plinth-limits-renew"
                )
        return hold

    def _scopes(self, call: Call, model_limits: LimitsConfig | None) -> list[Scope]:
        principal = call.principal
        # A principal's key and team scopes are the same on every request it makes (the key store
        # hands out one Principal per key until something changes): built once, not per request.
        known = self._principal_scopes.get(id(principal))
        if known is not None and known[0] is principal:
            scopes = list(known[1])
        else:
            scopes = self._principal_scopes_of(principal)
            if len(self._principal_scopes) >= 10_000:
                self._principal_scopes.clear()
            self._principal_scopes[id(principal)] = (principal, tuple(scopes))
        if model_limits is not None:
            name = call.route.name
            if name not in self._model_scopes:
                lim_m = model_limits
                has_any = lim_m.rpm is not None or lim_m.tpm is not None or lim_m.max_concurrency is not None
                self._model_scopes[name] = (
                    Scope("m:" + name, f"model '{name}'", lim_m.rpm, lim_m.tpm, lim_m.max_concurrency)
                    if has_any
                    else None
                )
            model_scope = self._model_scopes[name]
            if model_scope is not None:
                scopes.append(model_scope)
        return scopes

    @staticmethod
    def _principal_scopes_of(principal: Principal) -> list[Scope]:
        scopes: list[Scope] = []
        if principal.limits is not None:
            lim = principal.limits
            ident = principal.key_id or principal.name
            scopes.append(
                Scope("k:" + ident, f"key '{principal.name}'", lim.rpm, lim.tpm, lim.max_concurrency)
            )
        if principal.team_limits is not None and principal.team_id is not None:
            lim = principal.team_limits
            label = f"team '{principal.team_name or principal.team_id}'"
            scopes.append(Scope("t:" + principal.team_id, label, lim.rpm, lim.tpm, lim.max_concurrency))
        return scopes

    @staticmethod
    def _reservation(call: Call, model_limits: LimitsConfig | None) -> int:
        """Tokens held against tokens/min until the real usage is known: prompt + most output."""
        output = call.max_output_tokens
        if output is None:
            if call.route.config.type == "embedding":
                output = 0
            elif model_limits is not None:
                output = model_limits.default_max_output_tokens
            else:
                output = DEFAULT_MAX_OUTPUT_TOKENS
        return max(0, call.estimated_input_tokens) + max(0, output)

    async def _renew(self) -> None:
        """Extend the leases of requests still running, every third of the lease time."""
        while True:
            await asyncio.sleep(self.lease_s / 3)
            leases = [(h.lease, h.scopes) for h in list(self.leased) if not h.done]
            if not leases:
                if not self.leased:
                    self._renewer = None
                    return
                continue
            try:
                await self.backend.renew(leases)
            except Exception:
                log.exception("limits: renewing concurrency leases failed")

    async def aclose(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
        await self.backend.aclose()


def _duration(seconds: float) -> str:
    """OpenAI's reset format: '120ms', '1.5s', '1m0s'."""
    ms = max(0, math.ceil(seconds * 1000))
    if ms < 1000:
        return f"{ms}ms"
    minutes, rest = divmod(ms, 60_000)
    text = f"{rest / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{minutes}m{text}" if minutes else text


def success_headers(grant: Grant, scopes: Sequence[Scope]) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers on an admitted request: the tightest scope per counter."""
    headers: dict[str, str] = {}
    requests = [(s.rpm - used[0], s.rpm) for s, used in zip(scopes, grant.used, strict=True) if s.rpm]
    tokens = [(s.tpm - used[1], s.tpm) for s, used in zip(scopes, grant.used, strict=True) if s.tpm]
    reset = _duration(grant.reset_s)
    if requests:
        remaining, limit = min(requests)
        headers["x-ratelimit-limit-requests"] = str(limit)
        headers["x-ratelimit-remaining-requests"] = str(max(0, remaining))
        headers["x-ratelimit-reset-requests"] = reset
    if tokens:
        remaining, limit = min(tokens)
        headers["x-ratelimit-limit-tokens"] = str(limit)
        headers["x-ratelimit-remaining-tokens"] = str(max(0, remaining))
        headers["x-ratelimit-reset-tokens"] = reset
    return headers


def rate_limit_error(refusal: Refusal, scope: Scope, tokens: int) -> GatewayError:
    """The 429 for a refusal: message naming the scope, retry-after and x-ratelimit-* headers."""
    headers: dict[str, str] = {}
    if scope.rpm is not None:
        headers["x-ratelimit-limit-requests"] = str(scope.rpm)
        headers["x-ratelimit-remaining-requests"] = str(max(0, scope.rpm - refusal.requests_used))
        headers["x-ratelimit-reset-requests"] = _duration(refusal.requests_reset_s)
    if scope.tpm is not None:
        headers["x-ratelimit-limit-tokens"] = str(scope.tpm)
        headers["x-ratelimit-remaining-tokens"] = str(max(0, scope.tpm - refusal.tokens_used))
        headers["x-ratelimit-reset-tokens"] = _duration(refusal.tokens_reset_s)
    retry = max(1, math.ceil(refusal.retry_after_s))
    if refusal.kind == "requests":
        message = f"Rate limit reached for {scope.label}: {scope.rpm} requests per minute."
    elif refusal.kind == "tokens":
        message = (
            f"Rate limit reached for {scope.label}: {scope.tpm} tokens per minute "
            f"(this request reserves {tokens}: prompt plus max output tokens)."
        )
    elif refusal.kind == "concurrency":
        message = f"Concurrency limit reached for {scope.label}: {scope.max_concurrency} requests at a time."
    else:
        headers["x-should-retry"] = "false"
        message = (
            f"Request too large for {scope.label}: it may use {tokens} tokens (prompt plus max output "
            f"tokens) but the limit is {scope.tpm} tokens per minute. Lower max_tokens or shorten the prompt."
        )
        return GatewayError(429, message, code="rate_limit_exceeded", headers=headers)
    return GatewayError(
        429,
        f"{message} Retry after {retry}s.",
        code="rate_limit_exceeded",
        retry_after=retry,
        headers=headers,
    )
