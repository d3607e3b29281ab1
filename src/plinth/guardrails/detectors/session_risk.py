"""Session risk: signals accumulated per session and per user across turns, off the hot path.

Why: a multi-turn attack is a series of messages that each pass the per-request checks (a probing
question, a borderline injection, a refused request, a denied topic rephrased) and only together
show intent. The scorer adds up what each turn revealed, lets it decay, and above a threshold blocks
the session (or the user, across sessions) for a cool-off period an admin can clear.

- The hot path only calls `is_blocked` (two dict lookups) and `observe` (a queue put). Scoring runs
  on one background thread: findings are weighted by type, user text is scored by the injection
  classifier (so sub-threshold scores count), answers are checked for refusals.
- Signals decay exponentially (`half_life_s`): slow, spread-out probing is forgotten, a burst is not.
  When a score reaches its threshold the key is blocked until `now + cooloff_s` and its score resets.
- Each text counts once per session: chat clients resend the whole history every turn, so texts are
  remembered by digest (the last `remembered_texts` per session).
- State is in process memory by default; with `redis_url` it lives in Redis (scores updated by a Lua
  script, blocks in a sorted set) and every worker mirrors the active blocks every `sync_interval_s`,
  so a block reaches every worker and replica within that interval and `clear` works everywhere.
"""

from __future__ import annotations

import hashlib
import logging
import math
import queue
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from plinth.guardrails.detectors import options as opt
from plinth.guardrails.types import Finding, ScanContext, Source, Stage

log = logging.getLogger("plinth.guardrails.session_risk")

Scope = Literal["session", "user"]

DEFAULT_WEIGHTS: dict[str, float] = {
    "PROMPT_INJECTION": 1.0,
    "KILL_SWITCH": 1.0,
    "CANARY_LEAK": 1.5,
    "SYSTEM_PROMPT_LEAK": 1.5,
    "DENIED_TOPIC": 0.6,
    "REFUSAL": 0.5,
    "UNGROUNDED": 0.0,
}

_REFUSAL = re.compile(
    r"\b(?:i(?:'m| am)\s+(?:sorry|afraid),?\s+(?:but\s+)?i\s+(?:can(?:no|')t|won't|am\s+(?:not\s+able|unable))"
    r"|i\s+(?:can(?:no|')t|won't|am\s+unable\s+to|am\s+not\s+able\s+to)\s+(?:help|assist|comply|provide|do\s+that|share|reveal)"
    r"|(?:that|this)\s+(?:request\s+)?(?:goes\s+against|violates)\s+(?:my|the)\s+(?:guidelines|policies|polic(?:y|ies))"
    r"|as\s+an\s+ai(?:\s+language\s+model)?,?\s+i\s+(?:can(?:no|')t|am\s+not\s+able|won't)"
    r"|es\s+tut\s+mir\s+leid,?\s+(?:aber\s+)?(?:ich\s+)?(?:kann|darf)\s+(?:ich\s+)?(?:dir\s+|ihnen\s+)?(?:dabei\s+)?(?:nicht|keine)"
    r"|dabei\s+kann\s+ich\s+(?:dir\s+|ihnen\s+)?nicht\s+helfen)",
    re.IGNORECASE,
)


def is_refusal(answer: str) -> bool:
    """The model declined ("I'm sorry, but I can't help with that"); only the first 400 chars count."""
    return _REFUSAL.search(answer[:400]) is not None


@dataclass(frozen=True, slots=True)
class Block:
    scope: Scope
    key: str
    until: float  # wall-clock seconds (time.time())
    score: float  # the score that crossed the threshold

    def remaining_s(self, now: float | None = None) -> float:
        return max(0.0, self.until - (time.time() if now is None else now))


@dataclass(frozen=True, slots=True)
class RiskSettings:
    threshold: float = 2.0  # per session
    user_threshold: float = 6.0  # per user (API key) across sessions; 0 disables user blocks
    half_life_s: float = 600.0
    cooloff_s: float = 900.0
    injection_floor: float = 0.3  # classifier scores of user text below this are noise
    weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    remembered_texts: int = 256
    sync_interval_s: float = 0.5

    def threshold_for(self, scope: Scope) -> float:
        return self.threshold if scope == "session" else self.user_threshold


class RiskStore(Protocol):
    """Where scores and blocks live. Called from the scorer's thread only (and `clear` from admins)."""

    def add(
        self, scope: Scope, key: str, signal: float, now: float, settings: RiskSettings
    ) -> Block | None: ...

    def score(self, scope: Scope, key: str, now: float, settings: RiskSettings) -> float: ...

    def active_blocks(self, now: float) -> list[Block]: ...

    def clear(self, scope: Scope, key: str) -> bool: ...

    def prune(self, now: float, settings: RiskSettings) -> None: ...

    def close(self) -> None: ...


def decayed(score: float, since: float, now: float, half_life_s: float) -> float:
    return score * math.pow(2.0, -max(0.0, now - since) / half_life_s)


class MemoryRiskStore:
    """Scores and blocks in this process."""

    def __init__(self) -> None:
        self._scores: dict[tuple[Scope, str], tuple[float, float]] = {}  # -> (score, at)
        self._blocks: dict[tuple[Scope, str], Block] = {}
        self._lock = threading.Lock()

    def add(self, scope: Scope, key: str, signal: float, now: float, settings: RiskSettings) -> Block | None:
        threshold = settings.threshold_for(scope)
        with self._lock:
            old, at = self._scores.get((scope, key), (0.0, now))
            score = decayed(old, at, now, settings.half_life_s) + signal
            if threshold > 0 and score >= threshold:
                self._scores.pop((scope, key), None)
                block = self._blocks[(scope, key)] = Block(
                    scope, key, now + settings.cooloff_s, round(score, 4)
                )
                return block
            self._scores[(scope, key)] = (score, now)
            return None

    def score(self, scope: Scope, key: str, now: float, settings: RiskSettings) -> float:
        with self._lock:
            old, at = self._scores.get((scope, key), (0.0, now))
        return decayed(old, at, now, settings.half_life_s)

    def active_blocks(self, now: float) -> list[Block]:
        with self._lock:
            return [b for b in self._blocks.values() if b.until > now]

    def clear(self, scope: Scope, key: str) -> bool:
        with self._lock:
            had = self._blocks.pop((scope, key), None) is not None
            had = self._scores.pop((scope, key), None) is not None or had
            return had

    def prune(self, now: float, settings: RiskSettings) -> None:
        """Forget scores decayed below 1% of a signal and expired blocks: memory stays bounded."""
        with self._lock:
            for k in [
                k for k, (s, at) in self._scores.items() if decayed(s, at, now, settings.half_life_s) < 0.01
            ]:
                del self._scores[k]
            for k in [k for k, b in self._blocks.items() if b.until <= now]:
                del self._blocks[k]

    def close(self) -> None:
        pass


_ADD_LUA = """
local v = redis.call('HMGET', KEYS[1], 'score', 'at')
local now = tonumber(ARGV[1])
local score = tonumber(v[1]) or 0
local at = tonumber(v[2]) or now
local age = now - at
if age < 0 then age = 0 end
score = score * math.pow(2, -age / tonumber(ARGV[3])) + tonumber(ARGV[2])
local threshold = tonumber(ARGV[4])
if threshold > 0 and score >= threshold then
  local untl = now + tonumber(ARGV[5])
  redis.call('DEL', KEYS[1])
  redis.call('ZADD', KEYS[2], untl, ARGV[6])
  redis.call('HSET', KEYS[3], ARGV[6], tostring(score))
  return {1, tostring(score), tostring(untl)}
end
redis.call('HSET', KEYS[1], 'score', tostring(score), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[7]))
return {0, tostring(score), '0'}
"""


class RedisRiskStore:
    """Scores and blocks in Redis, shared by every worker and replica (synchronous client: the
    scorer's own thread is its only caller besides admin `clear`)."""

    def __init__(self, url: str, prefix: str = "plinth:risk") -> None:
        import redis

        # Typed Any: redis-py's stubs type replies as a union of sync and async results.
        self._redis: Any = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self._prefix = prefix
        self._blocks_key = f"{prefix}:blocks"
        self._scores_key = f"{prefix}:blockscore"
        self._add = self._redis.register_script(_ADD_LUA)

    def _member(self, scope: Scope, key: str) -> str:
        return f"{scope}\x00{key}"

    def _state(self, scope: Scope, key: str) -> str:
        return f"{self._prefix}:{scope}:{hashlib.sha256(key.encode()).hexdigest()[:32]}"

    def add(self, scope: Scope, key: str, signal: float, now: float, settings: RiskSettings) -> Block | None:
        ttl = max(60, int(settings.half_life_s * 10))
        blocked, score, until = self._add(
            keys=[self._state(scope, key), self._blocks_key, self._scores_key],
            args=[now, signal, settings.half_life_s, settings.threshold_for(scope), settings.cooloff_s,
                  self._member(scope, key), ttl],
        )  # fmt: skip
        if int(blocked):
            return Block(scope, key, float(until), round(float(score), 4))
        return None

    def score(self, scope: Scope, key: str, now: float, settings: RiskSettings) -> float:
        raw = self._redis.hmget(self._state(scope, key), ["score", "at"])
        if raw[0] is None:
            return 0.0
        return decayed(float(raw[0]), float(raw[1] or now), now, settings.half_life_s)

    def active_blocks(self, now: float) -> list[Block]:
        members = self._redis.zrangebyscore(self._blocks_key, now, "+inf", withscores=True)
        if not members:
            return []
        scores = self._redis.hmget(self._scores_key, [m for m, _ in members])
        blocks: list[Block] = []
        for (member, until), score in zip(members, scores, strict=True):
            scope, _, key = member.decode().partition("\x00")
            if scope == "session" or scope == "user":
                blocks.append(Block(scope, key, float(until), float(score or 0.0)))
        return blocks

    def clear(self, scope: Scope, key: str) -> bool:
        member = self._member(scope, key)
        pipe = self._redis.pipeline()
        pipe.zrem(self._blocks_key, member)
        pipe.hdel(self._scores_key, member)
        pipe.delete(self._state(scope, key))
        removed, _, deleted = pipe.execute()
        return bool(removed or deleted)

    def prune(self, now: float, settings: RiskSettings) -> None:
        expired = self._redis.zrangebyscore(self._blocks_key, "-inf", now)
        if expired:
            pipe = self._redis.pipeline()
            pipe.zrem(self._blocks_key, *expired)
            pipe.hdel(self._scores_key, *expired)
            pipe.execute()

    def close(self) -> None:
        self._redis.close()


@dataclass(frozen=True, slots=True)
class _Observation:
    at: float
    session: str | None
    user: str | None
    digest: bytes | None  # of the text, to count each text once per session
    findings: tuple[tuple[str, float], ...] = ()  # (type, score)
    text: str | None = None  # user text to score with the injection classifier
    answer: str | None = None  # model answer to check for a refusal
    refusal: bool = False


_STOP = object()


class SessionRiskScorer:
    """Accumulates risk per session and user on a background thread; O(1) `is_blocked`."""

    def __init__(
        self,
        settings: RiskSettings | None = None,
        store: RiskStore | None = None,
        *,
        clock: Callable[[], float] = time.time,
        injection_scorer: Callable[[str], float] | None = None,
    ) -> None:
        self.settings = settings or RiskSettings()
        self.store: RiskStore = store or MemoryRiskStore()
        self._clock = clock
        self._injection = injection_scorer
        self._queue: queue.SimpleQueue[_Observation | object] = queue.SimpleQueue()
        self._blocks: dict[tuple[Scope, str], Block] = {}  # the hot path's mirror of active blocks
        # session -> digest of each text seen -> the signal already counted for it
        self._seen: OrderedDict[str, OrderedDict[bytes, float]] = OrderedDict()
        self._pending = 0
        self._pending_lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._closed = False
        self.errors = 0

    # --- hot path --------------------------------------------------------------------------------

    def is_blocked(self, session_id: str | None, user: str | None) -> Block | None:
        """The active block of this session or user, if any: two dict lookups, no I/O."""
        now = self._clock()
        for key in (("session", session_id), ("user", user)):
            if key[1] is not None:
                block = self._blocks.get(key)  # type: ignore[arg-type]
                if block is not None and block.until > now:
                    return block
        return None

    def observe(
        self,
        session_id: str | None,
        user: str | None,
        findings: Iterable[Finding] = (),
        *,
        text: str | None = None,
        answer: str | None = None,
        refusal: bool = False,
    ) -> None:
        """Queue what one text revealed; returns at once. `text` (user input) is scored by the
        injection classifier in the background; `answer` is checked for a refusal. A text observed
        again in the same session (the resent history, or the same text with more findings) adds only
        what it adds beyond what was already counted for it."""
        if session_id is None and user is None:
            return
        found = tuple((f.type, f.score) for f in findings)
        digest = None
        if text is not None or answer is not None:
            kind, source = (b"T", text) if text is not None else (b"A", answer or "")
            digest = hashlib.blake2b(kind + source.encode("utf-8", "replace"), digest_size=16).digest()
        if not found and text is None and answer is None and not refusal:
            return
        self._ensure_thread()
        with self._pending_lock:
            self._pending += 1
        self._queue.put(_Observation(self._clock(), session_id, user, digest, found, text, answer, refusal))

    # --- admin -----------------------------------------------------------------------------------

    def clear(self, session_id: str | None = None, user: str | None = None) -> bool:
        """Lift the block and forget the score of a session and/or a user; True if there was one."""
        cleared = False
        for scope, key in (("session", session_id), ("user", user)):
            if key is not None:
                cleared = self.store.clear(scope, key) or cleared  # type: ignore[arg-type]
                cleared = self._blocks.pop((scope, key), None) is not None or cleared  # type: ignore[arg-type]
        return cleared

    def score(self, session_id: str | None = None, user: str | None = None) -> float:
        """Current (decayed) score of a session or a user."""
        scope: Scope = "session" if session_id is not None else "user"
        key = session_id if session_id is not None else user
        return 0.0 if key is None else self.store.score(scope, key, self._clock(), self.settings)

    def blocks(self) -> list[Block]:
        now = self._clock()
        return [b for b in self._blocks.values() if b.until > now]

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything observed so far is scored (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        with self._pending_lock:
            while self._pending > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._pending_lock.wait(left)
        return True

    def close(self) -> None:
        self._closed = True
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout=5)
        self.store.close()

    # --- background ------------------------------------------------------------------------------

    def _ensure_thread(self) -> None:
        if self._thread is not None or self._closed:
            return
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="plinth-session-risk", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        next_sync = 0.0
        next_prune = time.monotonic() + 60.0
        while True:
            try:
                item = self._queue.get(timeout=self.settings.sync_interval_s)
            except queue.Empty:
                item = None
            if item is _STOP:
                return
            try:
                if isinstance(item, _Observation):
                    self._process(item)
                mono = time.monotonic()
                if mono >= next_sync:
                    next_sync = mono + self.settings.sync_interval_s
                    self._sync()
                if mono >= next_prune:
                    next_prune = mono + 60.0
                    self.store.prune(self._clock(), self.settings)
            except Exception:  # keep scoring after a store error (Redis down): the hot path never waits
                self.errors += 1
                log.exception("session risk: scoring failed")
            finally:
                if item is not None:
                    with self._pending_lock:
                        self._pending -= 1
                        self._pending_lock.notify_all()

    def _sync(self) -> None:
        now = self._clock()
        self._blocks = {(b.scope, b.key): b for b in self.store.active_blocks(now)}

    def _new_signal(self, session: str, digest: bytes, signal: float) -> float:
        """The part of `signal` not yet counted for this text in this session."""
        seen = self._seen.get(session)
        if seen is None:
            seen = self._seen[session] = OrderedDict()
            if len(self._seen) > 100_000:
                self._seen.popitem(last=False)
        else:
            self._seen.move_to_end(session)
        counted = seen.get(digest)
        if counted is None or signal > counted:
            seen[digest] = signal
            seen.move_to_end(digest)
            if len(seen) > self.settings.remembered_texts:
                seen.popitem(last=False)
        return signal - (counted or 0.0)

    def signal_of(self, item: _Observation) -> float:
        """The risk one observation adds: per finding type, its weight times its best score."""
        weights = self.settings.weights
        best: dict[str, float] = {}
        for kind, score in item.findings:
            best[kind] = max(best.get(kind, 0.0), score)
        if item.text is not None and self._injection is not None:
            try:
                p = self._injection(item.text)
            except Exception:  # the other scanners' findings still count
                self.errors += 1
                log.exception("session risk: the injection classifier failed; its score is left out")
                p = 0.0
            if p >= self.settings.injection_floor:
                best["PROMPT_INJECTION"] = max(best.get("PROMPT_INJECTION", 0.0), p)
        if item.refusal or (item.answer is not None and is_refusal(item.answer)):
            best["REFUSAL"] = 1.0
        return sum(weights.get(kind, 0.0) * score for kind, score in best.items())

    def _process(self, item: _Observation) -> None:
        if item.digest is not None and item.session is not None and not item.findings and not item.refusal:
            seen = self._seen.get(item.session)
            if seen is not None and item.digest in seen:
                return  # resent history: scored when first seen, not classified again
        signal = self.signal_of(item)
        if item.digest is not None and item.session is not None:
            signal = self._new_signal(item.session, item.digest, signal)
        if signal <= 1e-9:
            return
        for scope, key in (("session", item.session), ("user", item.user)):
            if key is None:
                continue
            block = self.store.add(scope, key, signal, item.at, self.settings)  # type: ignore[arg-type]
            if block is not None:
                self._blocks = {**self._blocks, (block.scope, block.key): block}
                log.warning(
                    "session risk: %s blocked for %.0f s (score %.2f)",
                    scope,
                    block.remaining_s(),
                    block.score,
                )


# --- the scanner ----------------------------------------------------------------------------------

_SCORERS: dict[tuple[Any, ...], SessionRiskScorer] = {}
_SCORERS_LOCK = threading.Lock()
_OPTION_KEYS = (
    "threshold", "user_threshold", "half_life_s", "cooloff_s", "injection_floor", "weights", "redis_url",
)  # fmt: skip


def shared_scorer(settings: RiskSettings, redis_url: str | None = None) -> SessionRiskScorer:
    """One scorer per settings and store in the process, so every profile sees the same sessions."""
    key = (
        settings.threshold, settings.user_threshold, settings.half_life_s, settings.cooloff_s,
        settings.injection_floor, tuple(sorted(settings.weights.items())), redis_url,
    )  # fmt: skip
    with _SCORERS_LOCK:
        scorer = _SCORERS.get(key)
        if scorer is None:
            store: RiskStore = RedisRiskStore(redis_url) if redis_url else MemoryRiskStore()
            scorer = _SCORERS[key] = SessionRiskScorer(
                settings, store, injection_scorer=injection_probability
            )
        return scorer


def injection_probability(text: str) -> float:
    from plinth.guardrails.detectors.injection import InjectionClassifier

    return InjectionClassifier.packaged().worst_window(text).probability


def settings_from_options(options: Mapping[str, Any]) -> tuple[RiskSettings, str | None]:
    name = "session_risk"
    opt.check_keys(name, options, _OPTION_KEYS)
    weights = dict(DEFAULT_WEIGHTS)
    raw = options.get("weights", {})
    if not isinstance(raw, dict):
        raise opt.ScannerOptionError(f"{name}: 'weights' must map finding types to numbers")
    for kind in raw:
        weights[str(kind)] = opt.number(name, raw, kind, 0.0, 0.0, 100.0)
    settings = RiskSettings(
        threshold=opt.number(name, options, "threshold", 2.0, 0.01, 1000.0),
        user_threshold=opt.number(name, options, "user_threshold", 6.0, 0.0, 1000.0),
        half_life_s=opt.number(name, options, "half_life_s", 600.0, 1.0, 30 * 86400.0),
        cooloff_s=opt.number(name, options, "cooloff_s", 900.0, 1.0, 30 * 86400.0),
        injection_floor=opt.number(name, options, "injection_floor", 0.3, 0.0, 1.0),
        weights=weights,
    )
    redis_url = options.get("redis_url")
    if redis_url is not None and (
        not isinstance(redis_url, str) or not redis_url.startswith(("redis://", "rediss://", "unix://"))
    ):
        raise opt.ScannerOptionError(f"{name}: 'redis_url' must be a redis://, rediss:// or unix:// URL")
    return settings, redis_url


class SessionRiskScanner:
    """Scanner `session_risk`: blocks the requests of a blocked session or user, and feeds the scorer.

    On input it reports a SESSION_RISK finding (rule `session_risk.blocked`) while the session or the
    user (`ScanContext.key_id`) is blocked, and queues user text for scoring; on output it queues the
    answer (refusals). The engine adds the other scanners' findings with `observe(text, ctx, findings)`.
    """

    name = "session_risk"
    finding_type = "SESSION_RISK"

    def __init__(self, scorer: SessionRiskScorer) -> None:
        self.scorer = scorer

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> SessionRiskScanner:
        settings, redis_url = settings_from_options(options)
        return cls(shared_scorer(settings, redis_url))

    def scan(self, text: str, ctx: ScanContext) -> list[Finding]:
        if ctx.stage is Stage.INPUT:
            block = self.scorer.is_blocked(ctx.session_id, ctx.key_id)
            if ctx.source is Source.USER:
                self.scorer.observe(ctx.session_id, ctx.key_id, text=text)
            if block is not None:
                return [
                    Finding(
                        self.finding_type, 0, len(text), 1.0, self.name, f"session_risk.{block.scope}_blocked"
                    )
                ]
        elif ctx.source is Source.ASSISTANT:
            self.scorer.observe(ctx.session_id, ctx.key_id, answer=text)
        return []

    def observe(self, text: str, ctx: ScanContext, findings: Sequence[Finding]) -> None:
        """What the other scanners found in `text` (call after scanning it; findings of this scanner
        are ignored). Cheap: a queue put."""
        mine = [f for f in findings if f.scanner != self.name]
        if mine:
            self.scorer.observe(
                ctx.session_id, ctx.key_id, mine, text=text if ctx.stage is Stage.INPUT else None
            )
