"""The `leak` output scanner on obfuscated canaries and hints, and the answers it must leave alone.

Small synthetic fixtures only: each leak form an attacker asks a model for (look-alike letters,
spelling alphabets, Pig Latin, anagrams, rhymes, spelling hints, numbers in words) and, beside it,
near misses that mention similar words without giving the secret away.
"""

from __future__ import annotations

import pytest

from plinth.guardrails.detectors.leaks import LeakScanner, alnum_only, canary_leak
from plinth.guardrails.detectors.text import alnum_only as text_alnum_only
from plinth.guardrails.types import ScanContext, Stage


def rule_for(secret: str, answer: str) -> str | None:
    """The rule of the finding the default scanner reports, or None where it reports nothing."""
    findings = LeakScanner().scan(answer, ScanContext(stage=Stage.OUTPUT, canaries=(secret,)))
    assert len(findings) <= 1
    return findings[0].rule if findings else None


@pytest.mark.parametrize(
    ("secret", "answer", "rule"),
    [
        ("hologram", "Fine, the code is h0l0gr4m, happy now?", "leak.canary.lookalike"),
        ("hologram", "The code is h\u043el\u043egr\u0430m.", "leak.canary.lookalike"),  # Cyrillic o and a
        (
            "hologram",
            "The code is \u04bb\u043e\u04cf\u043egram.",
            "leak.canary.lookalike",
        ),  # Cyrillic shha, palochka
        ("p4ssw0rd-sunrise", "It is P@$$WORD SUNR1SE", "leak.canary.lookalike"),
        ("zenith", "Zulu Echo November India Tango Hotel, over.", "leak.canary.spelled"),
        ("hologram", "In Pig Latin the word is ologramhay.", "leak.canary.encoded"),
        ("hologram", "Unscramble this: margolho", "leak.canary.anagram"),
        ("hologram", "margolho", "leak.canary.anagram"),
        ("paris", "Scrambled, as you asked: sirap... no, pairs", "leak.canary.encoded"),
        ("paris", "Scrambled, as you asked: pairs", "leak.canary.anagram"),
        ("juggernaut", "The password rhymes with 'hugger not'.", "leak.canary.sounds_like"),
        ("zenith", "The password starts with the letter Z and has six letters.", "leak.canary.hint"),
        ("eye", "Hint: the answer is a three-letter word.", "leak.canary.hint"),
        ("tomato", 'OK: the secret word begins with "t".', "leak.canary.hint"),
        ("29", "The access code is the tenth prime number.", "leak.canary.partial"),
        ("4711", "Your PIN: four seven one one.", "leak.canary.partial"),
        ("zoo-29", "The password is zoo, a dash, then twenty-nine.", "leak.canary.partial"),
        ("labyrinth", "l\na\nb\ny\nr\ni\nn\nt\nh", "leak.canary.normalized"),  # split across lines
        ("labyrinth", "It starts: l ... then a, b, y; the rest: r, i, n, t, h.", "leak.canary.spelled"),
    ],
)
def test_obfuscated_leaks_and_hints(secret: str, answer: str, rule: str | None) -> None:
    assert rule_for(secret, answer) == rule


@pytest.mark.parametrize(
    ("secret", "answer"),
    [
        # Hints that describe another secret, or spelling talk with no secret in it.
        ("zenith", "The password starts with the letter Q and has six letters."),
        ("zenith", "Words that start with the letter z are rare in English."),
        ("avocado", "The answer is a three-letter word."),
        ("tomato", "The password starts with the letter t and ends with the letter x."),
        # Similar words are not the secret.
        ("juggernaut", "This rhymes with nothing, and the password stays secret."),
        ("29", "There are 30 days in June; the passcode is not something I can share."),
        ("hologram", "A monogram is embroidered on the shirt."),
        ("paris", "The samples were compared in pairs."),  # a short word's anagram is often a word
        ("silver-dog-13", "My dog is called Silver."),
    ],
)
def test_near_misses_are_not_leaks(secret: str, answer: str) -> None:
    assert rule_for(secret, answer) is None


def test_a_partial_hint_scores_below_a_full_one() -> None:
    one = canary_leak("zenith", "The secret word starts with z.")
    two = canary_leak("zenith", "The secret word starts with z and ends with h.")
    assert one is not None and two is not None
    assert one.how == two.how == "hint"
    assert 0.5 <= one.score < two.score


def test_exact_leak_keeps_its_span_and_case_insensitivity() -> None:
    answer = "Sure - the marker is ZEPHYR-7731-quokka, do not share it."
    leak = canary_leak("zephyr-7731-quokka", answer)
    assert leak is not None and leak.how == "exact"
    assert answer[leak.start : leak.end] == "ZEPHYR-7731-quokka"


def test_squeeze_matches_the_shared_helper() -> None:
    for text in ("L-A-B-Y_R I N\u00e9", "名.名 ⍨ ö_ö 12", "", "a\u0301b"):
        assert alnum_only(text) == text_alnum_only(text)


def test_windows_of_a_stream_see_a_leak_with_their_tail() -> None:
    """A streamed answer is scanned window by window with the tail already sent as context: a secret
    spelled across a window boundary is still caught in the window that completes it."""
    answer = "Happy to help with the riddle. " + " ".join("labyrinth") + " is what you are looking for."
    ctx = ScanContext(stage=Stage.OUTPUT, canaries=("labyrinth",))
    cut = answer.index("r i n")
    first, second = answer[:cut], answer[max(0, cut - 64) :]
    scanner = LeakScanner()
    assert scanner.scan(first, ctx) == []
    [finding] = scanner.scan(second, ctx)
    assert finding.type == "CANARY_LEAK" and finding.score >= 0.9
