"""Output checks on a stream: text is scanned in windows and released with a bounded hold-back.

Per choice, text (and each tool call's arguments) accumulates in a pending buffer. Once it holds
`window_chars`, it is scanned together with the last `TAIL_CHARS` already sent (context for the
scanners) and released up to a cut `holdback_chars` before its end. The cut then moves back
so that it never splits a finding, nor a run of identifier-like characters that could still grow
into one (a card number arriving in pieces, a placeholder split across chunks): such a run waits
for the next window, up to `max_holdback_chars`. Released text is masked, then its pseudonyms are
restored. At the end of each choice everything left is scanned and released.

A block ends the choice: the caller gets a notice naming the rule and `finish_reason`
`content_filter`; nothing of the blocked window is sent. Reasoning (thinking) deltas pass
unchanged: their signatures cover the exact text.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from plinth.guardrails.config import StreamConfig
from plinth.guardrails.engine import Hit, rewrite, withheld_notice
from plinth.guardrails.types import Action, Finding, Source, Stage
from plinth.providers.base import ChatStream
from plinth.providers.types import FinishEvent, StreamEvent, TextDelta, ToolCallDelta, UsageEvent

if TYPE_CHECKING:
    from plinth.guardrails.engine import Guard

TAIL_CHARS = 64
_BREAKS = frozenset(" \t\r\n\f\v,;\"'`!?")


def _is_break(text: str, i: int) -> bool:
    """Whether the boundary before text[i] may be cut: at a break character, except a single space
    inside a digit group ("4111 1111", "(0) 62")."""
    if i <= 0 or i >= len(text):
        return True
    before, after = text[i - 1], text[i]
    if before == " " and after.isdigit() and i >= 2 and (text[i - 2].isdigit() or text[i - 2] == ")"):
        return False
    if (
        after == " "
        and before.isdigit()
        and i + 1 < len(text)
        and (text[i + 1].isdigit() or text[i + 1] == "(")
    ):
        return False
    return before in _BREAKS or after in _BREAKS


class _Channel:
    __slots__ = ("pending", "scan_at", "tail", "where")

    def __init__(self, where: str) -> None:
        self.pending = ""
        self.tail = ""
        self.where = where
        self.scan_at = 0  # pending length at which the next window is scanned


class StreamGuard:
    """Wraps one stream's events; state per choice and per tool call."""

    def __init__(self, guard: Guard, config: StreamConfig) -> None:
        self.guard = guard
        self.window = config.window_chars
        self.holdback = config.holdback_chars
        self.max_holdback = config.max_holdback_chars
        self._channels: dict[tuple[int, int], _Channel] = {}  # (choice, -1 text | tool_index)
        self._blocked: dict[int, Hit] = {}

    def wrap(self, stream: ChatStream, first: StreamEvent) -> StreamEvent:
        """Guard `stream.events` (which then starts with `first`); returns the event to send first."""
        stream.events = self._run(first, stream.events)
        return TextDelta("", index=getattr(first, "index", 0))

    async def _run(
        self, first: StreamEvent, events: AsyncIterator[StreamEvent]
    ) -> AsyncIterator[StreamEvent]:
        try:
            for out in self.feed(first):
                yield out
            async for event in events:
                for out in self.feed(event):
                    yield out
            for out in self.flush_all():
                yield out
        finally:
            self.guard.engine.record(self.guard, self.guard.output.hits, Stage.OUTPUT)
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()

    # --- events ----------------------------------------------------------------------------------

    def feed(self, event: StreamEvent) -> list[StreamEvent]:
        if isinstance(event, TextDelta):
            return self._add(event.index, -1, event.text, None)
        if isinstance(event, ToolCallDelta):
            return self._add(event.index, event.tool_index, event.arguments, event)
        if isinstance(event, FinishEvent):
            out = self._flush_choice(event.index)
            if event.index in self._blocked:
                event = FinishEvent("content_filter", index=event.index)
            return [*out, event]
        if isinstance(event, UsageEvent):
            return [*self.flush_all(), event]
        return [] if event.index in self._blocked else [event]  # thinking: passed as is

    def flush_all(self) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        for index in sorted({i for i, _ in self._channels}):
            out.extend(self._flush_choice(index))
        return out

    def _add(self, index: int, tool: int, text: str, header: ToolCallDelta | None) -> list[StreamEvent]:
        if index in self._blocked:
            return []
        key = (index, tool)
        out: list[StreamEvent] = []
        channel = self._channels.get(key)
        if channel is None:
            # Another channel of this choice is done (text before a tool call, or the previous call).
            for other in [k for k in self._channels if k[0] == index]:
                out.extend(self._release(other, final=True))
                self._channels.pop(other, None)
            if index in self._blocked:
                return out
            where = f"choices[{index}]." + ("content" if tool < 0 else f"tool_calls[{tool}].arguments")
            channel = self._channels[key] = _Channel(where)
        if header is not None and (header.id is not None or header.name is not None):
            out.append(ToolCallDelta(tool, "", header.id, header.name, index))
        channel.pending += text
        if len(channel.pending) >= max(self.window, channel.scan_at):
            out.extend(self._release(key, final=False))
        return out

    def _flush_choice(self, index: int) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        for key in [k for k in self._channels if k[0] == index]:
            out.extend(self._release(key, final=True))
            self._channels.pop(key, None)
        return out

    # --- one window ------------------------------------------------------------------------------

    def _release(self, key: tuple[int, int], *, final: bool) -> list[StreamEvent]:
        index, tool = key
        channel = self._channels.get(key)
        if channel is None or not channel.pending or index in self._blocked:
            return []
        guard = self.guard
        text = channel.pending
        offset = len(channel.tail)
        scanned = channel.tail + text
        ctx = guard.context(Stage.OUTPUT, Source.ASSISTANT)
        plan = guard.profile.output
        found = [f for f in guard.findings(scanned, plan, ctx, channel.where) if f.end > offset]
        hits = guard.judge(found, plan, channel.where)
        block = next((h for h in hits if h.action is Action.BLOCK), None)
        if block is not None:
            guard.observe(scanned, plan, ctx, found)
            guard.output.hits.extend(hits)
            self._blocked[index] = block
            channel.pending = ""
            return [TextDelta(withheld_notice(block), index=index)]
        cut = len(text) if final else self._cut(text, offset, hits)
        # Session risk hears of each finding once: those held back are found again next window.
        guard.observe(scanned, plan, ctx, [f for f in found if f.start - offset < cut])
        if cut <= 0:
            channel.scan_at = len(text) + self.window  # nothing releasable: wait for a window more
            return []
        released: list[Hit] = []
        for h in hits:
            f = h.finding
            if f.start - offset >= cut:
                continue  # still held back: found again in the next window
            start, end = max(f.start - offset, 0), min(f.end - offset, cut)
            released.append(
                Hit(Finding(f.type, start, end, f.score, f.scanner, f.rule, f.data_class), h.action, h.where)
            )
        guard.output.hits.extend(released)
        segment = text[:cut]
        edits = [h for h in released if h.action in (Action.MASK, Action.PSEUDONYMIZE)]
        if edits:
            segment = rewrite(segment, edits, guard.pseudonyms, restorable=False)
        channel.pending = text[cut:]
        channel.scan_at = 0
        channel.tail = (channel.tail + segment)[-TAIL_CHARS:]
        segment = guard.pseudonyms.restore(segment)
        if tool < 0:
            return [TextDelta(segment, index=index)]
        return [ToolCallDelta(tool, segment, index=index)]

    def _cut(self, text: str, offset: int, hits: list[Hit]) -> int:
        """Where to release up to: `holdback` before the end, moved back out of any finding and any
        identifier-like run; 0 (wait) unless the buffer reached `max_holdback`."""
        cut = len(text) - self.holdback
        moved = True
        while moved and cut > 0:
            moved = False
            for h in hits:
                start, end = h.finding.start - offset, h.finding.end - offset
                if start < cut < end:
                    cut, moved = max(start, 0), True
            while cut > 0 and not _is_break(text, cut):
                cut -= 1
                moved = True
        if cut <= 0 and len(text) >= self.max_holdback:
            return len(text) - self.holdback  # bounded: an endless run is released, scanned as it is
        return max(cut, 0)


__all__ = ["TAIL_CHARS", "StreamGuard"]
