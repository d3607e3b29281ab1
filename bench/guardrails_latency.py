"""Guardrails latency: the `standard` profile on a 2 KB prompt, CPU only, no NER model.

    .venv/bin/python bench/guardrails_latency.py            # about 20 seconds
    .venv/bin/python bench/guardrails_latency.py --profile strict --runs 5000
    .venv/bin/python bench/guardrails_latency.py --cold --runs 500   # caches evicted before each run

Measures `Guardrails.check_input` (what step 4 of the hot path runs: every scanner of the profile's
input stage over the request's user message, actions applied, the request rewritten) on a 2 KB
English prompt that holds a few identifiers (an e-mail address, a phone number, a card number), and
the output check of a 2 KB answer, whole (`check_response`) and streamed in 4-character deltas
(`StreamGuard`, windowed scanning with hold-back). Each scanner of the input stage is also timed
alone. Targets for the input check: p50 <= 3 ms, p99 <= 10 ms.

Also timed: the input check of turn `--turns` (10) of a chat whose client resends the history (2 KB
prompts, 1 KB answers), with the history cache on (the default: earlier messages' findings are
reused, only the newest message is scanned) and off (`history_cache: 0`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from plinth.gateway.errors import GatewayError  # noqa: E402
from plinth.guardrails.config import GuardrailsConfig  # noqa: E402
from plinth.guardrails.engine import Guardrails  # noqa: E402
from plinth.guardrails.types import ScanContext, Stage  # noqa: E402
from plinth.providers.base import ChatStream  # noqa: E402
from plinth.providers.types import (  # noqa: E402
    ChatChoice,
    ChatRequest,
    ChatResponse,
    FinishEvent,
    Message,
    StreamEvent,
    TextDelta,
    TextPart,
    Usage,
    UsageEvent,
)
from plinth.tenancy import Principal  # noqa: E402

PARAGRAPH = (
    "Hello team, I am preparing the quarterly review of our customer support process and I need a "
    "summary of the main themes from last month's tickets. Most requests were about delayed refunds, "
    "password resets and questions on the new pricing tiers that launched in September. Please group "
    "the issues by product area, estimate how many customers each theme affected, and suggest two or "
    "three concrete improvements we could make before the next release. Keep the tone neutral and "
    "avoid naming individual agents. "
)
IDENTIFIERS = (
    "For the escalated case, the customer wrote from maria.keller@example.org, asked us to call back on "
    "+49 30 901820 44 and quoted the card 4111 1111 1111 1111 for the refund. "
)


def prompt(size: int = 2048) -> str:
    text = IDENTIFIERS
    while len(text) < size:
        text += PARAGRAPH
    return text[:size]


def conversation(turns: int, size: int) -> list[str]:
    """User prompts of `size` characters and answers of half that, alternating, all different."""
    texts: list[str] = []
    for k in range(turns):
        words = PARAGRAPH.split()
        rotated = " ".join(words[k % len(words) :] + words[: k % len(words)])
        user = f"Turn {k + 1}. " + (rotated + " ") * (size // len(rotated) + 1)
        texts.append(user[:size])
        if k < turns - 1:
            texts.append(f"Answer {k + 1}: " + ((rotated + " ") * (size // len(rotated) + 1))[: size // 2])
    return texts


def check_turn(engine: Guardrails, principal: Principal, texts: list[str]) -> None:
    roles = ["user" if i % 2 == 0 else "assistant" for i in range(len(texts))]
    chat = ChatRequest(
        model="m", messages=[Message(r, [TextPart(t)]) for r, t in zip(roles, texts, strict=True)]
    )  # type: ignore[arg-type]
    with contextlib.suppress(GatewayError):  # a block is an outcome too
        engine.check_input(chat, principal, "m", "bench", "session")


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(samples, n=100)
    return q[49] * 1000, q[98] * 1000, statistics.fmean(samples) * 1000


class CacheEvictor:
    """`--cold`: between two timed runs, touch 32 MB and walk a large dict (not timed), so each run
    starts with the CPU caches holding other data, as in the gateway, where a request's own work
    (HTTP, routing, the database) runs between two scans. A loop that scans back to back keeps the
    classifier's vocabulary and the regex programs in cache and understates the cost."""

    def __init__(self) -> None:
        self.buffer = bytearray(32 << 20)
        self.table = {i: str(i) for i in range(200_000)}
        self.ticks = bytes(len(range(0, len(self.buffer), 64)))

    def __call__(self) -> None:
        self.buffer[::64] = self.ticks  # one write per cache line
        sum(map(len, self.table.values()))


BETWEEN: list[Callable[[], object]] = []  # run before each timed call (not timed): `--cold`


def measure(fn: Callable[[], object], runs: int) -> list[float]:
    for _ in range(min(200, runs)):
        fn()  # warm-up: lazy imports, model load, regex caches
    out: list[float] = []
    for _ in range(runs):
        for between in BETWEEN:
            between()
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)
    return out


def line(label: str, samples: list[float]) -> str:
    p50, p99, mean = percentiles(samples)
    return f"  {label:<44} p50 {p50:7.3f} ms   p99 {p99:7.3f} ms   mean {mean:7.3f} ms"


async def stream_once(engine: Guardrails, answer_text: str) -> None:
    chat = ChatRequest(model="m", messages=[Message("user", [TextPart("hi")])])
    guard = engine.check_input(chat, None, "m", "bench", "s")
    assert guard is not None

    async def events() -> AsyncIterator[StreamEvent]:
        for i in range(4, len(answer_text), 4):
            yield TextDelta(answer_text[i : i + 4])
        yield FinishEvent("stop")
        yield UsageEvent(Usage())

    stream = ChatStream(events=events())
    guard.stream_guard().wrap(stream, TextDelta(answer_text[:4]))
    async for _ in stream.events:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="standard")
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--turns", type=int, default=10, help="turns of the chat timed last (history cache)")
    parser.add_argument(
        "--cold", action="store_true", help="evict the CPU caches before each timed run (see CacheEvictor)"
    )
    args = parser.parse_args(argv)
    if args.cold:
        BETWEEN.append(CacheEvictor())

    engine = Guardrails(GuardrailsConfig(default_profile=args.profile, record_events=False))
    profile = engine.profile(args.profile)
    text = prompt(args.size)
    print(f"profile '{args.profile}': input scanners {[s.name for s in profile.input.scanners]}, "
          f"output scanners {[s.name for s in profile.output.scanners]}")  # fmt: skip
    if "injection" not in [s.name for s in profile.input.scanners]:
        print("  NOTE: the injection classifier is not available in this build: not included")
    print(f"prompt: {len(text)} characters (English prose with an e-mail, a phone and a card number); "
          f"{args.runs} runs; python {sys.version.split()[0]}; CPU only, no NER model"
          f"{'; caches evicted before each run (--cold)' if args.cold else ''}")  # fmt: skip
    principal = Principal(name="bench", key_id="k", team_id="t")

    outcome: dict[str, str] = {}

    def check_input() -> None:
        chat = ChatRequest(model="m", messages=[Message("user", [TextPart(text)])])
        try:
            engine.check_input(chat, principal, "m", "bench", "session")
        except GatewayError as err:  # a block is an outcome too (the scan ran in full)
            outcome["blocked"] = err.message

    gc.collect()
    gc.freeze()
    results = [("check_input (whole input stage)", measure(check_input, args.runs))]
    print(
        f"  input outcome: {outcome.get('blocked', 'passed (rewritten: pseudonyms for e-mail, phone, card)')}"
    )
    ctx = ScanContext(Stage.INPUT, request_id="bench", session_id="session")
    for scanner in profile.input.scanners:
        results.append(
            (f"  scanner '{scanner.name}' alone", measure(partial(scanner.scan, text, ctx), args.runs))
        )

    def check_output() -> None:
        chat = ChatRequest(model="m", messages=[Message("user", [TextPart("hi")])])
        guard = engine.check_input(chat, principal, "m", "bench", "session")
        assert guard is not None
        answer = ChatResponse("r", "m", 0, [ChatChoice(0, Message("assistant", [TextPart(text)]))], Usage())
        guard.check_response(answer)

    results.append(("check_response (2 KB answer, whole; new guard)", measure(check_output, args.runs // 2)))

    def one_line_round_trip() -> None:
        """What the gateway benchmark's request costs: a one-line prompt in, a one-line answer out."""
        chat = ChatRequest(model="m", messages=[Message("user", [TextPart("Say hello in five words.")])])
        guard = engine.check_input(chat, principal, "m", "bench", "session")
        assert guard is not None
        reply = Message("assistant", [TextPart("Hello there, how are you today?")])
        guard.check_response(ChatResponse("r", "m", 0, [ChatChoice(0, reply)], Usage()))

    results.append(("one-line prompt in and answer out", measure(one_line_round_trip, args.runs)))
    octx = ScanContext(Stage.OUTPUT, request_id="bench", session_id="session")
    for scanner in profile.output.scanners:
        results.append(
            (
                f"  output scanner '{scanner.name}' alone",
                measure(partial(scanner.scan, text, octx), args.runs // 2),
            )
        )
    # A conversation: the client resends the history every turn. Turn `--turns` carries
    # 2 * turns - 1 messages; with the history cache (the default) only the newest is scanned.
    history = conversation(args.turns, args.size)
    for label, entries in (("history cache on", 4096), ("history cache off", 0)):
        chat_engine = Guardrails(
            GuardrailsConfig.model_validate(
                {"default_profile": args.profile, "record_events": False, "history_cache": entries}
            )
        )
        for k in range(1, args.turns):  # the earlier turns, once, as the conversation went
            check_turn(chat_engine, principal, history[: 2 * k - 1])

        results.append(
            (
                f"turn {args.turns} of a chat ({2 * args.turns - 1} msgs), {label}",
                measure(partial(check_turn, chat_engine, principal, history), max(50, args.runs // 10)),
            )
        )
    loop = asyncio.new_event_loop()
    results.append(
        (
            "stream guard (2 KB answer, 4-char deltas)",
            measure(lambda: loop.run_until_complete(stream_once(engine, text)), max(50, args.runs // 10)),
        )
    )
    loop.close()
    print()
    for label, samples in results:
        print(line(label, samples))
    # The same input stage without the prompt-injection classifier: what the rest costs.
    names = [s.name for s in profile.input.scanners if s.name != "injection"]
    if len(names) < len(profile.input.scanners):
        lean = Guardrails(
            GuardrailsConfig.model_validate(
                {
                    "default_profile": "lean",
                    "record_events": False,
                    "profiles": {"lean": {"extends": args.profile, "input": {"scanners": names}}},
                }
            )
        )

        def check_lean() -> None:
            chat = ChatRequest(model="m", messages=[Message("user", [TextPart(text)])])
            lean.check_input(chat, principal, "m", "bench", "session")

        print(line(f"check_input without 'injection' {names}", measure(check_lean, args.runs)))
    p50, p99, _ = percentiles(results[0][1])
    print(f"\ntargets (input check): p50 {p50:.3f} ms <= 3 ms: {'ok' if p50 <= 3 else 'MISSED'}; "
          f"p99 {p99:.3f} ms <= 10 ms: {'ok' if p99 <= 10 else 'MISSED'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
