"""Personal data: free-text redaction and keyed hashing of identifiers."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from service.pii import keyed_hash, normalize_email, redact

pytestmark = pytest.mark.unit

KEY = b"test-pii-key-0123456789"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("write to ana@example.com please", "write to [email] please"),
        ("Ana.Perez@Example.COM", "[email]"),
        ("john.doe+orders@mail.example.co.uk.", "[email]."),
        ("<luis_99@sub-domain.example.org>", "<[email]>"),
        ("first: a@b.io, second: x.y-z%tag@example.net", "first: [email], second: [email]"),
        ("mailto:ana@example.com?subject=hi", "mailto:[email]?subject=hi"),
    ],
)
def test_emails_redacted(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize(
    "phone",
    [
        "+44 20 7946 0958",  # UK international
        "020 7946 0958",  # UK national
        "+1 415-555-0132",  # US international
        "415-555-0132",  # US
        "(212) 555-0187",  # parenthesized area code
        "+1 (212) 555-0187",
        "212.555.0187",  # dotted
        "+49 30 1234567",
        "+4930123456",
        "555 1234",  # seven digits
        "06 12 34 56 78",
        "+33/6/12/34/56/78",
    ],
)
def test_phones_redacted(phone: str) -> None:
    redacted = redact(f"call me on {phone} tonight")
    assert redacted == "call me on [phone] tonight"
    assert not any(ch.isdigit() for ch in redacted)


@pytest.mark.parametrize(
    "number",
    [
        "6012345678",  # loyalty card
        "4000 1234 5678 9010",  # card number with spaces
        "4000-1234-5678-9010",
        "LC-6012345678",
    ],
)
def test_long_digit_runs_redacted(number: str) -> None:
    redacted = redact(f"my card is {number}.")
    assert "[phone]" in redacted
    assert sum(ch.isdigit() for ch in redacted) == 0


@pytest.mark.parametrize(
    "text",
    [
        "order 4411 is late",
        "size 42, two items, 19.99 EUR",
        "refund takes 3-5 business days",
        "delivered on 2026-11-20 at noon",
        "between 2026-11-20 and 2026-11-27",
        "code 123456 works",  # six digits: too short to be a phone number
        "at 10:15:30",
        "no digits at all",
        "",
    ],
)
def test_short_numbers_and_iso_dates_kept(text: str) -> None:
    assert redact(text) == text


def test_text_with_email_and_phone() -> None:
    text = "Hi, I'm Ana (ana.perez@example.com, +44 20 7946 0958); order 4411 from 2026-11-02."
    assert redact(text) == "Hi, I'm Ana ([email], [phone]); order 4411 from 2026-11-02."


def test_redaction_is_idempotent() -> None:
    text = "ana@example.com / 415-555-0132 / 4000 1234 5678 9010"
    once = redact(text)
    assert redact(once) == once
    assert once == "[email] / [phone]"


@pytest.mark.parametrize("address", ["josé@example.com", "müller@example.de"])
def test_internationalized_email_redacted(address: str) -> None:
    redacted = redact(f"mail me at {address} today")
    assert redacted == "mail me at [email] today"


# ---------------------------------------------------------------------------- keyed hash


@pytest.mark.parametrize(
    ("kind", "value", "message"),
    [
        ("email", "ana@example.com", b"email:ana@example.com"),
        ("loyalty_card", "LC-6012345678", b"loyalty_card:LC-6012345678"),
        ("anonymous_id", "anon-7f3a", b"anonymous_id:anon-7f3a"),
    ],
)
def test_keyed_hash_is_hmac_sha256(kind: str, value: str, message: bytes) -> None:
    expected = hmac.new(KEY, message, hashlib.sha256).hexdigest()
    assert keyed_hash(KEY, kind, value) == expected


# hmac.new(b"test-pii-key-0123456789", b"<kind>:<value>", hashlib.sha256).hexdigest(),
# computed once with the stdlib alone. Pinned because a change of the hashing scheme re-keys
# every anonymous customer and must not pass unnoticed.
PINNED = [
    (
        "email",
        "ana@example.com",
        "79a1acc04e818eedab26b55503d71048da11b689e2e3185bd939f7cb7d8a65e2",
    ),
    (
        "loyalty_card",
        "LC-6012345678",
        "3d77b91c88bc896b2d78c0d51ee93195e3ffe9937d85d19fd77a986b01506f13",
    ),
    (
        "anonymous_id",
        "anon-7f3a",
        "50efb679230a0192a43900de85bf359da6c48ea105270a4f5d71d701aaeb7fdb",
    ),
]


@pytest.mark.parametrize(("kind", "value", "digest"), PINNED)
def test_keyed_hash_pinned_values(kind: str, value: str, digest: str) -> None:
    assert keyed_hash(KEY, kind, value) == digest


def test_keyed_hash_shape_and_stability() -> None:
    first = keyed_hash(KEY, "email", "ana@example.com")
    assert len(first) == 64
    assert int(first, 16) >= 0
    assert first == first.lower()
    assert keyed_hash(KEY, "email", "ana@example.com") == first


def test_keyed_hash_differs_by_key_kind_and_value() -> None:
    base = keyed_hash(KEY, "anonymous_id", "123")
    assert keyed_hash(b"another-key-0123456789", "anonymous_id", "123") != base
    assert keyed_hash(KEY, "visitor_id", "123") != base
    assert keyed_hash(KEY, "anonymous_id", "124") != base


def test_keyed_hash_does_not_contain_the_value() -> None:
    value = "ana@example.com"
    digest = keyed_hash(KEY, "email", value)
    assert value not in digest
    assert hashlib.sha256(value.encode()).hexdigest() != digest  # keyed, not a plain hash


# ------------------------------------------------------------------------- e-mail normalize


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (" Ana@Example.COM ", "ana@example.com"),
        ("ana@example.com", "ana@example.com"),
        ("\tLUIS.G@MAIL.EXAMPLE.ORG\n", "luis.g@mail.example.org"),
        ("Ana+Shop@Example.com", "ana+shop@example.com"),
    ],
)
def test_normalize_email(raw: str, expected: str) -> None:
    assert normalize_email(raw) == expected


def test_normalized_emails_hash_equal() -> None:
    a = keyed_hash(KEY, "email", normalize_email(" A@B.com "))
    b = keyed_hash(KEY, "email", normalize_email("a@b.com"))
    assert a == b
