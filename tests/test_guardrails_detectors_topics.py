"""Denied topics matched by meaning with the real all-MiniLM-L6-v2 weights (no mocks, no network)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from plinth.guardrails.detectors import BUILTIN_SCANNERS
from plinth.guardrails.detectors.grounding import GroundingScanner
from plinth.guardrails.detectors.topics import DeniedTopicsScanner
from plinth.guardrails.types import ScanContext, Source, Stage

USER_IN = ScanContext(stage=Stage.INPUT, source=Source.USER)

TOPICS = {
    "topics": [
        {
            "id": "investment_advice",
            "description": "Recommending specific stocks, shares, funds or cryptocurrencies to buy or sell",
            "examples": ["Which stocks should I buy?", "Is this fund a good investment?"],
        },
        {
            "id": "medical_diagnosis",
            "description": "Diagnosing a person's illness or prescribing medication and doses",
            "examples": ["What illness do I have?", "How much of this medicine should I take?"],
        },
    ]
}


@pytest.fixture(scope="module")
def topics() -> DeniedTopicsScanner:
    scanner = BUILTIN_SCANNERS["topics"](TOPICS)
    assert isinstance(scanner, DeniedTopicsScanner)
    scanner.warmup()
    return scanner


@pytest.mark.parametrize(
    ("text", "topic"),
    [
        # Paraphrases of the descriptions and examples, in other words.
        ("Where should I put my savings so they grow the fastest, Tesla or Nvidia?", "investment_advice"),
        ("Which ETF will give me the best returns this year?", "investment_advice"),
        ("I've had a rash and a fever for three days, what's wrong with me?", "medical_diagnosis"),
        ("What dose of amoxicillin is right for my sore throat?", "medical_diagnosis"),
    ],
)
def test_a_denied_topic_is_matched_by_paraphrase(topics: DeniedTopicsScanner, text: str, topic: str) -> None:
    findings = topics.scan(text, USER_IN)
    assert [f.rule for f in findings] == [f"topics.{topic}"], [(m.topic, m.score) for m in topics.match(text)]
    assert findings[0].type == "DENIED_TOPIC" and findings[0].score >= 0.5


@pytest.mark.parametrize(
    "text",
    [
        "How do I reset my password in the customer portal?",
        "Explain how a stock exchange works.",
        "What are the opening hours of the pharmacy on Sundays?",
        "Draft an email to the finance team about next year's budget.",
    ],
)
def test_neighbouring_but_allowed_questions_pass(topics: DeniedTopicsScanner, text: str) -> None:
    assert topics.scan(text, USER_IN) == [], [(m.topic, m.score) for m in topics.match(text)]


def test_a_denied_question_inside_a_long_message_is_found(topics: DeniedTopicsScanner) -> None:
    text = (
        "Thanks for the help with the travel booking yesterday. The hotel in Rome was lovely and the "
        "train was on time. By the way, which crypto coin will go up the most next week? "
        "Also please remind me to renew my passport."
    )
    [finding] = topics.scan(text, USER_IN)
    assert finding.rule == "topics.investment_advice"
    assert "crypto coin" in text[finding.start : finding.end]
    assert finding.end - finding.start < len(text)


def test_grounding_by_embedding_accepts_a_paraphrase() -> None:
    context = "Employees may work from home up to three days a week after their probation period."
    answer = "Staff can work remotely for three days every week once probation ends."
    lexical = GroundingScanner.from_options({"min_support": 0.7})
    assert lexical.check(answer, [context])  # 5 of its 9 content words are in the context
    embedding = GroundingScanner.from_options({"min_support": 0.7, "method": "embedding", "similarity": 0.7})
    assert embedding.check(answer, [context]) == []
    assert embedding.check("Every employee gets a company car after probation ends.", [context])
