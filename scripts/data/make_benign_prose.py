"""Write `injection_benign_prose.jsonl`: benign negatives for the injection classifier.

    .venv/bin/python scripts/data/make_benign_prose.py

Paragraphs of 200-1,200 characters of plain prose from the Python Language Reference as shipped in
the standard library (`pydoc_data.topics`, PSF License), without code examples. The deepset rows
longer than 400 characters are all injections, so a model trained on them alone learnt that long
prose is suspicious (it flagged 99.8% of SciFact abstracts; docs/guardrails.md). Deterministic:
same Python version, same file.
"""

from __future__ import annotations

import json
import pydoc_data.topics
import random
import re
from pathlib import Path

OUT = Path(__file__).resolve().parent / "injection_benign_prose.jsonl"
ROWS = 150  # with the chat follow-ups; 50 before them, when 100 cost deepset recall (docs/guardrails.md)


def paragraphs() -> list[str]:
    found: set[str] = set()
    for text in pydoc_data.topics.topics.values():
        for block in re.split(r"\n\s*\n", text):
            para = " ".join(line.strip() for line in block.strip().splitlines())
            if not 200 <= len(para) <= 1200 or ">>>" in para or "::" in para:
                continue
            if sum(ch.isalpha() or ch == " " for ch in para) / len(para) < 0.9:
                continue  # code, grammar rules, tables
            found.add(para)
    return sorted(found)


def main() -> None:
    rows = random.Random(0).sample(paragraphs(), ROWS)
    OUT.write_text("".join(json.dumps({"text": t, "label": 0}, ensure_ascii=False) + "\n" for t in rows))
    print(f"wrote {OUT} ({ROWS} paragraphs)")


if __name__ == "__main__":
    main()
