"""Train the prompt-injection classifier shipped inside Plinth and export its weights.

    .venv/bin/python scripts/train_injection_classifier.py \
        --data ../shared/data/injection/deepset_dev.jsonl \
        --data scripts/data/injection_supplement.jsonl \
        --data scripts/data/injection_benign_prose.jsonl \
        --data scripts/data/injection_conversation.jsonl \
        --out src/plinth/guardrails/detectors/injection_model.json.gz

Data: JSON lines with `text` and `label` (1 = injection). The shipped model is trained on 408 rows of
deepset/prompt-injections (Apache-2.0, English and German) plus `scripts/data/injection_supplement.jsonl`
(220 texts written for Plinth, Apache-2.0: ordinary enterprise requests, so that "summarise this"
is not an attack, long business documents, and indirect-injection phrasings),
`scripts/data/injection_conversation.jsonl` (85 chat follow-ups written for Plinth, Apache-2.0: "Are
you able to read PDF files?", "Bist du sicher?"; without them a sentence that addresses the
assistant read as an attack) and `scripts/data/injection_benign_prose.jsonl` (150 paragraphs of the
Python Language Reference, PSF License, made by `scripts/data/make_benign_prose.py`): deepset's long
rows are all injections, and without long benign prose the model took any long text for one. The model is TF-IDF over character 1-5 grams of
the folded text (see `plinth.guardrails.detectors.injection_features`) and a class-balanced logistic
regression. scikit-learn is needed only here; Plinth scores the exported
weights in pure Python (`plinth.guardrails.detectors.injection.InjectionClassifier`).

The decision threshold is chosen without looking at any row twice: stratified k-fold predictions on
the training rows (each row scored by a model that did not see it), then the lowest threshold whose
false-positive rate on those predictions is at most `--target-fpr` (see TARGET_FPR for its value). `bench/injection_bench.py` calls
`train()` from here once per outer fold, so the figures it prints are for this exact procedure.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import sklearn
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from plinth.guardrails.detectors.injection_features import NGRAM_MAX, NGRAM_MIN, char_ngrams

C = 10.0  # inverse L2 strength; chosen by cross-validation (see docs/guardrails.md)
INNER_FOLDS = 5
SEED = 0
# False-positive rates the thresholds aim for on the inner out-of-fold scores. Those scores come from
# models trained on 80% of the rows, and the supplements' negatives are easier than deepset's, so
# the target is not the FPR obtained on held-out deepset rows in bench/injection_bench.py. With the
# chat follow-ups (injection_conversation.jsonl, 2026-12-07) 0.08 gave held-out FPR 0.065 and 0.06
# gave 0.042 at TPR 0.90; 0.06 was picked after looking at that nested result, so the bench figure
# carries that small selection bias (as the earlier 0.08 did).
TARGET_FPR = 0.06
SENSITIVE_FPR = 0.15  # the threshold for retrieved and tool text
FORMAT = 1
LICENCES = (
    "deepset_dev.jsonl: deepset/prompt-injections, Apache-2.0; "
    "injection_supplement.jsonl and injection_conversation.jsonl: written for Plinth, Apache-2.0; "
    "injection_benign_prose.jsonl: Python Language Reference (pydoc_data), PSF License"
)


def load_jsonl(path: Path) -> tuple[list[str], list[int]]:
    texts: list[str] = []
    labels: list[int] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row.get("text"), str) or row.get("label") not in (0, 1):
                raise SystemExit(f"{path}:{lineno}: each line needs 'text' (string) and 'label' (0 or 1)")
            texts.append(row["text"])
            labels.append(int(row["label"]))
    return texts, labels


def fit(texts: list[str], labels: list[int]) -> tuple[TfidfVectorizer, LogisticRegression]:
    vectorizer = TfidfVectorizer(analyzer=char_ngrams, sublinear_tf=True, dtype=np.float64)
    matrix = vectorizer.fit_transform(texts)
    model = LogisticRegression(C=C, class_weight="balanced", max_iter=10_000)
    model.fit(matrix, labels)
    return vectorizer, model


def threshold_at_fpr(scores: np.ndarray, labels: np.ndarray, target_fpr: float) -> float:
    """The lowest threshold t such that the share of negatives with score >= t is at most target_fpr."""
    negatives = np.sort(scores[labels == 0])[::-1]
    allowed = math.floor(target_fpr * len(negatives))  # negatives allowed at or above t
    if allowed >= len(negatives):
        return 0.0
    # Just above the (allowed+1)-th highest negative score; ties stay below the threshold.
    return float(np.nextafter(negatives[allowed], np.inf))


def out_of_fold(texts: list[str], labels: list[int], folds: int, seed: int) -> np.ndarray:
    x = np.array(texts, dtype=object)
    y = np.array(labels)
    scores = np.zeros(len(y))
    for train_idx, test_idx in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y):
        vec, model = fit(list(x[train_idx]), list(y[train_idx]))
        scores[test_idx] = model.predict_proba(vec.transform(list(x[test_idx])))[:, 1]
    return scores


def export(vectorizer: TfidfVectorizer, model: LogisticRegression) -> dict[str, Any]:
    coef = model.coef_[0]
    idf = vectorizer.idf_
    vocab = {
        gram: [float(f"{idf[i]:.7g}"), float(f"{coef[i]:.7g}")] for gram, i in vectorizer.vocabulary_.items()
    }
    return {
        "format": FORMAT,
        "features": {
            "kind": "char_ngrams",
            "min": NGRAM_MIN,
            "max": NGRAM_MAX,
            "tf": "sublinear",
            "norm": "l2",
        },
        "intercept": float(model.intercept_[0]),
        "vocab": vocab,
    }


def train(
    texts: list[str], labels: list[int], target_fpr: float = TARGET_FPR, sensitive_fpr: float = SENSITIVE_FPR
) -> dict[str, Any]:
    """Fit on all rows, pick thresholds from inner out-of-fold scores; the exportable model dict."""
    oof = out_of_fold(texts, labels, INNER_FOLDS, SEED)
    y = np.array(labels)
    vectorizer, model = fit(texts, labels)
    exported = export(vectorizer, model)
    exported["threshold"] = threshold_at_fpr(oof, y, target_fpr)
    exported["threshold_sensitive"] = threshold_at_fpr(oof, y, sensitive_fpr)
    exported["target_fpr"] = target_fpr
    exported["sensitive_fpr"] = sensitive_fpr
    return exported


def check_export(exported: dict[str, Any], vectorizer_texts: list[str], reference: np.ndarray) -> float:
    """Largest difference between the pure-Python scorer and scikit-learn on `vectorizer_texts`."""
    from plinth.guardrails.detectors.injection import InjectionClassifier

    scorer = InjectionClassifier.from_dict(exported)
    mine = np.array([scorer.probability(t) for t in vectorizer_texts])
    return float(np.max(np.abs(mine - reference)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data",
        type=Path,
        action="append",
        required=True,
        help="JSON lines with text and label (repeatable)",
    )
    parser.add_argument("--out", type=Path, required=True, help="where to write the model (.json.gz)")
    parser.add_argument("--target-fpr", type=float, default=TARGET_FPR)
    parser.add_argument("--licence", default=LICENCES, help="licences of the training data, for the record")
    args = parser.parse_args(argv)
    texts: list[str] = []
    labels: list[int] = []
    files: list[dict[str, Any]] = []
    for path in args.data:
        if not path.is_file():
            print(f"train_injection_classifier: no such file: {path}", file=sys.stderr)
            return 2
        t, y = load_jsonl(path)
        texts += t
        labels += y
        files.append(
            {
                "file": path.name,
                "rows": len(t),
                "positives": sum(y),
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            }
        )
    exported = train(texts, labels, target_fpr=args.target_fpr)
    exported["training"] = {
        "data": files,
        "licence": args.licence,
        "scikit_learn": sklearn.__version__,
        "C": C,
    }
    vectorizer, model = fit(texts, labels)
    drift = check_export(exported, texts, model.predict_proba(vectorizer.transform(texts))[:, 1])
    if drift > 1e-4:
        print(
            f"train_injection_classifier: exported scorer differs from scikit-learn by {drift}",
            file=sys.stderr,
        )
        return 1
    payload = json.dumps(exported, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()
    args.out.write_bytes(gzip.compress(payload, compresslevel=9, mtime=0))
    print(
        f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB, {len(exported['vocab'])} features); "
        f"threshold {exported['threshold']:.4f} (inner CV FPR <= {args.target_fpr}), "
        f"sensitive {exported['threshold_sensitive']:.4f}; scorer matches scikit-learn within {drift:.1e}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
