"""Check digits and structure rules that tell a real identifier from a look-alike digit string.

A regex alone flags every 16-digit order number as a card; the checksum is what makes a finding
worth acting on. Luhn, IBAN mod-97 and the US SSN rules are here (they run on the hot path and are a
few lines each); national identifiers use python-stdnum's maintained implementations.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from importlib import import_module

Validator = Callable[[str], bool]


def digits_of(value: str) -> str:
    return "".join(c for c in value if c.isdigit())


def luhn(value: str) -> bool:
    """Luhn (mod 10) over the digits of `value`; separators are ignored, letters fail."""
    total = 0
    count = 0
    for ch in reversed(value):
        if ch in " -":
            continue
        if not ch.isdigit():
            return False
        d = ord(ch) - 48
        if count % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
        count += 1
    return count > 1 and total % 10 == 0


# IBAN length per country (ISO 13616 registry); an IBAN of another length is not one.
IBAN_LENGTHS: dict[str, int] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27,
    "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25,
    "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18,
    "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33,
    "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28,
    "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}  # fmt: skip


def iban(value: str) -> bool:
    """ISO 13616: known country, that country's length, and the mod-97 check equal to 1."""
    compact = value.replace(" ", "").replace("-", "").upper()
    if len(compact) < 15 or not compact.isalnum() or not compact.isascii():
        return False
    expected = IBAN_LENGTHS.get(compact[:2])
    if expected is None or len(compact) != expected or not compact[2:4].isdigit():
        return False
    rearranged = compact[4:] + compact[:4]
    number = "".join(str(int(c, 36)) for c in rearranged)
    return int(number) % 97 == 1


def mod97(value: str) -> bool:
    """ISO 7064 mod 97-10 over a digits-and-letters string (IBAN-style check, any layout)."""
    compact = "".join(c for c in value.upper() if c.isalnum())
    if len(compact) < 5 or not compact.isascii():
        return False
    return int("".join(str(int(c, 36)) for c in compact[4:] + compact[:4])) % 97 == 1


def us_ssn(value: str) -> bool:
    """SSA rules: area not 000, 666 or 900-999; group not 00; serial not 0000; no repeated digit."""
    d = digits_of(value)
    if len(d) != 9 or len(set(d)) == 1:
        return False
    area, group, serial = d[:3], d[3:5], d[5:]
    if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
        return False
    return d not in ("123456789", "078051120", "219099999")  # advertising and example numbers


def ip_address(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def card_brand_ok(value: str) -> bool:
    """Issuer prefix and length of a payment card (Visa, Mastercard, Amex, Discover, JCB, Diners,
    Maestro, UnionPay, Mir): a Luhn-valid number from no card range is rejected."""
    d = digits_of(value)
    n = len(d)
    if not 12 <= n <= 19:
        return False
    two, four = int(d[:2]), int(d[:4])
    if d[0] == "4":
        return n in (13, 16, 19)  # Visa
    if 51 <= two <= 55 or 2221 <= four <= 2720:
        return n == 16  # Mastercard
    if two in (34, 37):
        return n == 15  # Amex
    if two in (36, 38, 39) or 300 <= int(d[:3]) <= 305 or four == 3095:
        return 14 <= n <= 19  # Diners
    if 3528 <= four <= 3589:
        return 16 <= n <= 19  # JCB
    if four == 6011 or two == 65 or 644 <= int(d[:3]) <= 649:
        return 16 <= n <= 19  # Discover
    if two == 62 or two == 81:
        return 16 <= n <= 19  # UnionPay
    if 2200 <= four <= 2204:
        return 16 <= n <= 19  # Mir
    return two == 50 or 56 <= two <= 69  # Maestro: 12-19 digits


def credit_card(value: str) -> bool:
    d = digits_of(value)
    return len(set(d)) > 1 and card_brand_ok(d) and luhn(d)


def card_score(value: str) -> float | None:
    """Luhn-valid 12-19 digits: 0.9 in a known issuer's range, 0.6 for 13-19 digits outside them
    (old JCB, private-label and regional cards), 0 for 12 (a card only with a word like "card" near)."""
    d = digits_of(value)
    if not 12 <= len(d) <= 19 or len(set(d)) < 2 or not luhn(d):
        return None
    if card_brand_ok(d):
        return 0.9
    return 0.6 if len(d) >= 13 else 0.0


def _stdnum(module: str) -> Validator:
    """A python-stdnum `is_valid`, imported on first use (most deployments never need most)."""
    holder: list[Validator] = []

    def check(value: str) -> bool:
        if not holder:
            holder.append(import_module(f"stdnum.{module}").is_valid)
        return bool(holder[0](value))

    check.__name__ = f"stdnum_{module.replace('.', '_')}"
    return check


# Validators by name, as enterprise identifiers refer to them in configuration.
VALIDATORS: dict[str, Validator] = {
    "luhn": luhn,
    "mod97": mod97,
    "iban": iban,
    "credit_card": credit_card,
    "us_ssn": us_ssn,
    "ip": ip_address,
    "us_itin": _stdnum("us.itin"),
    "uk_nhs": _stdnum("gb.nhs"),
    "es_dni": _stdnum("es.dni"),
    "es_nie": _stdnum("es.nie"),
    "it_fiscal_code": _stdnum("it.codicefiscale"),
    "fr_nir": _stdnum("fr.nir"),
    "nl_bsn": _stdnum("nl.bsn"),
    "de_idnr": _stdnum("de.idnr"),
    "in_aadhaar": _stdnum("in_.aadhaar"),
    "in_pan": _stdnum("in_.pan"),
    "br_cpf": _stdnum("br.cpf"),
    "cn_ric": _stdnum("cn.ric"),
    "ca_sin": _stdnum("ca.sin"),
    "pl_pesel": _stdnum("pl.pesel"),
    "se_personnummer": _stdnum("se.personnummer"),
}


def validator_named(name: str) -> Validator:
    try:
        return VALIDATORS[name]
    except KeyError:
        known = ", ".join(sorted(VALIDATORS))
        raise ValueError(f"unknown validator '{name}' (known: {known})") from None


__all__ = [
    "IBAN_LENGTHS",
    "VALIDATORS",
    "Validator",
    "credit_card",
    "iban",
    "luhn",
    "mod97",
    "validator_named",
]
