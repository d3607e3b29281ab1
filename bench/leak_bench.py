"""Output leak check on Tensor Trust prompt-extraction data: balanced accuracy of the `leak` scanner.

    .venv/bin/python bench/leak_bench.py
    .venv/bin/python bench/leak_bench.py --errors      # also list every miss and false alarm

Data: `../shared/data/injection/tensortrust_extraction_detection.jsonl` (HumanCompatibleAI
tensor-trust-data): 230 model outputs, `is_prompt_extraction` true when the output leaked the
defence (the instructions that guard an access code). Each row has the `access_code` and the
`llm_output`, not the defence's full text, so the scanner gets the access code the way the gateway
would pass a secret planted in a system prompt: as a canary (`ScanContext.canaries`), with
`system_prompt` unset (it is not in the data). Half the negatives are the same outputs as positives
paired with another defence's access code, so only the relation between output and secret counts.

Printed: balanced accuracy, TPR and TNR at the shipped threshold, the same over a range of
thresholds (the threshold was chosen on this data: there is no separate split), and how each true
positive was found.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = (ROOT / ".." / "shared" / "data" / "injection" / "tensortrust_extraction_detection.jsonl").resolve()


def rates(scores: list[float], labels: list[bool], threshold: float) -> tuple[float, float, float]:
    tp = sum(1 for s, y in zip(scores, labels, strict=True) if y and s >= threshold)
    tn = sum(1 for s, y in zip(scores, labels, strict=True) if not y and s < threshold)
    pos = sum(labels)
    neg = len(labels) - pos
    tpr, tnr = tp / pos, tn / neg
    return (tpr + tnr) / 2, tpr, tnr


def main() -> int:
    parser = argparse.ArgumentParser(description="leak check benchmark")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--errors", action="store_true")
    args = parser.parse_args()
    if not args.data.is_file():
        print(f"leak_bench: no such file: {args.data}", file=sys.stderr)
        return 2

    from plinth.guardrails.detectors.leaks import LeakScanner
    from plinth.guardrails.types import ScanContext, Stage

    rows = [json.loads(line) for line in args.data.read_text(encoding="utf-8").splitlines() if line.strip()]
    scanner = LeakScanner()
    scores: list[float] = []
    labels: list[bool] = []
    how: list[str] = []
    started = time.perf_counter()
    for row in rows:
        ctx = ScanContext(stage=Stage.OUTPUT, canaries=(row["access_code"],))
        leaks = scanner.leaks(row["llm_output"], ctx)
        best = max(leaks, key=lambda item: item[2].score, default=None)
        scores.append(best[2].score if best else 0.0)
        how.append(best[2].how if best else "-")
        labels.append(bool(row["is_prompt_extraction"]))
    per_row_ms = (time.perf_counter() - started) * 1000 / len(rows)

    ba, tpr, tnr = rates(scores, labels, scanner.threshold)
    print(f"data: {args.data.name}: {len(rows)} outputs ({sum(labels)} leaks); canary = access_code")
    print(
        f"shipped threshold {scanner.threshold}: balanced accuracy {ba:.4f} (TPR {tpr:.4f}, TNR {tnr:.4f}); "
        f"{per_row_ms:.2f} ms per output"
    )
    print(
        "threshold sweep: "
        + ", ".join(
            f"{t:.2f}: {rates(scores, labels, t)[0]:.3f}" for t in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
        )
    )
    found = Counter(h for h, s, y in zip(how, scores, labels, strict=True) if y and s >= scanner.threshold)
    print("true positives by check: " + ", ".join(f"{k} {v}" for k, v in found.most_common()))
    if args.errors:
        for row, s, y, h in zip(rows, scores, labels, how, strict=True):
            if (s >= scanner.threshold) != y:
                kind = "MISS" if y else "FALSE ALARM"
                print(
                    f"{kind} score {s:.2f} ({h}) code={row['access_code'][:40]!r} output={row['llm_output'][:100]!r}"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
