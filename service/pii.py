"""Personal data: redaction of free text and keyed hashing of identifiers."""

from __future__ import annotations

import hashlib
import hmac
import re

# Local parts and domains may be internationalized (josé@exämple.de), so: anything that is not
# a space or an address delimiter, '@', then dotted labels of word characters. A local part
# starts only where a run of such characters starts: tried at every position of a long run
# without '@', the search took quadratic time (seconds for one 32 KiB comment).
_EMAIL = re.compile(
    r"(?<![^\s@<>()\[\]{},;:\"'])[^\s@<>()\[\]{},;:\"']+@[\w\-]+(?:\.[\w\-]+)*\.[^\W\d_]{2,}"
)
# A run of digits with the usual phone separators. Any such run of 7+ digits is redacted: it
# also catches card and loyalty numbers, and over-redaction is the safe way to be wrong.
_PHONE = re.compile(r"(?<![0-9])\+?\(?[0-9](?:[0-9\s().\-/]*[0-9])?")
_ISO_DATE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
_MIN_PHONE_DIGITS = 7


def _phone(match: re.Match[str]) -> str:
    text = match.group(0)
    digits = sum(ch.isdigit() for ch in text)
    if digits < _MIN_PHONE_DIGITS or _ISO_DATE.match(text.strip()):
        return text
    return "[phone]"


def redact(text: str) -> str:
    """Free text -> the same text with e-mail addresses as '[email]' and phone numbers as
    '[phone]'."""
    return _PHONE.sub(_phone, _EMAIL.sub("[email]", text))


def normalize_email(email: str) -> str:
    """' Ana@Example.COM ' -> 'ana@example.com'."""
    return email.strip().lower()


def keyed_hash(key: bytes, kind: str, value: str) -> str:
    """(key, identifier kind, value) -> HMAC-SHA256 hex; the kind keeps equal values of
    different kinds apart."""
    return hmac.new(key, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()
