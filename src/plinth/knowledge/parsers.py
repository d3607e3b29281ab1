"""File parsers into Sections. Unsupported or corrupt files raise ParseError with a clear reason."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

from plinth.knowledge.chunking import Section

SUPPORTED = {".txt", ".md", ".markdown", ".html", ".htm", ".jsonl", ".pdf", ".docx"}
_HEADING = re.compile(r"^(#{1,6})\s+(.*)$")


class ParseError(Exception):
    pass


def parse_text(text: str) -> list[Section]:
    blocks = [b.strip() for b in re.split(r"\n\s*\n", text) if b.strip()]
    return [Section(blocks)] if blocks else []


def parse_markdown(text: str) -> list[Section]:
    """Sections by heading (with the heading path); paragraphs and tables as blocks."""
    sections: list[Section] = []
    path: list[tuple[int, str]] = []
    lines: list[str] = []

    def close() -> None:
        blocks = [b.strip() for b in re.split(r"\n\s*\n", "\n".join(lines)) if b.strip()]
        if blocks:
            sections.append(Section(blocks, [title for _, title in path]))
        lines.clear()

    for line in text.splitlines():
        match = _HEADING.match(line)
        if match:
            close()
            level = len(match.group(1))
            path = [(lvl, t) for lvl, t in path if lvl < level] + [(level, match.group(2).strip())]
        else:
            lines.append(line)
    close()
    return sections


class _HTMLSections(HTMLParser):
    _SKIP = {"script", "style", "noscript", "head"}
    _BLOCK = {"p", "div", "li", "tr", "pre", "blockquote", "section", "article", "br", "table"}

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[Section] = []
        self.path: list[tuple[int, str]] = []
        self.blocks: list[str] = []
        self.text: list[str] = []
        self.skip = 0
        self.heading: int | None = None

    def _end_block(self) -> None:
        block = " ".join("".join(self.text).split())
        self.text.clear()
        if block:
            self.blocks.append(block)

    def _close_section(self) -> None:
        self._end_block()
        if self.blocks:
            self.sections.append(Section(list(self.blocks), [t for _, t in self.path]))
        self.blocks.clear()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self.skip += 1
        elif re.fullmatch(r"h[1-6]", tag):
            self._close_section()
            self.heading = int(tag[1])
        elif tag in self._BLOCK:
            self._end_block()

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self.skip = max(0, self.skip - 1)
        elif re.fullmatch(r"h[1-6]", tag) and self.heading is not None:
            title = " ".join("".join(self.text).split())
            self.text.clear()
            level = self.heading
            self.path = [(lvl, t) for lvl, t in self.path if lvl < level] + [(level, title)]
            self.heading = None
        elif tag in self._BLOCK or tag in ("td", "th"):
            if tag in ("td", "th"):
                self.text.append(" | ")
            elif tag != "table":
                self._end_block()

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.text.append(data)


def parse_html(text: str) -> list[Section]:
    parser = _HTMLSections()
    parser.feed(text)
    parser.close()
    parser._close_section()
    return parser.sections


def parse_jsonl(text: str) -> list[Section]:
    """One section per line: `text` (or `content`), optional `title`; other fields become metadata."""
    sections = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ParseError(f"line {number} is not JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise ParseError(f"line {number} is not a JSON object")
        body = record.pop("text", None) or record.pop("content", None)
        if not isinstance(body, str):
            raise ParseError(f"line {number} has no string 'text' or 'content'")
        title = record.pop("title", None)
        meta = {k: v for k, v in record.items() if isinstance(v, str | int | float | bool)}
        blocks = ([title] if isinstance(title, str) and title else []) + parse_text_blocks(body)
        sections.append(Section(blocks, [title] if isinstance(title, str) and title else [], meta=meta))
    return sections


def parse_text_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.split(r"\n\s*\n", text) if b.strip()]


def parse_pdf(data: bytes) -> list[Section]:
    try:
        import io

        from pypdf import PdfReader
        from pypdf.errors import PyPdfError
    except ImportError:
        raise ParseError("PDF support needs pypdf: pip install pypdf") from None
    try:
        reader = PdfReader(io.BytesIO(data))
        pages = [page.extract_text() or "" for page in reader.pages]
    except (PyPdfError, ValueError, KeyError, TypeError) as exc:
        raise ParseError(f"unreadable PDF ({type(exc).__name__})") from None
    return [Section(parse_text_blocks(t), page=n) for n, t in enumerate(pages, start=1) if t.strip()]


def parse_docx(data: bytes) -> list[Section]:
    try:
        import io

        import docx
    except ImportError:
        raise ParseError("DOCX support needs python-docx: pip install python-docx") from None
    try:
        document = docx.Document(io.BytesIO(data))
    except Exception as exc:  # python-docx raises zipfile/KeyError/ValueError variants
        raise ParseError(f"unreadable DOCX ({type(exc).__name__})") from None
    sections: list[Section] = []
    path: list[tuple[int, str]] = []
    blocks: list[str] = []
    for paragraph in document.paragraphs:
        style = paragraph.style.name if paragraph.style is not None else ""
        if style.startswith("Heading") and style[-1:].isdigit():
            if blocks:
                sections.append(Section(list(blocks), [t for _, t in path]))
                blocks.clear()
            level = int(style[-1])
            path = [(lvl, t) for lvl, t in path if lvl < level] + [(level, paragraph.text.strip())]
        elif paragraph.text.strip():
            blocks.append(paragraph.text.strip())
    for table in document.tables:
        rows = [" | ".join(cell.text.strip() for cell in row.cells) for row in table.rows]
        blocks.append("\n".join(rows))
    if blocks:
        sections.append(Section(blocks, [t for _, t in path]))
    return sections


def parse_file(path: Path, data: bytes) -> list[Section]:
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED:
        raise ParseError(f"unsupported file type {suffix or '(none)'}")
    if suffix == ".pdf":
        return parse_pdf(data)
    if suffix == ".docx":
        return parse_docx(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ParseError("not UTF-8 text") from None
    if suffix in (".md", ".markdown"):
        return parse_markdown(text)
    if suffix in (".html", ".htm"):
        return parse_html(text)
    if suffix == ".jsonl":
        return parse_jsonl(text)
    return parse_text(text)
