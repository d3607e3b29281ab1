"""Chunking: fixed-size word windows with overlap, kept inside structural sections.

Words stand in for tokens (MiniLM reads ~1.3 WordPiece tokens per English word, and truncates at
256, so the default 180 words fits its window). Sections come from the parsers (headings, pages);
a chunk never spans two sections, and a table is one block kept whole when it fits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Section:
    """A structural unit from a parser: its blocks (paragraphs, tables) and where it sits."""

    blocks: list[str]
    heading_path: list[str] = field(default_factory=list)
    page: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Chunk:
    text: str
    meta: dict[str, Any]


def fixed_windows(words: list[str], size: int, overlap: int) -> list[list[str]]:
    if size <= 0 or not 0 <= overlap < size:
        raise ValueError("chunk size must be positive and overlap in [0, size)")
    if len(words) <= size:
        return [words] if words else []
    step = size - overlap
    out = []
    for start in range(0, len(words), step):
        out.append(words[start : start + size])
        if start + size >= len(words):
            break
    return out


def chunk_sections(sections: list[Section], size: int = 180, overlap: int = 30) -> list[Chunk]:
    """Pack whole blocks up to `size` words; split only blocks longer than that, with overlap."""
    chunks: list[Chunk] = []
    for section in sections:
        meta: dict[str, Any] = dict(section.meta)
        if section.heading_path:
            meta["heading_path"] = " > ".join(section.heading_path)
        if section.page is not None:
            meta["page"] = section.page
        current: list[str] = []
        for block in section.blocks:
            words = block.split()
            if not words:
                continue
            if len(words) > size:
                _flush(chunks, current, meta)
                for window in fixed_windows(words, size, overlap):
                    chunks.append(Chunk(" ".join(window), dict(meta)))
                continue
            if sum(len(b.split()) for b in current) + len(words) > size:
                _flush(chunks, current, meta)
            current.append(block.strip())
        _flush(chunks, current, meta)
    return chunks


def _flush(chunks: list[Chunk], current: list[str], meta: dict[str, Any]) -> None:
    if current:
        chunks.append(Chunk("\n\n".join(current), dict(meta)))
        current.clear()
