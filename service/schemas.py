"""`schemas/`: JSON Schemas (draft 2020-12) generated from the models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel

from service.alerts import Alert
from service.canonical import IdentityMerge, Touchpoint
from service.deadletter import DeadLetterHeaders
from service.metrics import Snapshot
from service.profile import Profile
from service.raw import ChatEvent, StoreEvent, SupportEvent, WebEvent

DRAFT = "https://json-schema.org/draft/2020-12/schema"

MODELS: dict[str, tuple[type[BaseModel], str]] = {
    "raw.web.json": (WebEvent, "cx.raw.web value: one web tracker event"),
    "raw.chat.json": (ChatEvent, "cx.raw.chat value: one chat webhook event"),
    "raw.support.json": (SupportEvent, "cx.raw.support value: one help-desk ticket event"),
    "raw.store.json": (StoreEvent, "cx.raw.store value: one point-of-sale or kiosk event"),
    "timeline.json": (Touchpoint, "cx.timeline value: one canonical touchpoint"),
    "alert.json": (Alert, "cx.alerts value: one closed-loop alert"),
    "metrics.json": (Snapshot, "cx.metrics value and GET /v1/metrics: one rolling snapshot"),
    "identity.json": (IdentityMerge, "cx.identity value: a customer key merged into another"),
    "profile.json": (Profile, "cx.profiles value and GET /v1/customers/{key}: one profile"),
    "deadletter-headers.json": (
        DeadLetterHeaders,
        "cx.deadletter headers (UTF-8 strings; numbers as decimal text)",
    ),
}


def generate() -> dict[str, bytes]:
    """Models -> {file name: schema JSON bytes}."""
    files: dict[str, bytes] = {}
    for name, (model, description) in MODELS.items():
        schema: dict[str, Any] = {
            "$schema": DRAFT,
            "$id": f"https://cxpulse.dev/schemas/{name}",
            **model.model_json_schema(by_alias=True, mode="serialization"),
        }
        schema["description"] = description
        files[name] = (
            orjson.dumps(schema, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
        )
    return files


def write(directory: Path) -> list[str]:
    """Write every schema into `directory` -> the names that changed."""
    directory.mkdir(parents=True, exist_ok=True)
    changed = []
    for name, content in generate().items():
        path = directory / name
        if not path.exists() or path.read_bytes() != content:
            path.write_bytes(content)
            changed.append(name)
    return changed


def drift(directory: Path) -> list[str]:
    """Names whose file in `directory` differs from the models (missing or stale)."""
    return [
        name
        for name, content in generate().items()
        if not (directory / name).exists() or (directory / name).read_bytes() != content
    ]
