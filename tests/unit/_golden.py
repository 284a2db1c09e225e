"""Shared constants and golden-fixture helpers for the unit tier (not a test module)."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from hypothesis import HealthCheck, settings

from service.canonical import Source
from service.parse import Limits

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
SCHEMAS = REPO / "schemas"
CHANNELS = ("web", "chat", "support", "store")
# The property tests' base: the same examples every run (no database, derandomized), and no
# deadline or slowness check, which a busy CI machine would fail.
REPEATABLE = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
PII_KEY = b"test-pii-key-0123456789"
LIMITS = Limits(max_payload_bytes=64 * 1024, max_clock_skew=timedelta(minutes=5))
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

SOURCE_ID_FIELD = {"web": "event_id", "chat": "id", "support": "event_id", "store": "txn_id"}
TIME_FIELD = {"web": "sent_at", "chat": "timestamp", "support": "occurred_at", "store": "time"}
# Raw kind field per channel, and the contract's mapping to canonical kinds (section 3).
KIND_FIELD = {"web": "type", "chat": "event", "support": "action", "store": "kind"}
CANONICAL_KIND = {
    "web": {
        "page_view": "page_view",
        "sign_in": "sign_in",
        "form_submit": "form_submit",
        "survey_response": "survey_response",
        "account_closed": "account_closed",
    },
    "chat": {
        "conversation_started": "conversation_started",
        "message": "message",
        "handoff": "handoff",
        "conversation_closed": "conversation_closed",
        "rating": "survey_response",
    },
    "support": {
        "created": "ticket_created",
        "agent_reply": "agent_reply",
        "customer_reply": "customer_reply",
        "solved": "ticket_solved",
        "reopened": "ticket_reopened",
        "survey": "survey_response",
    },
    "store": {"purchase": "purchase", "return": "return", "kiosk_survey": "survey_response"},
}
# schema_violation fixture names: "schema_violation__<category>_<field.path>[__<variant>]".
CATEGORIES = (
    "missing",
    "wrong_type",
    "unknown_enum",
    "out_of_range",
    "out_of_scale",
    "conditional",
    "bad_format",
)


@dataclass(frozen=True)
class Golden:
    """One fixture file and the outcome its name promises."""

    channel: str
    path: Path
    outcome: str  # "valid" or a dead-letter reason
    category: str | None  # schema_violation only
    field: str | None  # the field the detail must name, where one is named

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def id(self) -> str:
        return f"{self.channel}/{self.path.stem}"

    def data(self) -> bytes:
        return self.path.read_bytes()

    def doc(self) -> dict[str, Any]:
        value = orjson.loads(self.data())
        assert isinstance(value, dict)
        return value


def _describe(channel: str, path: Path) -> Golden:
    stem = path.stem
    head, _, rest = stem.partition("__")
    if head.startswith("valid_"):
        return Golden(channel, path, "valid", None, None)
    if head == "schema_violation":
        spec = rest.split("__")[0]
        for category in CATEGORIES:
            if spec.startswith(category + "_"):
                return Golden(channel, path, head, category, spec[len(category) + 1 :])
        raise AssertionError(f"unknown schema_violation category in {path}")
    if head == "timestamp_in_future":
        return Golden(channel, path, head, None, TIME_FIELD[channel])
    if head in ("invalid_json", "not_an_object", "payload_too_large"):
        return Golden(channel, path, head, None, None)
    raise AssertionError(f"fixture name does not say its outcome: {path}")


def goldens() -> list[Golden]:
    found = [
        _describe(channel, path)
        for channel in CHANNELS
        for path in sorted((FIXTURES / channel).iterdir())
        if path.is_file()
    ]
    assert found, f"no fixtures under {FIXTURES}"
    return found


def valid_goldens() -> list[Golden]:
    return [g for g in goldens() if g.outcome == "valid"]


def source(channel: str, partition: int = 3, offset: int = 42) -> Source:
    return Source(topic=f"cx.raw.{channel}", partition=partition, offset=offset)


def hmac_hex(kind: str, value: str, key: bytes = PII_KEY) -> str:
    """The keyed hash, computed here independently of service.pii."""
    return hmac.new(key, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()


def dumps(doc: Any) -> bytes:
    return orjson.dumps(doc)
