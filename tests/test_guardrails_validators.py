"""Check-digit validators accept real identifiers and reject look-alikes (one digit off, swapped...)."""

from __future__ import annotations

import pytest

from plinth.guardrails.pii import PiiScanner
from plinth.guardrails.pii import validators as v
from plinth.guardrails.types import ScanContext, Stage

CTX = ScanContext(Stage.INPUT)


def types_in(text: str) -> list[str]:
    return [f.type for f in PiiScanner().scan(text, CTX) if f.score >= 0.5]


@pytest.mark.parametrize(
    "number", ["4111111111111111", "5555 5555 5555 4444", "3782-822463-10005", "6011000990139424"]
)
def test_luhn_accepts_test_card_numbers(number: str) -> None:
    assert v.luhn(number) and v.credit_card(number)


@pytest.mark.parametrize(
    "number",
    [
        "4111111111111112",  # last digit off
        "4111111111111121",  # two digits swapped
        "1234567812345678",  # Luhn-invalid sequence
        "0000000000000000",  # one repeated digit
        "4111-1111-1111-111a",  # a letter
    ],
)
def test_luhn_rejects_look_alikes(number: str) -> None:
    assert not v.credit_card(number)


def test_card_scanner_ignores_a_luhn_invalid_sixteen_digit_number() -> None:
    assert types_in("order 4111111111111112 shipped") == []
    assert types_in("card 4111 1111 1111 1111 on file") == ["CREDIT_CARD"]


@pytest.mark.parametrize(
    "iban", ["GB82 WEST 1234 5698 7654 32", "DE89370400440532013000", "fr1420041010050500013m02606"]
)
def test_iban_mod97_accepts_valid(iban: str) -> None:
    assert v.iban(iban)


@pytest.mark.parametrize(
    "iban",
    [
        "GB82 WEST 1234 5698 7654 33",  # check fails
        "GB28 WEST 1234 5698 7654 32",  # check digits swapped
        "DE8937040044053201300",  # one character short for Germany
        "XX82WEST12345698765432",  # no such country
        "GB82 WEST 1234 5698 7654",  # truncated
    ],
)
def test_iban_mod97_rejects_look_alikes(iban: str) -> None:
    assert not v.iban(iban)


def test_iban_in_text_and_look_alike_not() -> None:
    assert types_in("pay to GB82 WEST 1234 5698 7654 32 today") == ["IBAN_CODE"]
    assert "IBAN_CODE" not in types_in("pay to GB82 WEST 1234 5698 7654 33 today")


@pytest.mark.parametrize(
    "ssn", ["000-12-3456", "666-12-3456", "912-12-3456", "123-00-4567", "123-45-0000", "111-11-1111"]
)
def test_ssn_rules_reject_impossible_numbers(ssn: str) -> None:
    assert not v.us_ssn(ssn)
    assert "US_SSN" not in types_in(f"my ssn is {ssn}")


def test_ssn_found_with_its_layout_and_context() -> None:
    assert v.us_ssn("536-22-1234")
    assert types_in("SSN: 536-22-1234") == ["US_SSN"]
    assert types_in("ssn 536221234") == ["US_SSN"]  # bare nine digits need the context word
    assert "US_SSN" not in types_in("ticket 536221234")


@pytest.mark.parametrize(
    ("name", "good", "bad"),
    [
        ("es_dni", "12345678Z", "12345678A"),
        ("it_fiscal_code", "RSSMRA85T10A562S", "RSSMRA85T10A562T"),
        ("nl_bsn", "111222333", "111222334"),
        ("br_cpf", "390.533.447-05", "390.533.447-06"),
    ],
)
def test_national_id_check_digits(name: str, good: str, bad: str) -> None:
    check = v.VALIDATORS[name]
    assert check(good) and not check(bad)


def test_validator_names_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown validator 'nope'"):
        v.validator_named("nope")
