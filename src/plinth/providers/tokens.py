"""Token estimates for when an upstream reports no usage (some OpenAI-compatible servers).

An estimate is marked `Usage.estimated` so reports can tell it from metered figures. About four
characters of English per token is the usual rule for BPE vocabularies; images count a flat 85
tokens (OpenAI's low-detail price).
"""

from __future__ import annotations

from plinth.providers.types import ChatRequest, ImagePart, TextPart, ThinkingPart

CHARS_PER_TOKEN = 4
IMAGE_TOKENS = 85
MESSAGE_OVERHEAD_TOKENS = 4


def estimate_text_tokens(text: str) -> int:
    return (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


def estimate_prompt_tokens(request: ChatRequest) -> int:
    total = 0
    for message in request.messages:
        total += MESSAGE_OVERHEAD_TOKENS
        for part in message.content:
            if isinstance(part, TextPart | ThinkingPart):
                total += estimate_text_tokens(part.text)
            elif isinstance(part, ImagePart):
                total += IMAGE_TOKENS
        for call in message.tool_calls:
            total += estimate_text_tokens(call.name) + estimate_text_tokens(call.arguments)
    for tool in request.tools:
        total += estimate_text_tokens(tool.name) + estimate_text_tokens(str(tool.parameters))
        if tool.description:
            total += estimate_text_tokens(tool.description)
    return total
