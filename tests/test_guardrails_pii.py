"""The `pii` scanner: structured identifiers, context words, the rules for names and places, NER."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from plinth.guardrails.config import NerConfig
from plinth.guardrails.pii import PiiScanner
from plinth.guardrails.types import ScanContext, Stage

CTX = ScanContext(Stage.INPUT)


def found(text: str, scanner: PiiScanner | None = None, min_score: float = 0.5) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in (scanner or PiiScanner()).scan(text, CTX):
        if f.score >= min_score:
            out.setdefault(f.type, []).append(text[f.start : f.end])
    return out


def test_contact_details() -> None:
    text = "Mail ana.lopez@example.com or call +44 20 7946 0958, office (212) 555-0187 ext. 12."
    got = found(text)
    assert got["EMAIL_ADDRESS"] == ["ana.lopez@example.com"]
    assert got["PHONE_NUMBER"] == ["+44 20 7946 0958", "(212) 555-0187 ext. 12"]


def test_network_and_url() -> None:
    got = found("Server 10.20.30.40 and fe80::1ff:fe23:4567:890a, docs at https://intra.example.com/wiki.")
    assert got["IP_ADDRESS"] == ["10.20.30.40", "fe80::1ff:fe23:4567:890a"]
    assert got["URL"] == ["https://intra.example.com/wiki"]
    assert "IP_ADDRESS" not in found("upgrade to version 1.2.3.4 now")
    assert "IP_ADDRESS" not in found("300.1.2.3 is not an address")


def test_government_ids() -> None:
    got = found("NINO AB123456C, DNI 12345678Z, codice fiscale RSSMRA85T10A562S, PAN ABCPE1234F")
    assert got["UK_NINO"] == ["AB123456C"]
    assert got["ES_NIF"] == ["12345678Z"]
    assert got["IT_FISCAL_CODE"] == ["RSSMRA85T10A562S"]
    assert got["IN_PAN"] == ["ABCPE1234F"]


def test_context_words_are_required_for_bare_digits() -> None:
    assert found("passport number 123456789") == {"US_PASSPORT": ["123456789"]}
    assert found("reference 123456789") == {}
    assert found("BSN 111222333") == {"NL_BSN": ["111222333"]}
    assert found("item 111222333") == {}


def test_dates_and_dates_of_birth() -> None:
    got = found("Born on 12/03/1984. Seen by the clinic on Friday; the plan was renewed March 3, 2020.")
    assert got["DATE_OF_BIRTH"] == ["12/03/1984"]
    assert got["DATE_TIME"] == ["March 3, 2020"]  # the weekday alone scores below 0.5
    assert found("Seen on Friday", min_score=0.3)["DATE_TIME"] == ["Friday"]


def test_names_places_and_organizations_without_ner() -> None:
    got = found("Mrs. Ingrid Solberg flew to Norway. She works for Fjordline Systems.")
    assert got["TITLE"] == ["Mrs."]
    assert got["PERSON"] == ["Ingrid Solberg"]
    assert got["LOCATION"] == ["Norway"]
    assert got["ORGANIZATION"] == ["Fjordline Systems"]
    assert found("My name is Tomasz Wrobel and I am Polish.") == {
        "PERSON": ["Tomasz Wrobel"],
        "NRP": ["Polish"],
    }
    # Sentence starters and greetings are not names.
    assert "PERSON" not in found("Thank you. Please send it Monday. Best regards")


def test_addresses_ages_and_postal_codes() -> None:
    got = found("Ship to 221 Baker Street, Apt. 4, London NW1 6XE. I turned 42 last week.")
    assert got["STREET_ADDRESS"] == ["221 Baker Street", "Apt. 4"]
    assert got["ZIP_CODE"] == ["NW1 6XE"]
    assert got["AGE"] == ["42"]
    assert found("Wir wohnen in der Lindenstraße 17.")["STREET_ADDRESS"] == ["Lindenstraße 17"]
    assert found("Bring it to Via Garibaldi 12 please")["STREET_ADDRESS"] == ["Via Garibaldi 12"]


def test_entity_options() -> None:
    only_email = PiiScanner({"entities": ["EMAIL_ADDRESS"]})
    assert found("Mr. Bob Stone, bob@example.com, +1 212 555 0187", only_email) == {
        "EMAIL_ADDRESS": ["bob@example.com"]
    }
    no_rules = PiiScanner({"rules": False})
    assert "PERSON" not in found("Mr. Bob Stone called", no_rules)
    assert "PERSON" not in found("Mr. Bob Stone called", PiiScanner({"exclude": ["PERSON"]}))
    with pytest.raises(ValueError, match="unknown option"):
        PiiScanner({"entitees": ["X"]})


def test_findings_never_overlap_and_carry_a_data_class() -> None:
    findings = PiiScanner().scan("card 4111 1111 1111 1111 phone 212-555-0187 ssn 536-22-1234", CTX)
    spans = sorted((f.start, f.end) for f in findings)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
    classes = {f.type: f.data_class for f in findings}
    assert classes["CREDIT_CARD"] == "restricted" and classes["US_SSN"] == "restricted"
    assert classes["PHONE_NUMBER"] == "confidential"


def test_spacy_backend_loads_a_local_pipeline(tmp_path: Path) -> None:
    spacy = pytest.importorskip("spacy")  # the `bench` extra; not in every environment
    from plinth.guardrails.pii.ner import load_backend

    nlp = spacy.blank("en")
    ruler = nlp.add_pipe("entity_ruler")
    ruler.add_patterns(
        [
            {"label": "PERSON", "pattern": [{"LOWER": "ada"}, {"LOWER": "lovelace"}]},
            {"label": "ORG", "pattern": "Analytical Engines"},
        ]
    )
    nlp.to_disk(tmp_path / "model")
    backend = load_backend(NerConfig(backend="spacy", model=str(tmp_path / "model")))
    scanner = PiiScanner(ner=backend)
    # The backend replaces the rules: lower-case names are found, cue-only guesses are not made.
    got = found("ada lovelace joined Analytical Engines; call me Bob", scanner)
    assert got == {"PERSON": ["ada lovelace"], "ORGANIZATION": ["Analytical Engines"]}


def test_missing_ner_model_is_a_clear_error() -> None:
    pytest.importorskip("spacy")
    from plinth.guardrails.pii.ner import NerUnavailable, load_backend

    with pytest.raises(NerUnavailable, match="not installed"):
        load_backend(NerConfig(backend="spacy", model="no_such_model_pkg"))


def test_ascii_text_finds_the_same_capitalized_runs_by_either_regex_engine() -> None:
    """ASCII text takes the standard library's regex for capitalized runs (faster); it must find
    exactly the runs the Unicode-aware `regex` pattern finds, link words, initials and all."""
    import random

    from plinth.guardrails.pii import rules

    pieces = [
        "van", "von", "der", "de", "Van", "De", "O'Neil", "Anna-Lise", "Dr.", "Mr", "J.", "St.", "US",
        "USA", "hello", "Hello", "x@y.com", "e.g.", "U.S.A.", "-Bob", "A1", "7th", "Rue", "de la",
    ]  # fmt: skip
    alphabet = "aAbBzZ vV@./-'\t\n19dDeEnrsu ,"
    rng = random.Random(5)
    texts = ["Say hello in five words.", "Hello! How can I help?", "Ludwig van Beethoven met Dr. J. Smith"]
    for _ in range(3000):
        texts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))))
        texts.append(
            rng.choice([" ", "\t", ", "]).join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        )
    for text in texts:
        assert text.isascii()
        unicode_runs = [m.span() for m in rules._RUN.finditer(text)]
        assert [m.span() for m in rules._RUN_ASCII.finditer(text)] == unicode_runs, text
    # Non-ASCII text keeps the Unicode pattern: "Émile" is a run only there.
    assert found("Ich traf Émile Zola in Paris.")["PERSON"] == ["Émile Zola"]
