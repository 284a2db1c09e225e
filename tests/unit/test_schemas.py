"""The committed schemas/ match the models, and real messages validate against them."""

from __future__ import annotations

from typing import Any

import jsonschema
import orjson
import pytest
from jsonschema.protocols import Validator

from service.deadletter import deadletter_headers, read_headers
from service.normalize import normalize
from service.parse import Rejected, parse
from service.schemas import DRAFT, MODELS, drift, generate
from tests.unit._golden import (
    CHANNELS,
    LIMITS,
    NOW,
    PII_KEY,
    SCHEMAS,
    Golden,
    goldens,
    source,
    valid_goldens,
)

pytestmark = pytest.mark.unit

# Fixtures whose violation plain JSON Schema cannot see: to JSON Schema 4.0 is an integer.
SCHEMA_BLIND = {"chat/schema_violation__wrong_type_rating"}


def _validator(name: str) -> Validator:
    schema = orjson.loads((SCHEMAS / name).read_bytes())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


@pytest.fixture(scope="module")
def validators() -> dict[str, Validator]:
    return {name: _validator(name) for name in MODELS}


def test_no_drift() -> None:
    assert drift(SCHEMAS) == [], "run `python -m service schemas` and commit schemas/"


def test_every_model_has_a_file() -> None:
    assert {p.name for p in SCHEMAS.glob("*.json")} >= set(MODELS)
    assert set(generate()) == set(MODELS)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_schemas_are_draft_2020_12(name: str) -> None:
    schema = orjson.loads((SCHEMAS / name).read_bytes())
    assert schema["$schema"] == DRAFT == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"].endswith(name)
    assert schema["description"]
    jsonschema.Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("golden", valid_goldens(), ids=lambda g: g.id)
def test_valid_fixture_matches_raw_schema(golden: Golden, validators: dict[str, Any]) -> None:
    validators[f"raw.{golden.channel}.json"].validate(golden.doc())


@pytest.mark.parametrize(
    "golden",
    [
        g
        for g in goldens()
        if g.category in ("missing", "wrong_type", "unknown_enum", "out_of_range")
        and g.id not in SCHEMA_BLIND
    ],
    ids=lambda g: g.id,
)
def test_schema_violation_fixture_fails_raw_schema(
    golden: Golden, validators: dict[str, Any]
) -> None:
    assert not validators[f"raw.{golden.channel}.json"].is_valid(golden.doc())


@pytest.mark.parametrize("golden", valid_goldens(), ids=lambda g: g.id)
def test_timeline_output_matches_schema(golden: Golden, validators: dict[str, Any]) -> None:
    event = parse(golden.channel, golden.data(), LIMITS, NOW)
    assert not isinstance(event, Rejected)
    touchpoint = normalize(event, source(golden.channel), PII_KEY).touchpoint
    validators["timeline.json"].validate(orjson.loads(touchpoint.model_dump_json()))


def test_timeline_schema_rejects_non_contract_shapes(validators: dict[str, Any]) -> None:
    golden = valid_goldens()[0]
    event = parse(golden.channel, golden.data(), LIMITS, NOW)
    assert not isinstance(event, Rejected)
    body = orjson.loads(
        normalize(event, source(golden.channel), PII_KEY).touchpoint.model_dump_json()
    )
    timeline = validators["timeline.json"]
    assert timeline.is_valid(body)
    for bad in (
        body | {"occurred_at": "2026-11-20T10:15:30Z"},
        body | {"occurred_at": "2026-11-20T11:15:30.000+01:00"},
        body | {"channel": "email"},
        body | {"kind": "rating"},
        body | {"sentiment": 1.5},
        body | {"ratings": {"nps": 11, "csat": None, "ces": None}},
        body | {"amount": "19,99"},
        body | {"unexpected": 1},
        {k: v for k, v in body.items() if k != "customer_key"},
    ):
        assert not timeline.is_valid(bad), bad


@pytest.mark.parametrize("channel", CHANNELS)
def test_deadletter_headers_match_schema(channel: str, validators: dict[str, Any]) -> None:
    rejected = parse(channel, b"{", LIMITS, NOW)
    assert isinstance(rejected, Rejected)
    headers = read_headers(deadletter_headers(rejected, f"cx.raw.{channel}", 1, 2, NOW))
    validators["deadletter-headers.json"].validate(headers)
    assert not validators["deadletter-headers.json"].is_valid(headers | {"cx.source.offset": 2})
