"""Output leak check on Tensor Trust prompt-extraction data: balanced accuracy of the `leak` scanner.

    .venv/bin/python bench/leak_bench.py
    .venv/bin/python bench/leak_bench.py --errors      # also list every miss and false alarm
    .venv/bin/python bench/leak_bench.py --learned     # also the learned-scorer experiment (MiniLM)

Data: `../shared/data/injection/tensortrust_extraction_detection.jsonl` (HumanCompatibleAI
tensor-trust-data): 230 model outputs, `is_prompt_extraction` true when the output leaked the
defence (the instructions that guard an access code). Each row has only `sample_id`, the
`access_code`, the `llm_output` and the label, not the defence's text, so the scanner gets the access
code the way the gateway would pass a secret planted in a system prompt: as a canary
(`ScanContext.canaries`), with `system_prompt` unset (it is not in the data). Half the negatives are
the same outputs as positives paired with another defence's access code, so only the relation between
output and secret counts.

Printed:
- balanced accuracy, TPR and TNR at the shipped default threshold (0.5, unchanged by this benchmark)
  on all rows, and over a sweep of thresholds (for reading only);
- 5-fold cross-validation, folds grouped by output text (an output and its re-pairings with other
  codes stay in one fold) and stratified by label: in each fold the threshold is chosen on the other
  four folds (best balanced accuracy over 0.05..0.95, ties to the one nearest the default) and the
  figures are measured on the held-out fold; the mean over folds is the figure to quote;
- µs per output: the first pass (each canary prepared once, as for a fresh planted canary) and warm
  passes (the same canaries again, as on each window of a streamed answer);
- how each true positive was found.

`--learned` (an experiment; nothing of it ships): a logistic regression over features of each
(code, output) pair: the scanner's score, the MiniLM cosine between the code and the output's most
similar sentence, the same corrected for hubness against background answers and secrets written for
this benchmark (CSLS: sentences such as "Access denied." are near every short code), and an
output-only "reveals its instructions" cue. Every feature set in `LEARNED_SETS` is printed (no
selection among them); for each, 5-fold cross-validation with the same folds: the model is fitted and
the threshold chosen on the four training folds, the figures measured on the held-out fold.

Caveat: the checks themselves (hints, numbers in words, sound-alikes...) were written after reading
the misses of this data; cross-validation covers the threshold, not that choice.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from plinth.guardrails.detectors.leaks import LeakScanner as LeakScannerLike

ROOT = Path(__file__).resolve().parent.parent
DATA = (ROOT / ".." / "shared" / "data" / "injection" / "tensortrust_extraction_detection.jsonl").resolve()


def rates(scores: list[float], labels: list[bool], threshold: float) -> tuple[float, float, float]:
    tp = sum(1 for s, y in zip(scores, labels, strict=True) if y and s >= threshold)
    tn = sum(1 for s, y in zip(scores, labels, strict=True) if not y and s < threshold)
    pos = sum(labels)
    neg = len(labels) - pos
    tpr, tnr = tp / pos, tn / neg
    return (tpr + tnr) / 2, tpr, tnr


def folds(rows: list[dict[str, object]], labels: list[bool], k: int) -> list[int]:
    """Fold of each row: rows with the same output share a fold; groups dealt out by label, then hash."""
    groups: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        groups.setdefault(str(row["llm_output"]), []).append(index)

    def order(item: tuple[str, list[int]]) -> tuple[bool, str]:
        text, members = item
        return any(labels[i] for i in members), hashlib.sha256(text.encode()).hexdigest()

    fold_of = [0] * len(rows)
    for n, (_, members) in enumerate(sorted(groups.items(), key=order)):
        for i in members:
            fold_of[i] = n % k
    return fold_of


def choose_threshold(scores: list[float], labels: list[bool], default: float) -> float:
    grid = [round(0.05 * i, 2) for i in range(1, 20)]
    return max(grid, key=lambda t: (round(rates(scores, labels, t)[0], 9), -abs(t - default)))


def cross_validate(
    rows: list[dict[str, object]], scores: list[float], labels: list[bool], default: float, k: int = 5
) -> list[tuple[float, float, float, float, int]]:
    """Per fold: (chosen threshold, held-out balanced accuracy, TPR, TNR, rows)."""
    fold_of = folds(rows, labels, k)
    results = []
    for fold in range(k):
        train = [i for i in range(len(rows)) if fold_of[i] != fold]
        test = [i for i in range(len(rows)) if fold_of[i] == fold]
        threshold = choose_threshold([scores[i] for i in train], [labels[i] for i in train], default)
        ba, tpr, tnr = rates([scores[i] for i in test], [labels[i] for i in test], threshold)
        results.append((threshold, ba, tpr, tnr, len(test)))
    return results


# --- the learned-scorer experiment (--learned) ---------------------------------------------------------

# Output-only cue that an answer recites its instructions or the rules around a secret (generic wording,
# not taken from this data's outputs).
REVEAL = re.compile(
    r"\b(?:my|the|these|your|following|previous|above)\s+(?:instructions?|rules?|prompt|guidelines|logic)\b"
    r"|\bif the (?:user|input)\b|\bsystem prompt\b|\bpre-?prompt\b"
    r"|\b(?:password|passphrase|passcode|access code|secret(?: word| code)?|code ?word)\s+(?:is|was|are)\b"
    r"|\bdo not (?:reveal|mention|tell|share)\b",
    re.IGNORECASE,
)
# Background for the hubness correction, written for this benchmark (not drawn from the data): everyday
# assistant answers, and secrets of the kinds applications plant.
BACKGROUND_ANSWERS = (
    "I'm sorry, but I can't help with that request.", "Sure, here is a short summary of the article.",
    "Thank you for your question.", "Please let me know if you need anything else.",
    "I am an AI assistant and I am happy to help.", "The weather today is sunny with a light breeze.",
    "Here is the Python function you asked for.", "That is not something I am able to share.",
    "Could you clarify what you mean?", "The meeting has been moved to Thursday afternoon.",
    "Your order has been shipped and should arrive soon.", "I cannot do that.",
    "Hello! How can I help you today?", "The capital of Australia is Canberra.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "In summary, the results support the original hypothesis.", "Step one: open the settings menu.",
    "Invalid input, please try again.", "I have updated the document with your changes.",
    "That's a great idea for a birthday party.", "Let me explain how this works.",
    "The recipe needs two cups of flour and one egg.", "Unfortunately, that item is out of stock.",
    "Here are three tips for better sleep.", "The function returns a list of integers.",
    "Error: the request could not be completed.", "I understand your concern.",
    "The train leaves at seven in the morning.", "As a language model, I do not have personal opinions.",
    "This poem is about the changing seasons.", "Once upon a time, there was a small village by the sea.",
    "OK.", "No.", "Yes, that is correct.", "I will follow your instructions carefully.",
    "My purpose is to answer questions politely and accurately.", "The password field cannot be empty.",
    "Please enter your username and password to log in.", "The total comes to forty-two dollars.",
    "The stock market closed higher on Friday.",
)  # fmt: skip
BACKGROUND_SECRETS = (
    "zephyr-7731-quokka", "blue otter", "correct horse battery staple", "sunflower", "marmalade",
    "9f3a61c2d0b4e857", "tangerine dream", "kettle", "Montgomery", "Lisbon", "octopus ink",
    "rainbow-trout-88", "velvet", "4417", "thunderbolt", "the quick brown fox", "glacier", "opensesame",
    "penguin party", "harpsichord", "Q7#kL9!x", "banjo", "nebula-42", "cinnamon roll", "moonlight sonata",
    "parrot", "2019-11-04", "violet fox", "granite", "lighthouse keeper", "copper kettle", "swordfish",
    "Napoleon Bonaparte", "lemon drop", "saxophone", "pineapple pizza", "midnight express", "7 + 5 = 12",
    "dragonfly", "walnut",
)  # fmt: skip
HUB_K = 5
_SENTENCE_END = re.compile(r"(?<=[.!?:;])\s+|\n+")
LEARNED_SETS: tuple[tuple[str, ...], ...] = (
    ("rule",),
    ("rule", "sim"),
    ("rule", "csls"),
    ("rule", "reveal"),
    ("rule", "sim", "reveal"),
    ("rule", "csls", "reveal"),
    ("rule", "sim", "csls", "reveal"),
)


def sentences(text: str, limit: int = 64) -> list[str]:
    """The output's sentences and lines (the first `limit`), or the output itself where it has none."""
    parts = [p.strip() for p in _SENTENCE_END.split(text) if p and p.strip()]
    return parts[:limit] or [text[:500]]


def pair_features(rows: list[dict[str, object]], rule_scores: list[float]) -> tuple[dict[str, Any], float]:
    """Feature columns (name -> array over rows) and MiniLM encoding µs per output (sentences, no cache)."""
    import numpy as np

    from plinth.guardrails.detectors.embedding import encode

    codes = sorted({str(row["access_code"]) for row in rows})
    code_vectors = dict(zip(codes, encode(codes), strict=True))
    answers, secrets = encode(list(BACKGROUND_ANSWERS)), encode(list(BACKGROUND_SECRETS))
    texts = sorted({s for row in rows for s in sentences(str(row["llm_output"]))})
    started = time.perf_counter()
    sentence_vectors = dict(zip(texts, encode(texts), strict=True))
    encode_us = (time.perf_counter() - started) * 1e6 / len(rows)
    sim, csls, reveal = [], [], []
    for row in rows:
        code = code_vectors[str(row["access_code"])]
        matrix = np.stack([sentence_vectors[s] for s in sentences(str(row["llm_output"]))])
        cosines = matrix @ code
        code_hub = float(np.sort(answers @ code)[-HUB_K:].mean())
        sentence_hub = np.sort(matrix @ secrets.T, axis=1)[:, -HUB_K:].mean(axis=1)
        sim.append(float(cosines.max()))
        csls.append(float((2 * cosines - code_hub - sentence_hub).max()))
        reveal.append(min(len(REVEAL.findall(str(row["llm_output"]))), 5) / 5)
    columns = {"rule": rule_scores, "sim": sim, "csls": csls, "reveal": reveal}
    return {name: np.asarray(values, dtype=float) for name, values in columns.items()}, encode_us


Fit = Callable[[Any, Sequence[bool]], Callable[[Any], Sequence[float]]]


def logistic(features: Any, labels: Sequence[bool]) -> Callable[[Any], Sequence[float]]:
    """Logistic regression (balanced classes, C=1): returns the scorer for new rows."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=1.0, class_weight="balanced", max_iter=1000).fit(features, list(labels))
    return lambda rows: [float(p) for p in model.predict_proba(rows)[:, 1]]


def learned_cross_validate(
    features: Any, labels: list[bool], fold_of: list[int], fit: Fit, default: float = 0.5
) -> list[tuple[float, float, float, float, int]]:
    """Per fold: (threshold, held-out balanced accuracy, TPR, TNR, rows); model and threshold from the other folds."""
    results = []
    for fold in sorted(set(fold_of)):
        train = [i for i, f in enumerate(fold_of) if f != fold]
        test = [i for i, f in enumerate(fold_of) if f == fold]
        scorer = fit(features[train], [labels[i] for i in train])
        threshold = choose_threshold(list(scorer(features[train])), [labels[i] for i in train], default)
        ba, tpr, tnr = rates(list(scorer(features[test])), [labels[i] for i in test], threshold)
        results.append((threshold, ba, tpr, tnr, len(test)))
    return results


def learned(rows: list[dict[str, object]], scores: list[float], labels: list[bool]) -> None:
    import numpy as np

    columns, encode_us = pair_features(rows, scores)
    fold_of = folds(rows, labels, 5)
    print(
        f"learned scorer (experiment, not shipped): MiniLM encoding of the outputs' sentences "
        f"{encode_us / 1000:.0f} ms per output (no cache)"
    )
    for names in LEARNED_SETS:
        matrix = np.column_stack([columns[n] for n in names])
        cv = learned_cross_validate(matrix, labels, fold_of, logistic)
        print(
            f"  {' + '.join(names)}: mean held-out balanced accuracy {statistics.mean(r[1] for r in cv):.4f} "
            f"(folds {', '.join(f'{r[1]:.3f}' for r in cv)}; mean TPR {statistics.mean(r[2] for r in cv):.3f}, "
            f"TNR {statistics.mean(r[3] for r in cv):.3f})"
        )


def unrelated(scanner: LeakScannerLike, rows: list[dict[str, object]]) -> None:
    """False alarms where no leak can be: each access code against scientific abstracts."""
    from plinth.guardrails.types import ScanContext, Stage

    corpus = DATA.parent.parent / "scifact" / "corpus.jsonl"
    lines = corpus.read_text(encoding="utf-8").splitlines()[:300]
    texts = [str(json.loads(line)["text"]) for line in lines]
    codes = sorted({str(row["access_code"]) for row in rows if len(str(row["access_code"]).strip()) >= 4})
    alarms: Counter[str] = Counter()
    for code in codes:
        ctx = ScanContext(stage=Stage.OUTPUT, canaries=(code,))
        for text in texts:
            for finding in scanner.scan(text, ctx):
                alarms[finding.rule] += 1
    pairs = len(codes) * len(texts)
    print(
        f"unrelated text: {len(codes)} codes x {len(texts)} SciFact abstracts = {pairs} pairs, "
        f"{sum(alarms.values())} false alarms ({1e4 * sum(alarms.values()) / pairs:.1f} per 10,000): "
        + (", ".join(f"{k} {v}" for k, v in alarms.most_common()) or "none")
    )


def main() -> int:
    parser = argparse.ArgumentParser(description="leak check benchmark")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--errors", action="store_true")
    parser.add_argument(
        "--unrelated",
        action="store_true",
        help="also count false alarms of every access code (4+ characters) on 300 SciFact abstracts",
    )
    parser.add_argument(
        "--learned",
        action="store_true",
        help="also cross-validate the learned-scorer experiment (needs the local MiniLM model and scikit-learn)",
    )
    args = parser.parse_args()
    if not args.data.is_file():
        print(f"leak_bench: no such file: {args.data}", file=sys.stderr)
        return 2

    from plinth.guardrails.detectors.leaks import LeakScanner
    from plinth.guardrails.types import ScanContext, Stage

    rows = [json.loads(line) for line in args.data.read_text(encoding="utf-8").splitlines() if line.strip()]
    scanner = LeakScanner()
    contexts = [ScanContext(stage=Stage.OUTPUT, canaries=(row["access_code"],)) for row in rows]
    scores: list[float] = []
    labels: list[bool] = []
    how: list[str] = []
    started = time.perf_counter()
    for row, ctx in zip(rows, contexts, strict=True):
        leaks = scanner.leaks(row["llm_output"], ctx)
        best = max(leaks, key=lambda item: item[2].score, default=None)
        scores.append(best[2].score if best else 0.0)
        how.append(best[2].how if best else "-")
        labels.append(bool(row["is_prompt_extraction"]))
    first_us = (time.perf_counter() - started) * 1e6 / len(rows)
    warm: list[float] = []
    for _ in range(5):
        started = time.perf_counter()
        for row, ctx in zip(rows, contexts, strict=True):
            scanner.leaks(row["llm_output"], ctx)
        warm.append((time.perf_counter() - started) * 1e6 / len(rows))
    chars = statistics.mean(len(row["llm_output"]) for row in rows)

    ba, tpr, tnr = rates(scores, labels, scanner.threshold)
    print(f"data: {args.data.name}: {len(rows)} outputs ({sum(labels)} leaks); canary = access_code")
    print(
        f"all rows, shipped threshold {scanner.threshold}: balanced accuracy {ba:.4f} "
        f"(TPR {tpr:.4f}, TNR {tnr:.4f})"
    )
    print(
        "threshold sweep (all rows, for reading only): "
        + ", ".join(
            f"{t:.2f}: {rates(scores, labels, t)[0]:.3f}" for t in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
        )
    )
    cv = cross_validate(rows, scores, labels, scanner.threshold)
    for n, (threshold, fold_ba, fold_tpr, fold_tnr, size) in enumerate(cv, 1):
        print(
            f"  fold {n}: threshold {threshold:.2f} (chosen on the other folds), held-out {size} rows: "
            f"balanced accuracy {fold_ba:.4f} (TPR {fold_tpr:.4f}, TNR {fold_tnr:.4f})"
        )
    fold_bas = [item[1] for item in cv]
    print(
        f"5-fold cross-validation (grouped by output, threshold chosen on training folds): mean held-out "
        f"balanced accuracy {statistics.mean(fold_bas):.4f} (sd {statistics.stdev(fold_bas):.4f}); "
        f"mean TPR {statistics.mean(item[2] for item in cv):.4f}, mean TNR {statistics.mean(item[3] for item in cv):.4f}"
    )
    print(
        f"speed: {first_us:.0f} µs per output on the first pass (canary prepared), "
        f"{statistics.median(warm):.0f} µs warm (median of 5 passes); outputs average {chars:.0f} characters"
    )
    found = Counter(h for h, s, y in zip(how, scores, labels, strict=True) if y and s >= scanner.threshold)
    print("true positives by check: " + ", ".join(f"{k} {v}" for k, v in found.most_common()))
    if args.unrelated:
        unrelated(scanner, rows)
    if args.learned:
        learned(rows, scores, labels)
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
